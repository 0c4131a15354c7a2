"""Draw samples from an export or a checkpoint, from the command line.

    python -m prime_scale.sample ckpt=URL [num=N] [steps=S] [prompt=TEXT | prompt_ids=I,J,...] [top_p=P]
        [temperature=T] [float64=true|false] [seed=K] [out=PATH] [batch=B] [weights=ema|trained]
        [device=auto|cpu|cuda] [sample.KEY=VALUE ...]

``ckpt`` is an export folder (``python -m prime_scale.export``) or a run folder holding export/, or a checkpoint
folder / a run's checkpoint folder (or a run folder holding checkpoints/) on any fsspec URL, which is exported
into a temporary folder first (``weights`` picks the EMA or the trained weights, as for the export); the same
locations as ``python -m prime_scale.evaluate models=``. ``num`` samples (default sample.num_samples) are drawn ``batch`` at a time
with every option of the run's ``sample`` section (docs/sampling.md); ``steps``, ``top_p``, ``temperature`` and
``float64`` are short for ``sample.steps=`` etc., and any ``sample.KEY=VALUE`` changes that option. An AR model
(model.objective=ar) is sampled left to right, one network call per generated token.

``prompt=TEXT`` (text models: encoded with the dataset's tokenizer, no BOS/EOS added) or
``prompt_ids=I,J,...`` (token ids, any model) is kept fixed as the first tokens of every sample.

Output: ``out`` (default ``samples.jsonl``) gets one JSON object per sample: its token ids, its text (text models:
``text``, ``prompt``, ``completion``) and the run's facts (NFE, steps, seeds, every sampler option, tokens/s). For
pixel data the samples also go to a PNG grid next to it (``samples.png``). The report prints NFE next to the
idle-step ratio: the fraction of the steps at which a sequence did not change (``SampleResult.idle_ratio``; with
a time-independent network such a step costs no evaluation, the output cache serves it); each JSON line also
holds the sample's own ``idle_steps``. Exit status 2: a usage error.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from prime_scale.checkpoint import CheckpointError
from prime_scale.cli import EXIT_OK, Key, UsageError, config_help, guarded, keys_help, parse_keys, wants_help
from prime_scale.config import Config, load_config
from prime_scale.export import Pretrained, export_folder, from_pretrained
from prime_scale.image_metrics import save_sample_grid
from prime_scale.memory import placement, sample_batch_size
from prime_scale.objective import sample_with_config
from prime_scale.sampler import sample_kwargs

# short keys that are sample.* options
OPTIONS = {"steps": "sample.steps", "top_p": "sample.top_p", "temperature": "sample.temperature",
           "float64": "sample.float64"}
KEYS = (
    Key("ckpt", "an export folder, a run folder (export/ or checkpoints/ inside) or a checkpoint URL", required=True),
    Key("num", "samples to draw (default: the run's sample.num_samples)", type=int, minimum=1),
    Key("batch", "samples per batch (default: the largest whose sampling step fits eval.memory_mb)", type=int,
        minimum=1),
    Key("seed", "seed of the first batch (batch i uses seed + its first sample's index)", 0, int, minimum=0),
    Key("prompt", "text kept fixed as the start of every sample (text models; no BOS/EOS added)"),
    Key("prompt_ids", "comma-separated token ids kept fixed as the start of every sample (any model)"),
    Key("out", "the JSONL file of samples (pixel data: a PNG grid beside it)", "samples.jsonl"),
    Key("weights", "which weights a checkpoint is exported with", "auto", choices=("auto", "ema", "trained")),
    Key("device", "where to sample", "auto", choices=("auto", "cpu", "cuda")),
    *(Key(short, f"short for {full}=") for short, full in OPTIONS.items()),
)


def usage() -> str:
    """``--help``: this docstring, the keys, and every sampling option with its meaning."""
    return (f"{__doc__}\nKeys:\n{keys_help(KEYS)}\n  sample.KEY=VALUE\n      any sampling option of the run's "
            f"config:\n{config_help(('sample',))}")


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """(the arguments given, num/batch/seed as ints; sample.* overrides in the order given). Checks every key and
    the overrides' values."""
    overrides: list[str] = []

    def sample_option(key: str, raw: str) -> bool:
        if key in OPTIONS or key.startswith("sample."):
            overrides.append(f"{OPTIONS.get(key, key)}={raw}")
            return True
        if "." in key:
            raise UsageError(f"unknown key '{key}': only sample.* settings can change at sampling time")
        return False

    parsed = parse_keys(argv, KEYS, extra=sample_option)
    args = {k: v for k, v in parsed.items() if v is not None}
    if "prompt" in args and "prompt_ids" in args:
        raise UsageError("give prompt= or prompt_ids=, not both")
    load_config(overrides)  # unknown sample.* keys and bad values fail here, before anything is loaded
    return args, overrides


