"""MDM-Prime (l = 2) against MDM (l = 1) on images at equal compute, over several training seeds: bits/dim and
FID / Inception Score with the stand-in feature network.

    python bench/image_table.py [--seeds 3] [--sources digits,tiny_image] [--steps 0] [--out runs/image_table]
                                [--fid-samples 1000] [--threads 1] [--json PATH] [--score-only]

Sources (``--sources``):

    digits      prime_scale/configs/digits.yaml: scikit-learn's 8x8 digits, 17 grey levels (C = 17; l = 2 gives b = 5), 4 layers
                x 128, batch 64, 1500 steps, EMA weights
    tiny_image  prime_scale/configs/tiny_image.yaml: 32x32 RGB as 3072 tokens (C = 256; l = 2 gives b = 16), one RGB pixel per
                position, 1 layer x 32, batch 4, 600 steps here (the config's 20 are a test's). This machine has
                no RGB image collection and downloads none, so the data are the same digits drawn as 32x32 RGB
                images (bilinear upsampling of the 8x8 grid, grey in all three channels) and prepared by
                data_prep.images into data/tiny_image (done once, when missing): real pixels of a real source,
                not a natural-image benchmark

For each source the two families use the same config and differ only in ``prime.num_subtokens`` (2 as shipped,
1 for MDM): same network, steps, batch, learning rate, EMA and sampler settings. Run K trains with
``train.seed=K``, which sets the initial weights, the order of the training batches and the masking noise
(bench/paper_table.py's docstring), so "paired" means same seed index. Equal compute is checked, not assumed:
the table prints each family's parameters and ``flops_per_token`` (prime_scale.metrics), which differ only by
the output head and the l sub-token embedding tables (lookups, not FLOPs), and the script refuses to compare
runs whose network, batch, steps or sampler settings differ.

Scores of each run's export (EMA weights where the config keeps them):
- bits/dim = NELBO / ln 2 from ``evaluate_nelbo`` on every validation image, same draws count and seed for all;
- FID and Inception Score of ``--fid-samples`` samples drawn with the config's sampler settings (the same for
  both families), in batches of sample.num_samples with seeds train.seed + 1000 + offset as
  prime_scale.pipeline.image_scores draws them, against the statistics of the training split (the split's
  tokens turned into uint8 images exactly as the samples are; for image shards that is reference_stats' own
  input), with ``StandInFeatures()``: a fixed random conv net. Its FIDs are NOT comparable to published
  Inception FIDs, and rank models trained on the same data only roughly (docs/images.md). The row "data (val)"
  is the validation images themselves scored the same way: the value a perfect model would approach at that
  image count (FID is biased upwards at small counts, so compare numbers at the same count only).

Printed: per source and family mean ± sd over seeds, and the Prime - MDM difference paired by seed with its
standard error; a ``summary:`` line per source, and one JSON (default OUT/image_table.json) of every run.
Resumable like bench/paper_table.py (a run already exported at the right step is not trained again, a scored one
is not scored again); ``--score-only`` trains nothing and tabulates the finished runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prime_scale.cli import text_table  # noqa: E402
from bench.paper_table import (T975, cached, code_hash, exported_step, fmt, fmt_paired,  # noqa: E402
                               mean_sd, paired, resolution, run_all, stamp, train_run, trained_line)


@dataclass(frozen=True)
class Source:
    config: str
    steps: int  # default optimizer steps of both families
    overrides: tuple[str, ...] = ()


SOURCES = {
    "digits": Source("digits", 1500),
    "tiny_image": Source("tiny_image", 600),
}
FAMILIES = {"mdm": ("MDM (l=1)", ("prime.num_subtokens=1",)), "prime2": ("Prime (l=2)", ("prime.num_subtokens=2",))}
BASELINE = "mdm"


# ---------------------------------------------------------------------------------------------------- data

def prepare_tiny_image(config: str, path: str) -> None:
    """data/tiny_image from scikit-learn's digits: each 8x8 image (grey 0..16 -> 0..255) upsampled bilinearly to
    32x32, written as an RGB PNG into a folder per class, then through data_prep.images (content-hash split with
    prep.val_fraction = 0.15, as the digits source's). Skipped when the shards exist."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from data_prep.batch import run_job
    from data_prep.images import ImageJob
    from prime_scale.config import load_config

    if (Path(path) / "manifest.json").is_file():
        return
    digits = load_digits()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (grid, label) in enumerate(zip(digits.images, digits.target)):
            folder = Path(tmp) / str(label)
            folder.mkdir(exist_ok=True)
            grey = Image.fromarray(np.rint(grid * 255 / 16).astype(np.uint8), mode="L")
            grey.resize((32, 32), Image.BILINEAR).convert("RGB").save(folder / f"digit_{i:04d}.png")
        run_job(ImageJob(load_config([f"config={config}", f"data.path={path}", f"prep.input={tmp}",
                                      "prep.image_size=32", "prep.val_fraction=0.15"])), progress=False)


def to_images(tokens, manifest: dict) -> np.ndarray:
    """Token rows -> uint8 images as the pipeline's sample grids make them: (N, H, W, 3) pixels for image shards,
    (N, H, W) grey for the digits (levels scaled to 0..255)."""
    tokens = np.asarray(tokens)
    side = manifest["image_size"]
    if manifest.get("kind") == "digits":
        return (tokens * 255 // (manifest["levels"] - 1)).astype(np.uint8).reshape(len(tokens), side, side)
    return tokens.astype(np.uint8).reshape(len(tokens), side, side, 3)


# ---------------------------------------------------------------------------------------------------- scoring

def sample_images(cfg, model, manifest: dict, count: int, batch: int) -> tuple[np.ndarray, float]:
    """``count`` samples with the config's sampler settings, in batches of ``batch`` (0: sample.num_samples, as
    pipeline.image_scores draws them; the batch changes which random numbers a sample gets, not its
    distribution), seeded train.seed + 1000 + offset; and the mean NFE per sample."""
    import torch

    from prime_scale.objective import sample_with_config

    device = next(model.parameters()).device
    images, nfe = [], []
    with torch.no_grad():
        batch = batch or cfg.sample.num_samples
        for start in range(0, count, batch):
            n = min(batch, count - start)
            out = sample_with_config(cfg, model, model.codec, n, cfg.train.seed + 1000 + start, device)
            images.append(to_images(out.tokens.cpu().numpy(), manifest))
            nfe.append(out.nfe * n)
    return np.concatenate(images), sum(nfe) / count


def image_quality(images: np.ndarray, reference, extractor) -> dict:
    from prime_scale.image_metrics import fid, inception_score

    score, score_sd = inception_score(images, extractor, splits=min(10, len(images)))
    return {"fid": fid(images, reference, extractor), "inception_score": score, "inception_score_std": score_sd,
            "samples": len(images)}


def score(run_dir: str, manifest: dict, val, reference, extractor, fid_samples: int, sample_batch: int,
          repeats: int, eval_seed: int) -> dict:
    from dataclasses import asdict, replace

    from prime_scale.evaluate import evaluate_nelbo
    from prime_scale.export import from_pretrained
    from prime_scale.metrics import flops_per_token

    pre = from_pretrained(str(Path(run_dir) / "export"))
    cfg = replace(pre.config, eval=replace(pre.config.eval, max_sequences=0, repeats=repeats))
    start = time.perf_counter()
    result = evaluate_nelbo(pre.model, val, cfg, seed=eval_seed)
    eval_s = time.perf_counter() - start
    images, nfe = sample_images(cfg, pre.model, manifest, fid_samples, sample_batch)
    quality = image_quality(images, reference, extractor)
    m, t, s = cfg.model, cfg.train, cfg.sample
    return {**result.as_dict(), **quality, "nfe": nfe, "eval_s": eval_s,
            "sample_s": time.perf_counter() - start - eval_s, "l": cfg.prime.num_subtokens,
            "step": pre.info.get("step"), "weights": pre.info.get("weights"), "parameters": pre.model.num_params(),
            "flops_per_token": flops_per_token(pre.model, cfg.data.seq_len),
            "compute": {"network": [m.n_layer, m.d_model, m.n_head, m.tokens_per_position, m.merge],
                        "train": [t.steps, t.batch_size, t.lr, cfg.data.seq_len, cfg.engine.ema_decay],
                        "sampler": asdict(s)}}


def check_equal_compute(runs: list[dict]) -> None:
    """Refuse to compare runs of one source whose network, training or sampler settings differ (anything but l)."""
    seen = {json.dumps(r["compute"], sort_keys=True, default=str) for r in runs}
    if len(seen) > 1:
        raise SystemExit("runs of one source differ in more than l (network, training or sampler):\n  "
                         + "\n  ".join(sorted(seen)))


# ---------------------------------------------------------------------------------------------------- tables

METRICS = (("bits_per_dim", "bits/dim", 4), ("fid", "FID (stand-in)", 3), ("inception_score", "IS (stand-in)", 4))


def aggregate(key: str, runs: dict[int, dict], baseline: dict[int, dict]) -> dict:
    first = next(iter(runs.values()))
    row = {"family": key, "name": FAMILIES[key][0], "seeds": sorted(runs), "l": first["l"],
           "parameters": first["parameters"], "flops_per_token": first["flops_per_token"],
           "nfe": mean_sd([r["nfe"] for r in runs.values()]),
           "train_min": mean_sd([r["train_s"] / 60 for r in runs.values() if r.get("train_s")])}
    for metric, _, _ in METRICS:
        row[metric] = mean_sd([r[metric] for r in runs.values()])
        if baseline and key != BASELINE:
            row[f"{metric}_vs_mdm"] = paired({s: r[metric] for s, r in runs.items()},
                                             {s: r[metric] for s, r in baseline.items()})
    return row


def format_table(rows: list[dict], data: dict) -> str:
    header = ["family", "seeds", "params", "MFLOP/token", "NFE"]
    for _, name, _ in METRICS:
        header += [name, "Δ vs MDM ± SE"]
    lines = []
    for r in rows:
        line = [r["name"], str(len(r["seeds"])), f"{r['parameters']:,}", f"{r['flops_per_token'] / 1e6:.3f}",
                fmt(*r["nfe"], digits=1)]
        for metric, _, digits in METRICS:
            d = r.get(f"{metric}_vs_mdm")
            line += [fmt(*r[metric], digits=digits),
                     fmt_paired(d, digits) if d else ("(baseline)" if r["family"] == BASELINE else "-")]
        lines.append(line)
    lines.append([f"data (val, {data['samples']} images)", "-", "-", "-", "-", "-", "-",
                  f"{data['fid']:.3f}", "-", f"{data['inception_score']:.4f}", "-"])
    return text_table(header, lines, range(1, len(header)))


def summary_line(source: str, rows: list[dict], seeds: int, steps: int, fid_samples: int) -> str:
    prime = next((r for r in rows if r["family"] != BASELINE), None)
    if prime is None or not any(k.endswith("_vs_mdm") for k in prime):
        return f"summary ({source}): no paired comparison (a family is missing)"
    named = {f"{label} (Prime - MDM)": prime[f"{m}_vs_mdm"] for m, label, _ in METRICS}
    return (f"summary ({source}): {seeds} seeds x {steps} steps, equal compute (same network, steps, batch; "
            f"FLOPs/token {prime['flops_per_token'] / next(r for r in rows if r['family'] == BASELINE)['flops_per_token']:.3f}x"
            f" MDM's), paired differences by size in SE: {resolution(named, unit='', digits=4)}; "
            f"with {seeds} seeds t has {seeds - 1} degrees of freedom (95%: |t| > {T975.get(seeds - 1, 2.0):.2f}); "
            f"FID and IS are stand-in-network numbers at {fid_samples} samples, comparable only within this table")


# ---------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..S-1 per family (default 3)")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    p.add_argument("--steps", type=int, default=0,
                   help="optimizer steps of every run (default 0: each source's, "
                        + ", ".join(f"{k} {s.steps}" for k, s in SOURCES.items()) + ")")
    p.add_argument("--out", default="runs/image_table", help="run folder parent (default runs/image_table)")
    p.add_argument("--json", default="", help="write every run and row here (default OUT/image_table.json)")
    p.add_argument("--fid-samples", type=int, default=1000, help="samples per run for FID and IS (default 1000)")
    p.add_argument("--sample-batch", type=int, default=100,
                   help="samples per sampler call (default 100; 0: the config's sample.num_samples)")
    p.add_argument("--repeats", type=int, default=8, help="NELBO draws per validation image (default 8)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the NELBO draws, the same for all (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of training and scoring (default 1)")
    p.add_argument("--score-only", action="store_true", help="train nothing: the table of the finished runs")
    args = p.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if any(s not in SOURCES for s in sources) or not sources or args.seeds < 1 or args.fid_samples < 2:
        p.error(f"--sources from {', '.join(SOURCES)}, --seeds >= 1, --fid-samples >= 2")

    import torch

    from prime_scale.config import load_config
    from prime_scale.image_metrics import StandInFeatures, feature_stats
    from prime_scale.pipeline import load_split, prepare_data

    started, wall0 = stamp(), time.perf_counter()
    torch.set_num_threads(args.threads)
    extractor = StandInFeatures()
    out = Path(args.out)
    code = code_hash("prime_scale/evaluate.py", "prime_scale/objective.py", "prime_scale/diffusion.py",
                     "prime_scale/sampler.py", "prime_scale/image_metrics.py", "prime_scale/model.py")
    report = {"command": "python bench/image_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": started, "seeds": args.seeds, "fid_samples": args.fid_samples,
              "sample_batch": args.sample_batch, "repeats": args.repeats, "features": extractor.name,
              "sources": {}, "failed": {}}
    summaries = []
    for source in sources:
        src = SOURCES[source]
        steps = args.steps or src.steps
        base = load_config([f"config={src.config}", *src.overrides])
        if source == "tiny_image":
            prepare_tiny_image(src.config, base.data.path)
        manifest = prepare_data(base)
        print(f"\n== {source}: {len(FAMILIES)} families x {args.seeds} seeds x {steps} steps into {out}/", flush=True)
        val = load_split(base, manifest, "val")
        reference = feature_stats(to_images(load_split(base, manifest, "train").numpy(), manifest), extractor)
        data = image_quality(to_images(val.numpy(), manifest), reference, extractor)
        settings = {"fid_samples": args.fid_samples, "sample_batch": args.sample_batch, "repeats": args.repeats,
                    "eval_seed": args.eval_seed, "features": extractor.name, "reference": "train", "code": code}

        def make(key: str, seed: int) -> dict:
            t = train_run(src.config, (*src.overrides, *FAMILIES[key][1]), out, f"{source}_{key}_seed{seed}",
                          steps, seed, args.threads, train=not args.score_only)
            print(trained_line(key, seed, t), flush=True)
            r = {**cached(t["run_dir"], {**settings, "step": exported_step(Path(t["run_dir"]))},
                          lambda: score(t["run_dir"], manifest, val, reference, extractor, args.fid_samples,
                                        args.sample_batch, args.repeats, args.eval_seed)),
                 "family": key, "seed": seed, "run_dir": t["run_dir"], "train_s": t["train_s"]}
            print(f"{FAMILIES[key][0]:<12} seed {seed}: {r['bits_per_dim']:.4f} bits/dim (± "
                  f"{r['stderr'] / math.log(2):.4f} MC), FID {r['fid']:.3f}, IS {r['inception_score']:.4f}, "
                  f"NFE {r['nfe']:.1f} (scored in {r['eval_s'] + r['sample_s']:.0f} s)", flush=True)
            return r

        # seed by seed, both families each time: a table cut short still has complete pairs
        plan = [(key, seed, lambda k=key, s=seed: make(k, s)) for seed in range(args.seeds) for key in FAMILIES]
        done, failed = run_all(plan, say=lambda m: print(m, flush=True))
        report["failed"].update({f"{source}/{k}/seed{s}": msg for (k, s), msg in failed.items()})
        runs: dict[str, dict[int, dict]] = {k: {} for k in FAMILIES}
        for (key, seed), r in done.items():
            runs[key][seed] = r
        check_equal_compute([r for k in FAMILIES for r in runs[k].values()])
        rows = [aggregate(k, runs[k], runs[BASELINE]) for k in FAMILIES if runs[k]]
        print(format_table(rows, data))
        summaries.append(summary_line(source, rows, args.seeds, steps, args.fid_samples))
        if failed:
            summaries[-1] += (f"; {len(failed)} of {len(plan)} runs left out ("
                              f"{'not finished' if args.score_only else 'failed'}): "
                              + ", ".join(f"{k}/seed{s}" for k, s in failed))
        print(summaries[-1], flush=True)
        report["sources"][source] = {"config": src.config, "steps": steps, "data": base.data.path,
                                     "val_images": len(val), "data_row": data, "rows": rows,
                                     "runs": [r for k in FAMILIES for r in runs[k].values()]}

    wall = time.perf_counter() - wall0
    print("\n" + "\n".join(summaries))
    print(f"wall time {wall / 60:.1f} min, {started} - {stamp()}")
    report.update({"finished": stamp(), "wall_s": wall, "summary": summaries})
    path = Path(args.json or out / "image_table.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"json: {path}")
    if report["failed"] and not args.score_only:
        raise SystemExit(f"{len(report['failed'])} runs failed: {', '.join(report['failed'])}")
    return report


if __name__ == "__main__":
    main()
