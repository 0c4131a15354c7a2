"""The end-to-end job: data prep -> training -> evaluation -> samples, for one resolved config.

``python launchers/local.py config=demo`` runs it. Everything a run produces lands in ``run.out_dir/run.name``:
the resolved ``config.yaml``, ``metrics.jsonl``, ``model.pt`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from prime_scale.config import Config, save_config
from prime_scale.data.markov import MarkovChain, load_markov_chain
from prime_scale.data.shards import read_manifest, read_token_shards
from prime_scale.evaluate import EvalResult, evaluate_nelbo
from prime_scale.sampler import sample
from prime_scale.schedules import make_schedule
from prime_scale.train import train


def prepare_data(cfg: Config) -> dict:
    """Run the data-prep job the source needs (idempotent) and return the dataset's manifest."""
    if cfg.data.source == "markov":
        from data_prep.synthetic import prepare_markov

        return prepare_markov(cfg)
    try:
        return read_manifest(cfg.data.path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no prepared shards at {cfg.data.path!r} (manifest.json missing): run data prep first"
        ) from None


def load_split(cfg: Config, manifest: dict, split: str) -> torch.Tensor:
    sequences = read_token_shards(cfg.data.path, split)
    if sequences.ndim != 2 or len(sequences) == 0:
        raise ValueError(f"split {split!r} at {cfg.data.path!r} holds no sequences")
    if sequences.shape[1] < cfg.data.seq_len:
        raise ValueError(
            f"sequences at {cfg.data.path!r} hold {sequences.shape[1]} tokens, fewer than data.seq_len="
            f"{cfg.data.seq_len}: prepare the data again with this seq_len or lower data.seq_len"
        )
    if int(sequences.max()) >= cfg.data.vocab_size:
        raise ValueError(
            f"split {split!r} holds token id {int(sequences.max())} >= data.vocab_size={cfg.data.vocab_size}"
        )
    return torch.from_numpy(np.ascontiguousarray(sequences[:, : cfg.data.seq_len])).long()


def run(cfg: Config, progress: bool = True) -> dict:
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    print(f"[prime_scale] run dir: {run_dir}")

    manifest = prepare_data(cfg)
    train_seqs, val_seqs = load_split(cfg, manifest, "train"), load_split(cfg, manifest, "val")
    chain: Optional[MarkovChain] = load_markov_chain(cfg.data.path) if cfg.data.source == "markov" else None
    true_entropy = chain.sequence_entropy_per_token(cfg.data.seq_len) if chain else None
    print(
        f"[prime_scale] data: {len(train_seqs)} train / {len(val_seqs)} val sequences of {cfg.data.seq_len} tokens, "
        f"C={cfg.data.vocab_size}"
        + (f", true entropy {true_entropy:.4f} nats/token" if true_entropy is not None else "")
    )

    def report(step: int, result: EvalResult) -> None:
        line = f"[prime_scale] step {step}: val NELBO {result.nelbo_per_token:.4f} ± {result.stderr:.4f} nats/token"
        if true_entropy is not None:
            line += f" (true entropy {true_entropy:.4f}, gap {result.nelbo_per_token - true_entropy:+.4f})"
        tqdm.write(line)  # keeps the line clear of the progress bar

    result = train(cfg, train_seqs, val_seqs, run_dir=run_dir, on_eval=report, progress=progress)
    model = result.model
    codec = model.codec
    print(
        f"[prime_scale] trained {model.num_params():,} parameters for {cfg.train.steps} steps in "
        f"{result.seconds:.0f}s (l={codec.num_subtokens}, b={codec.base}, {codec.num_codes - codec.vocab_size} invalid codes)"
    )
    torch.save({"model": model.state_dict(), "config": json.loads(json.dumps(_config_dict(cfg)))}, run_dir / "model.pt")

    final = evaluate_nelbo(model, val_seqs, cfg, seed=cfg.train.seed + 1)
    samples = draw_samples(cfg, model, val_seqs)
    summary = {
        "val": final.as_dict(),
        "true_entropy_per_token": true_entropy,
        "entropy_rate": chain.entropy_rate() if chain else None,
        "sampling": {"steps": cfg.sample.steps, "nfe": samples["nfe"], "calls": samples["calls"]},
        "train_seconds": result.seconds,
        "num_params": model.num_params(),
    }
    if chain is not None:
        nll = -chain.log_prob(samples["tokens"].numpy()) / cfg.data.seq_len
        summary["sample_nll_under_source"] = float(nll.mean())
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(cfg, final, true_entropy, chain, samples, summary)
    return summary


def draw_samples(cfg: Config, model, val_seqs: torch.Tensor) -> dict:
    device = next(model.parameters()).device
    prompt = val_seqs[: cfg.sample.num_samples, : cfg.sample.prompt_len] if cfg.sample.prompt_len else None
    model.eval()
    out = sample(
        model, model.codec, make_schedule(cfg.diffusion), cfg.sample.num_samples, cfg.data.seq_len,
        cfg.sample.steps, torch.Generator(device=device).manual_seed(cfg.train.seed + 2), device=device,
        prompt=prompt, float64=cfg.sample.float64, time_conditioned=cfg.model.time_conditioning,
    )
    return {"tokens": out.tokens.cpu(), "nfe": out.nfe, "calls": out.calls}


def print_summary(cfg, final: EvalResult, true_entropy, chain, samples, summary) -> None:
    print("\n=== prime_scale summary ===")
    print(f"validation NELBO : {final.nelbo_per_token:.4f} ± {final.stderr:.4f} nats/token "
          f"({final.sequences} sequences, {final.tokens} tokens, '{final.estimator}' estimator)")
    print(f"validation PPL   : {final.ppl:.3f}  (= exp(NELBO per token))")
    if true_entropy is not None:
        print(f"true entropy     : {true_entropy:.4f} nats/token  -> PPL {math.exp(true_entropy):.3f} "
              f"(entropy rate {chain.entropy_rate():.4f}); the bound is above it by "
              f"{final.nelbo_per_token - true_entropy:+.4f}")
    print(f"samples          : {cfg.sample.num_samples} x {cfg.data.seq_len} tokens, {cfg.sample.steps} steps, "
          f"NFE {samples['nfe']:.1f} per sequence")
    if "sample_nll_under_source" in summary:
        print(f"sample NLL under the true source: {summary['sample_nll_under_source']:.4f} nats/token "
              f"(data: {true_entropy:.4f})")
    for i, row in enumerate(samples["tokens"][: cfg.sample.num_samples]):
        shown = " ".join(str(int(t)) for t in row[:24])
        print(f"  sample {i}: {shown}{' ...' if len(row) > 24 else ''}")


def _config_dict(cfg: Config) -> dict:
    from prime_scale.config import config_to_dict

    return config_to_dict(cfg)