def load(ckpt: str, weights: str, device: str, overrides: list[str]) -> tuple[Pretrained, Config]:
    """The model (an export, or a checkpoint exported on the fly) and its config with the overrides applied."""
    if "://" not in ckpt and not Path(ckpt).exists():
        raise UsageError(f"ckpt={ckpt} does not exist")
    with tempfile.TemporaryDirectory(prefix="prime_sample_") as tmp:
        try:
            folder = export_folder(ckpt, tmp, weights)
        except CheckpointError as e:
            raise UsageError(f"ckpt={ckpt} is neither an export (model.safetensors) nor a checkpoint: {e}") from None
        return from_pretrained(str(folder), device), load_config([f"config={folder / 'config.yaml'}", *overrides])


def prompt_tokens(args: dict[str, str], pre: Pretrained, cfg: Config) -> Optional[torch.Tensor]:
    if "prompt" in args:
        if pre.tokenizer is None:
            kind = pre.dataset.get("kind") or pre.dataset.get("source") or "unknown"
            raise UsageError(f"prompt=TEXT needs a tokenizer, and this model's data ({kind}) has none: give token "
                             "ids with prompt_ids=I,J,...")
        ids = pre.tokenizer.encode(args["prompt"])
    elif "prompt_ids" in args:
        try:
            ids = [int(x) for x in args["prompt_ids"].split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"prompt_ids must be comma-separated integers, got {args['prompt_ids']!r}") from None
        bad = [i for i in ids if not 0 <= i < cfg.data.vocab_size]
        if bad:
            raise UsageError(f"prompt_ids {bad[:5]} lie outside [0, {cfg.data.vocab_size})")
    else:
        return None
    if not ids:
        raise UsageError("the prompt is empty")
    if len(ids) >= cfg.data.seq_len:
        raise UsageError(f"the prompt is {len(ids)} tokens, but the model makes sequences of data.seq_len="
                         f"{cfg.data.seq_len}: at most {cfg.data.seq_len - 1} prompt tokens leave something to "
                         "generate")
    return torch.tensor(ids, dtype=torch.long)


