"""The end-to-end job: data prep -> training on the DeepSpeed engine -> evaluation -> samples.

``python -m prime_scale.launch.local [--nproc K] config=demo`` (or ``python launchers/local.py``) runs it. A source
that is generated (markov, digits) is prepared by its data-prep job, run as a child process. Training runs in this
process (one rank) or as K ranks under torchrun; evaluation and sampling then run here on the consolidated final
weights (the EMA when the run kept one), without DeepSpeed. Everything lands in ``run.out_dir/run.name``:
``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``export/`` (model.safetensors + config.yaml) and
``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from prime_scale.cli import EXIT_FAILED, EXIT_OK, EXIT_RESUMABLE, EXIT_USAGE
from prime_scale.config import Config, ConfigError, config_to_dict, save_config
from prime_scale.data.errors import DataPrepFailure
from prime_scale.data.markov import MarkovChain, load_markov_chain
from prime_scale.data.manifest import checked_dataset
from prime_scale.data.shards import read_blocks
from prime_scale.evaluate import EvalResult, evaluate_nelbo
from prime_scale.export import export, from_pretrained
from prime_scale.image_metrics import (StandInFeatures, fid, inception_extractor, inception_score,
                                       independent_pixel_baseline, reference_stats, save_sample_grid)
from prime_scale.metrics import last_stop
from prime_scale.objective import sample_with_config
from prime_scale.processes import kill_with_parent
from prime_scale.run_paths import RunPaths
from prime_scale.runlock import RunLock


# The data-prep job (and its flags) of each source that is made rather than read: text and image shards are
# prepared beforehand, by their own commands (docs/data_prep.md).
PREP_JOBS = {"markov": ["data_prep.synthetic"], "digits": ["data_prep.digits", "--no-progress"]}


def prepare_data(cfg: Config) -> dict:
    """Run the data-prep job the source needs (idempotent) and return the dataset's manifest, checked against the
    config (ConfigError naming every disagreement: prime_scale.data.manifest.check_dataset)."""
    if cfg.data.source in PREP_JOBS:
        run_prep_job(cfg, PREP_JOBS[cfg.data.source])
    return checked_dataset(cfg).to_json()


def run_prep_job(cfg: Config, job: list[str]) -> None:
    """Run ``python -m JOB`` on this very config as a child process, as the launcher runs torchrun: the library
    orchestrates data prep without importing it. The config travels as a resolved config file, so the job sees
    exactly what the caller holds; its output shows as it goes. Its refusal (exit status 2: data of another config
    at data.path, a folder another job writes) is a ConfigError; any other failure is a DataPrepFailure, its
    message printed above by the job."""
    with tempfile.TemporaryDirectory(prefix="prime_scale_prep_") as tmp:
        config = Path(tmp) / "config.yaml"
        save_config(cfg, config)
        cmd = [sys.executable, "-m", job[0], f"config={config}", *job[1:]]
        print(f"[prime_scale] data prep: python -m {job[0]} (data.path={cfg.data.path})", flush=True)
        status = subprocess.run(cmd, preexec_fn=kill_with_parent).returncode
    if status == EXIT_USAGE:
        raise ConfigError(f"python -m {job[0]} refused to prepare data.path={cfg.data.path} (its error is above)")
    if status != EXIT_OK:
        raise DataPrepFailure(f"python -m {job[0]} failed to prepare data.path={cfg.data.path} (exit status "
                              f"{status}; its error is above)")


def load_split(cfg: Config, manifest: dict, split: str, limit: int = 0) -> torch.Tensor:
    """The first ``limit`` sequences of a split (0 = all) as int64 blocks of exactly data.seq_len tokens."""
    blocks = read_blocks(cfg.data.path, split, cfg.data.seq_len, cfg.data.vocab_size, limit, manifest)
    return torch.from_numpy(blocks).long()


def train_on_engine(cfg: Config, overrides: list[str], nproc: int, grace_s: int = 120) -> int:
    """Train with the DeepSpeed engine: here for one rank, else ``nproc`` ranks under torchrun. Returns the exit
    status (EXIT_RESUMABLE when a signal stopped it after a save). ``grace_s``: how long torchrun lets the
    ranks save after it forwards a stop before it kills them."""
    if nproc == 1:
        from prime_scale import engine  # here only: under torchrun this process never trains (about 0.16 s)

        return engine.main(overrides)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--shutdown-timeout", str(grace_s), "-m", "prime_scale.engine", *overrides]
    print(f"[prime_scale] {' '.join(cmd[2:])}", flush=True)
    # the ranks import the installed package (pip install -e . in a checkout), whatever the working directory
    return supervise(cmd, dict(os.environ), RunPaths.of(cfg).root)


_LAUNCHER_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def supervise(cmd: list[str], env: dict, run_dir: Path) -> int:
    """Run torchrun as a child this process owns, and return the run's exit status.

    torchrun runs in a session of its own, so a Ctrl-C in the terminal reaches this process only, and it dies with
    this process (parent-death signal; its ranks die with torchrun the same way: prime_scale.processes). The first
    SIGINT, SIGTERM or SIGHUP here is handed to torchrun as SIGTERM, which forwards it to every rank: they save at
    the next step boundary and exit. A second one kills torchrun (and so the ranks) at once, without a save.
    torchrun itself exits 1 after a forwarded signal whatever its ranks returned, so the status is read from the
    run's log: EXIT_RESUMABLE when the ranks recorded a stop after the signal (metrics.last_stop)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=kill_with_parent)
    stop_sent_at: list[float] = []

    def forward(signum, frame) -> None:
        if not stop_sent_at:
            stop_sent_at.append(time.time())
            print(f"\n[prime_scale] {signal.Signals(signum).name}: the ranks save at the next step boundary and "
                  "stop (signal again to stop at once, without saving)", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGTERM)
        else:
            print("[prime_scale] stopping now, without a save", file=sys.stderr, flush=True)
            proc.kill()

    previous = {s: signal.signal(s, forward) for s in _LAUNCHER_STOP_SIGNALS}
    try:
        status = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop_sent_at:
        stopped = last_stop(run_dir, since=stop_sent_at[0])
        if stopped is not None:
            print(f"[prime_scale] every rank saved at step {stopped['step']} and stopped (torchrun reports a forwarded "
                  "signal with the SignalException traceback above)", file=sys.stderr, flush=True)
            return EXIT_RESUMABLE
        print(f"[prime_scale] the ranks did not save after the stop (torchrun exit {status})", file=sys.stderr)
        return status or 1
    return status


