"""Consolidate a (ZeRO-sharded) checkpoint into one safetensors file plus its config.

    python -m prime_scale.export ckpt=URL out=DIR [weights=ema|trained]

``ckpt`` is a checkpoint folder (``.../checkpoints/step_00001000``) or a run's checkpoint folder (its latest is
taken), on any fsspec URL. ``out`` gets ``model.safetensors`` (fp32 tensors, keys of PrimeTransformer's
state_dict), ``config.yaml`` (the run's resolved config) and ``export.json`` (where it came from). ``weights=ema``
(the default when the run kept an EMA) exports the averaged weights. safetensors holds tensors only, so loading
the export never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from prime_scale.checkpoint import CheckpointError, CheckpointStore, resolve_resume
from prime_scale.config import config_from_dict, save_config
from prime_scale.model import PrimeTransformer


def consolidated_state_dict(store: CheckpointStore, tag: str, weights: str = "auto") -> tuple[dict, dict, str]:
    """(fp32 state_dict, the run's config dict, which weights) from any ZeRO stage and world size."""
    manifest = store.manifest(tag)
    if manifest is None:
        raise CheckpointError(f"{store.url}/{tag} is not a complete checkpoint")
    cfg = config_from_dict(manifest["config"])
    model = PrimeTransformer.from_config(cfg)
    names = [name for name, _ in model.named_parameters()]
    shapes = {name: p.shape for name, p in model.named_parameters()}
    rank0 = store.rank_state(tag, 0) or {}
    if weights == "auto":
        weights = "ema" if "ema" in rank0 else "trained"
    if weights == "ema":
        if "ema" not in rank0:
            raise CheckpointError(f"{store.url}/{tag} holds no EMA (the run had engine.ema_decay=0)")
        if rank0["ema"]["partitioned"]:  # ZeRO-3: each rank averaged its flat slice of every parameter
            parts = [store.rank_state(tag, r)["ema"]["shadow"] for r in range(manifest["world_size"])]
            shadow = [torch.cat([p[i] for p in parts])[: shapes[n].numel()].view(shapes[n])
                      for i, n in enumerate(names)]
        else:
            shadow = rank0["ema"]["shadow"]
        return dict(zip(names, (s.float() for s in shadow))), manifest["config"], weights
    with store._local(tag) as local:
        if manifest["zero_stage"] == 0:
            module = torch.load(os.path.join(local, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
        else:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed narrates on stdout; stdout is for our report
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                module = get_fp32_state_dict_from_zero_checkpoint(local, tag=tag)
    state = {k: v.float() for k, v in module.items() if k in shapes}
    missing = set(names) - set(state)
    if missing:
        raise CheckpointError(f"{store.url}/{tag} lacks parameters {sorted(missing)[:5]}")
    return state, manifest["config"], weights


def export(ckpt: str, out: str, weights: str = "auto") -> Path:
    from safetensors.torch import save_file

    found = resolve_resume(CheckpointStore(ckpt), ckpt)
    if found is None:
        raise CheckpointError(f"no checkpoint at {ckpt}")
    store, tag = found
    state, config, used = consolidated_state_dict(store, tag, weights)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    save_config(config_from_dict(config), out_dir / "config.yaml")
    manifest = store.manifest(tag)
    (out_dir / "export.json").write_text(json.dumps(
        {"checkpoint": f"{store.url}/{tag}", "step": manifest["step"], "weights": used,
         "zero_stage": manifest["zero_stage"], "world_size": manifest["world_size"],
         "parameters": sum(v.numel() for v in state.values())}, indent=2) + "\n")
    return out_dir


def load_exported(folder: str) -> PrimeTransformer:
    """A PrimeTransformer with exported weights, on the CPU, without DeepSpeed."""
    from safetensors.torch import load_file

    from prime_scale.config import load_config

    cfg = load_config([f"config={Path(folder) / 'config.yaml'}"])
    model = PrimeTransformer.from_config(cfg)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    unknown = set(args) - {"ckpt", "out", "weights"}
    if "ckpt" not in args or "out" not in args or unknown or args.get("weights", "auto") not in ("auto", "ema",
                                                                                                 "trained"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        out = export(args["ckpt"], args["out"], args.get("weights", "auto"))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(json.loads((out / "export.json").read_text()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