def run(argv: list[str]) -> dict:
    """Sample, write the files, print the report; returns the run's facts."""
    args, overrides = parse_args(argv)
    device = args.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pre, cfg = load(args["ckpt"], args.get("weights", "auto"), device, overrides)
    model = pre.model
    prompt = prompt_tokens(args, pre, cfg)
    num = args.get("num", cfg.sample.num_samples)
    # batch= or the run's eval.batch_size; 0 (the default): the largest batch whose sampling step fits
    # eval.memory_mb (prime_scale.memory), at most num
    batch, seed = args.get("batch") or min(num, sample_batch_size(cfg, *placement(model))), args.get("seed", 0)
    prompt_len = 0 if prompt is None else len(prompt)

    tokens, batches, idle_steps, start_time = [], [], [], time.perf_counter()
    for start in tqdm(range(0, num, batch), desc="batches", unit="batch", disable=num <= batch, file=sys.stderr):
        count = min(batch, num - start)
        try:
            out = sample_with_config(cfg, model, model.codec, count, seed + start, device, prompt)
        except ValueError as e:  # options the sampler refuses for this model (e.g. correctors with genmd4)
            raise UsageError(str(e)) from None
        tokens.append(out.tokens.cpu())
        idle_steps += out.idle_steps.tolist()
        batches += [(seed + start, out)] * count
    wall = time.perf_counter() - start_time
    tokens = torch.cat(tokens)
    generated = num * (cfg.data.seq_len - prompt_len)
    facts = {"nfe": sum(o.nfe for _, o in batches) / num,
             "corrector_nfe": sum(o.corrector_nfe for _, o in batches) / num, "steps": batches[0][1].steps,
             "idle_ratio": sum(idle_steps) / (num * batches[0][1].steps),
             "seed": seed, "num": num, "batch": batch, "seq_len": cfg.data.seq_len,
             "prompt_tokens": prompt_len, "objective": cfg.model.objective, **sample_kwargs(cfg.sample),
             "wall_s": wall, "tokens_per_s": generated / wall, "model_step": pre.info.get("step"),
             "weights": pre.info.get("weights"), "checkpoint": pre.info.get("checkpoint")}

    out_path = Path(args.get("out", "samples.jsonl"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    texts = pre.detokenize(tokens) if pre.tokenizer is not None else None
    prompt_text = pre.detokenize([prompt])[0] if texts is not None and prompt is not None else ""
    with out_path.open("w") as f:
        for i, row in enumerate(tokens):
            record = {"index": i, "tokens": row.tolist()}
            if texts is not None:
                completion = pre.detokenize([row[prompt_len:]])[0]
                record.update(text=texts[i], prompt=prompt_text, completion=completion)
            batch_seed, out = batches[i]
            record.update({**facts, "nfe": out.nfe, "corrector_nfe": out.corrector_nfe, "batch_seed": batch_seed,
                           "idle_steps": idle_steps[i]})
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    grid = save_sample_grid(pre.dataset, tokens, out_path.with_suffix(".png"))
    facts.update(samples=str(out_path), grid=str(grid) if grid is not None else None)
    report(facts, cfg, texts)
    return facts


def report(facts: dict, cfg: Config, texts: Optional[list[str]]) -> None:
    how = "left to right, one call per generated token" if facts["objective"] == "ar" else \
        f"{cfg.sample.time_schedule} time grid"
    corrector = f" ({facts['corrector_nfe']:.1f} in corrector moves)" if facts["corrector_nfe"] else ""
    print(f"[prime_scale] {facts['num']} samples x {facts['seq_len']} tokens ({facts['prompt_tokens']} prompt), "
          f"weights of step {facts['model_step']} ({facts['weights']})")
    print(f"  steps      : {facts['steps']} ({how})")
    print(f"  NFE        : {facts['nfe']:.1f} per sequence{corrector}; idle steps {100 * facts['idle_ratio']:.1f}% "
          f"of {facts['steps']} (steps at which a sequence did not change)")
    print(f"  sampler    : temperature {facts['temperature']}, top_p {facts['top_p']}, float64 {facts['float64']}, "
          f"seed {facts['seed']}")
    print(f"  wall time  : {facts['wall_s']:.2f} s, {facts['tokens_per_s']:,.0f} generated tokens/s")
    print(f"  samples    : {facts['samples']}")
    if facts["grid"]:
        print(f"  grid       : {facts['grid']}")
    if texts:
        shown = texts[0].replace("\n", "\\n")
        print(f"  sample 0   : {shown[:200]}{' ...' if len(shown) > 200 else ''}")


def main(argv: Optional[list[str]] = None) -> int:
    """Exit status 0: sampled; 2: a usage error (a bad argument, a missing or unreadable ckpt, a prompt the model
    cannot take), before anything is drawn."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(usage())
        return EXIT_OK

    def sample() -> int:
        run(argv)
        return EXIT_OK

    return guarded(sample, "python -m prime_scale.sample", usage=(CheckpointError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