def run(cfg: Config, overrides: list[str], nproc: int = 1, grace_s: int = 120) -> int:
    """The whole job for ``cfg`` (made from ``overrides``, which the engine's ranks parse again). Returns the exit
    status: 0 with ``summary.json`` written, EXIT_RESUMABLE when a signal stopped training after a save (rerun to
    continue), EXIT_FAILED when data prep failed, or the training's failure status."""
    paths = RunPaths.of(cfg)
    print(f"[prime_scale] run dir: {paths.root}")
    for folder in paths.lock_folders():  # the folders the engine's rank 0 will lock
        RunLock(folder, stale_minutes=cfg.ckpt.lock_stale_minutes).probe()  # in use: RunLocked before anything starts
    try:
        manifest = prepare_data(cfg)
    except DataPrepFailure as e:
        print(f"[prime_scale] {e}", file=sys.stderr)
        return EXIT_FAILED
    val_seqs = load_split(cfg, manifest, "val")
    chain: Optional[MarkovChain] = load_markov_chain(cfg.data.path) if cfg.data.source == "markov" else None
    true_entropy = chain.sequence_entropy_per_token(cfg.data.seq_len) if chain else None
    print(f"[prime_scale] data: {manifest['splits']['train'].get('sequences')} train / {len(val_seqs)} val sequences "
          f"of {cfg.data.seq_len} tokens, C={cfg.data.vocab_size}"
          + (f", true entropy {true_entropy:.4f} nats/token" if true_entropy is not None else ""), flush=True)

    status = train_on_engine(cfg, overrides, nproc, grace_s)
    if status != 0:
        print(f"[prime_scale] training ended with status {status}; its last checkpoint is kept: run the same "
              "command again to continue", file=sys.stderr)
        return status

    export(paths.checkpoints, str(paths.export))
    pretrained = from_pretrained(str(paths.export))
    model, exported = pretrained.model, pretrained.info
    final = evaluate_nelbo(model, val_seqs, cfg, seed=cfg.train.seed + 1)
    samples = draw_samples(cfg, model, val_seqs)
    summary = {
        "val": final.as_dict(),
        "weights": exported["weights"],
        "true_entropy_per_token": true_entropy,
        "entropy_rate": chain.entropy_rate() if chain else None,
        "sampling": {"steps": cfg.sample.steps, "nfe": samples["nfe"], "corrector_nfe": samples["corrector_nfe"],
                     "calls": samples["calls"], "idle_ratio": samples["idle_ratio"]},
        "num_params": model.num_params(),
        "step": exported["step"],
        "checkpoint": exported["checkpoint"],
        "config": config_to_dict(cfg),
    }
    if pretrained.tokenizer is not None:
        summary["sample_texts"] = pretrained.detokenize(samples["tokens"])
    if chain is not None:
        nll = -chain.log_prob(samples["tokens"].numpy()) / cfg.data.seq_len
        summary["sample_nll_under_source"] = float(nll.mean())
    if cfg.data.source == "digits":
        train = load_split(cfg, manifest, "train").numpy()
        summary["independent_pixel_baseline"] = independent_pixel_baseline(train, val_seqs.numpy(), manifest["levels"])
    if cfg.eval.fid_samples and manifest.get("kind") == "image":
        summary["fid"] = image_scores(cfg, model, manifest)
    grid = save_sample_grid(manifest, samples["tokens"], paths.sample_grid)
    if grid is not None:
        summary["sample_grid"] = str(grid)
    paths.summary.write_text(json.dumps(summary, indent=2))
    print_summary(cfg, final, true_entropy, chain, samples, summary)
    return 0


