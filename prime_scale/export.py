"""Consolidate a (ZeRO-sharded) checkpoint into one safetensors file plus its config.

    python -m prime_scale.export ckpt=URL out=DIR [weights=ema|trained]

``ckpt`` is a checkpoint folder (``.../checkpoints/step_00001000``) or a run's checkpoint folder (its latest is
taken), on any fsspec URL. ``out`` gets ``model.safetensors`` (fp32 tensors, keys of PrimeTransformer's
state_dict), ``config.yaml`` (the run's resolved config), ``export.json`` (where it came from), and from the
dataset the run trained on ``dataset.json`` (its manifest: text or image, image size, tokenizer facts) and the
tokenizer file it names (text: ``tokenizer.model`` or ``tokenizer.json``). ``weights=ema`` (the default when the run kept an EMA) exports the averaged weights.
safetensors holds tensors only, so loading the export never unpickles anything.

``prime_scale.from_pretrained(DIR)`` loads an export for sampling and evaluation, without DeepSpeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from prime_scale.checkpoint import CheckpointError, CheckpointStore, resolve_resume, safe_load
from prime_scale.cli import EXIT_OK, Key, UsageError, guarded, keys_help, parse_keys, wants_help
from prime_scale.config import Config, config_from_dict, save_config
from prime_scale.data.tokenizer import Tokenizer, entry_file
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
    buffer_names = [k for k in model.state_dict() if k not in shapes]  # persistent buffers: codec.permutation
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
        state = dict(zip(names, (s.float() for s in shadow)))
        return {**state, **_saved_buffers(store, tag, buffer_names)}, manifest["config"], weights
    with store._local(tag) as local:
        if manifest["zero_stage"] == 0:
            module = _module_states(local, tag)
        else:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed narrates on stdout; stdout is for our report
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                module = get_fp32_state_dict_from_zero_checkpoint(local, tag=tag)
    state = {k: v.float() for k, v in module.items() if k in shapes}
    missing = set(names) - set(state)
    if missing:
        raise CheckpointError(f"{store.url}/{tag} lacks parameters {sorted(missing)[:5]}")
    return {**state, **_saved_buffers(store, tag, buffer_names, module)}, manifest["config"], weights


def _module_states(local: str, tag: str) -> dict:
    """Rank 0's module states (ZeRO-3 names the file per rank; its parameters are empty there, buffers whole).
    DeepSpeed's own pickle, read by safe_load (no code runs from it); tensors to the CPU whatever device trained
    them."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = os.path.join(local, tag, name)
        if os.path.exists(path):
            return safe_load(path)["module"]
    raise CheckpointError(f"{tag} holds no DeepSpeed model states file")


def _saved_buffers(store: CheckpointStore, tag: str, names: list[str], module: Optional[dict] = None) -> dict:
    """The persistent buffers as the checkpoint saved them (whole at every ZeRO stage): the permutation the
    weights were trained with, not one rebuilt from the seed. ``module``: states already read, if they hold them."""
    if not names:
        return {}
    if module is None or not all(k in module for k in names):
        with store._local(tag) as local:
            module = _module_states(local, tag)
    missing = [k for k in names if k not in module]
    if missing:
        raise CheckpointError(f"{store.url}/{tag} lacks buffers {missing}")
    return {k: module[k] for k in names}


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
    cfg = config_from_dict(config)
    save_config(cfg, out_dir / "config.yaml")
    _copy_dataset_files(cfg.data.path, out_dir)
    manifest = store.manifest(tag)
    (out_dir / "export.json").write_text(json.dumps(
        {"checkpoint": f"{store.url}/{tag}", "step": manifest["step"], "weights": used,
         "zero_stage": manifest["zero_stage"], "world_size": manifest["world_size"],
         "parameters": sum(v.numel() for v in state.values() if v.is_floating_point())}, indent=2) + "\n")
    return out_dir


def export_folder(location: str, tmp: str, weights: str = "auto") -> Path:
    """The export behind ``location``: an export folder (model.safetensors + config.yaml) or a run folder's
    export/; otherwise a checkpoint folder, a run's checkpoints/ folder or a run folder holding checkpoints/,
    exported into ``tmp`` with ``weights``. CheckpointError when it is none of these."""
    for folder in (Path(location), Path(location) / "export"):
        if (folder / "model.safetensors").is_file() and (folder / "config.yaml").is_file():
            return folder
    runs_checkpoints = Path(location) / "checkpoints"
    candidates = [location] + ([str(runs_checkpoints)] if runs_checkpoints.is_dir() else [])
    for i, ckpt in enumerate(candidates):
        try:
            return export(ckpt, tmp, weights)
        except (CheckpointError, FileNotFoundError, NotADirectoryError) as e:
            if i == len(candidates) - 1:
                raise CheckpointError(str(e)) from None


