"""The reference of tests/test_export.py: a DeepSpeed engine built from a run's config.yaml exactly as training
builds it, that loaded the run's latest checkpoint from disk with the engine's own ``restore``; its logits (and
weights) on fixed inputs are saved for the export to match.

    torchrun --nproc_per_node 2 tests/engine_logits.py RUN_DIR OUT.pt [key=value ...]

With training arguments, every rank first trains (``python -m prime_scale.engine``'s main) and then builds the
reference engine, in the same launch: the start-up of torchrun, Python, torch and DeepSpeed is paid once. One rank
calls ``engine_logits`` in the test's own process.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from prime_scale.checkpoint import CheckpointStore, resolve_resume
from prime_scale.config import load_config
from prime_scale.run_context import RunContext
from prime_scale.trainer import Geometry, build_engine, restore


def engine_logits(run_dir: str, out: str) -> None:
    """Save (rank 0) the reference engine's logits on 4 fixed inputs, the inputs and its weights to ``out``."""
    cfg = load_config([f"config={run_dir}/config.yaml"])
    with RunContext("cpu") as ctx:  # alone: a one-rank group for this engine; under torchrun: the launch's group
        geo = Geometry.of(cfg, ctx)
        engine, _ = build_engine(cfg, geo)
        store = CheckpointStore(f"{run_dir}/checkpoints", ctx.rank, ctx.world_size)
        restore(engine, None, *resolve_resume(store, "auto"), False, geo, ctx.rank)
        engine.eval()
        codec = engine.module.codec
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(cfg.data.vocab_size, (4, cfg.data.seq_len), generator=g)
        clean = codec.encode(tokens)
        digits = clean.masked_fill(torch.rand(clean.shape, generator=g) < 0.5, codec.mask_id)
        rate = torch.full((4,), 0.5)
        with torch.no_grad():
            logits = engine(digits, rate, causal=cfg.model.objective == "ar")
        if ctx.rank == 0:
            torch.save({"tokens": tokens, "clean": clean, "digits": digits, "rate": rate, "logits": logits,
                        "state": {k: v.clone() for k, v in engine.module.state_dict().items()}}, out)
        del engine  # freed before the group it uses is destroyed (the context collects the cycles it sits in)


def main(run_dir: str, out: str, train_args: list[str]) -> None:
    from prime_scale import engine

    # The group both use, made first: the training leaves a group it did not make, and a group cannot be made
    # again over torchrun's rendezvous.
    with RunContext("cpu"):
        if train_args:
            status = engine.main(train_args)
            assert status == 0, f"the training exited {status}"
        engine_logits(run_dir, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