def image_scores(cfg: Config, model, manifest: dict) -> dict:
    """FID against the reference split's cached statistics, and Inception Score, of eval.fid_samples samples
    drawn in batches of sample.num_samples with the configured sampler options."""
    extractor = StandInFeatures() if cfg.eval.fid_features == "standin" else inception_extractor(cfg.eval.inception_weights)
    reference = reference_stats(cfg.data.path, cfg.eval.fid_reference_split, extractor)
    side, device = manifest["image_size"], next(model.parameters()).device
    images, nfe = [], []
    for start in range(0, cfg.eval.fid_samples, cfg.sample.num_samples):
        count = min(cfg.sample.num_samples, cfg.eval.fid_samples - start)
        out = sample_with_config(cfg, model, model.codec, count, cfg.train.seed + 1000 + start, device)
        images.append(out.tokens.cpu().numpy().astype(np.uint8).reshape(count, side, side, 3))
        nfe.append(out.nfe)
    images = np.concatenate(images)
    score, score_std = inception_score(images, extractor, splits=min(10, len(images)))
    return {"fid": fid(images, reference, extractor), "inception_score": score, "inception_score_std": score_std,
            "samples": len(images), "features": cfg.eval.fid_features, "reference_split": cfg.eval.fid_reference_split,
            "nfe": float(np.mean(nfe))}


def draw_samples(cfg: Config, model, val_seqs: torch.Tensor) -> dict:
    device = next(model.parameters()).device
    prompt = val_seqs[: cfg.sample.num_samples, : cfg.sample.prompt_len] if cfg.sample.prompt_len else None
    model.eval()
    out = sample_with_config(cfg, model, model.codec, cfg.sample.num_samples, cfg.train.seed + 2, device, prompt)
    return {"tokens": out.tokens.cpu(), "nfe": out.nfe, "corrector_nfe": out.corrector_nfe, "calls": out.calls,
            "idle_ratio": out.idle_ratio}


def print_summary(cfg, final: EvalResult, true_entropy, chain, samples, summary) -> None:
    print("\n=== prime_scale summary ===")
    print(f"validation NELBO : {final.nelbo_per_token:.4f} ± {final.stderr:.4f} nats/token "
          f"({final.sequences} sequences, {final.tokens} tokens, '{final.estimator}' estimator, "
          f"{summary['weights']} weights of step {summary['step']})")
    print(f"validation PPL   : {final.ppl:.3f}  (= exp(NELBO per token)); {final.bits_per_dim:.4f} bits/dim")
    if true_entropy is not None:
        print(f"true entropy     : {true_entropy:.4f} nats/token  -> PPL {math.exp(true_entropy):.3f} "
              f"(entropy rate {chain.entropy_rate():.4f}); the bound is above it by "
              f"{final.nelbo_per_token - true_entropy:+.4f}")
    print(f"samples          : {cfg.sample.num_samples} x {cfg.data.seq_len} tokens, {cfg.sample.steps} steps, "
          f"NFE {samples['nfe']:.1f} per sequence, idle steps {100 * samples['idle_ratio']:.1f}%")
    if "independent_pixel_baseline" in summary:
        base = summary["independent_pixel_baseline"]
        print(f"independent per-pixel categorical model: {base['bits_per_dim']:.4f} bits/dim (add-{base['alpha']} "
              f"smoothing, the best on the validation set) vs this model's {final.bits_per_dim:.4f}")
    if "fid" in summary:
        f = summary["fid"]
        note = "" if f["features"] == "inception" else " (stand-in features: not comparable to published FIDs)"
        print(f"FID              : {f['fid']:.3f} against {f['reference_split']}, Inception Score "
              f"{f['inception_score']:.3f} ± {f['inception_score_std']:.3f}, {f['samples']} samples{note}")
    if "sample_grid" in summary:
        print(f"sample grid      : {summary['sample_grid']}")
    if "sample_nll_under_source" in summary:
        print(f"sample NLL under the true source: {summary['sample_nll_under_source']:.4f} nats/token "
              f"(data: {true_entropy:.4f})")
    texts = summary.get("sample_texts")  # text data: the detokenised samples, else the token ids
    for i, row in enumerate(samples["tokens"][: cfg.sample.num_samples]):
        if texts:
            print(f"  sample {i}: {texts[i][:300]!r}{' ...' if len(texts[i]) > 300 else ''}")
        else:
            shown = " ".join(str(int(t)) for t in row[:24])
            print(f"  sample {i}: {shown}{' ...' if len(row) > 24 else ''}")