def _copy_dataset_files(data_url: str, out_dir: Path) -> None:
    """The dataset's manifest and tokenizer, so an export decodes its samples wherever it is copied to. A run on
    data that has since moved still exports (its samples are then token ids only)."""
    import fsspec

    from prime_scale.data.shards import read_manifest

    try:
        manifest = read_manifest(data_url)
    except FileNotFoundError:
        print(f"[prime_scale] note: no dataset manifest at {data_url}; the export carries no tokenizer", file=sys.stderr)
        return
    (out_dir / DATASET_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if manifest.get("tokenizer"):
        file = entry_file(manifest["tokenizer"])
        with fsspec.open(f"{data_url.rstrip('/')}/{file}", "rb") as f:
            (out_dir / file).write_bytes(f.read())


DATASET_FILE = "dataset.json"


@dataclass
class Pretrained:
    """An exported model, ready to sample and score: the network, its config, and the dataset's facts."""

    model: PrimeTransformer
    config: Config
    dataset: dict[str, Any]  # the training data's manifest ({} if the export has none)
    info: dict[str, Any]  # export.json: checkpoint, step, which weights
    tokenizer: Optional[Tokenizer] = None  # the dataset's tokenizer, for text data

    def detokenize(self, tokens) -> list[str]:
        """Token id rows -> text (needs the dataset's tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("this export has no tokenizer (its data was not text prepared by data_prep.text)")
        return [self.tokenizer.decode(row) for row in tokens]


def load_exported(folder: str, cfg: Optional[Config] = None) -> PrimeTransformer:
    """A PrimeTransformer with exported weights, on the CPU, without DeepSpeed."""
    from safetensors.torch import load_file

    from prime_scale.config import load_config

    cfg = cfg or load_config([f"config={Path(folder) / 'config.yaml'}"])
    model = PrimeTransformer.from_config(cfg)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model.eval()


def from_pretrained(folder: str, device: str = "cpu") -> Pretrained:
    """Load ``python -m prime_scale.export`` output: model (eval mode, on ``device``), config, dataset facts and
    tokenizer. No DeepSpeed, no pickles."""
    from prime_scale.config import load_config

    path = Path(folder)
    if not (path / "model.safetensors").is_file() or not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{folder} is not an export (model.safetensors and config.yaml expected); make one "
                                "with python -m prime_scale.export ckpt=URL out=DIR")
    read = lambda name: json.loads((path / name).read_text()) if (path / name).is_file() else {}  # noqa: E731
    dataset = read(DATASET_FILE)
    entry = dataset.get("tokenizer")
    tokenizer = None
    if entry and (path / entry_file(entry)).is_file():
        tokenizer = Tokenizer.from_dataset(str(path), entry)
    cfg = load_config([f"config={path / 'config.yaml'}"])
    return Pretrained(model=load_exported(folder, cfg).to(device), config=cfg, dataset=dataset,
                      info=read("export.json"), tokenizer=tokenizer)


KEYS = (
    Key("ckpt", "a checkpoint folder (.../checkpoints/step_00001000) or a run's checkpoint folder (its latest), on "
        "any fsspec URL", required=True),
    Key("out", "the export folder to write", required=True),
    Key("weights", "ema: the averaged weights (the default when the run kept an EMA) | trained", "auto",
        choices=("auto", "ema", "trained")),
)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0: exported (export.json printed); 2: a usage error, or a ckpt that is missing or cannot be
    exported (not a complete checkpoint, a file that is not safe to load), before anything is written."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(f"{__doc__}\nKeys:\n{keys_help(KEYS)}")
        return EXIT_OK

    def run() -> int:
        args = parse_keys(argv, KEYS)
        if "://" not in args["ckpt"] and not Path(args["ckpt"]).exists():
            raise UsageError(f"ckpt={args['ckpt']} does not exist")
        try:
            out = export(args["ckpt"], args["out"], args["weights"])
        except CheckpointError as e:
            raise UsageError(f"cannot export ckpt={args['ckpt']}: {e}") from None
        print(json.dumps(json.loads((out / "export.json").read_text()), indent=2))
        return EXIT_OK

    return guarded(run, "python -m prime_scale.export")


if __name__ == "__main__":
    sys.exit(main())
