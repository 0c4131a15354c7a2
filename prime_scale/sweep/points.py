"""Expansion: a ``SweepSpec`` into its ``Point``s (families x settings x seeds; isoFLOP: families x budgets x sizes x
seeds), each with a stable id, its complete engine command line and its N, D, C (``model_size`` builds the model on
the meta device). A pure function of the spec, the command line's overrides and the config files."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from prime_scale.config import Config, ConfigError, closest, config_to_dict, load_config
from prime_scale.sweep.spec import SweepError, SweepSpec, parse_overrides

DEFAULT_OUT = "runs/sweeps"
ROUNDING_TOLERANCE = 0.10  # isoFLOP: warn when the rounded steps move C more than this off the budget
# short names of common keys in point ids; any other key is named by its last part
SLUG_ALIASES = {"model.n_layer": "L", "model.d_model": "d", "model.n_head": "h", "train.steps": "s",
                "train.batch_size": "bs", "data.seq_len": "T", "prime.num_subtokens": "l", "train.lr": "lr",
                "model.mlp_ratio": "mlp", "train.seed": "seed"}


@dataclass(frozen=True)
class Point:
    """One training run of a sweep, with the numbers a scaling fit needs."""

    sweep: str
    id: str
    family: str
    seed: int
    settings: tuple[tuple[str, str], ...]  # the point's own settings (grid / points / size), as in its id
    overrides: tuple[str, ...]  # the complete engine command line: config=BASE key=value ...
    run_dir: str  # OUT/SWEEP/ID
    steps: int
    batch_size: int
    seq_len: int
    N: int  # non-embedding parameters: model.num_params(include_embedding=False)
    N_total: int  # all parameters
    flops_per_token: float  # training FLOPs per token (prime_scale.metrics.flops_per_token)
    D: int  # training tokens: steps x batch_size x seq_len
    C: float  # training FLOPs: flops_per_token x D
    budget: Optional[float] = None  # isoFLOP mode: the budget this point was sized for
    warnings: tuple[str, ...] = ()

    def config(self) -> Config:
        return load_config(list(self.overrides))


def _slug_value(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text.strip()).strip("_") or "empty"


def _labels(keys: Iterable[str]) -> dict[str, str]:
    """Short labels of the keys a sweep varies: an alias or the key's last part; the section too when two collide."""
    keys = sorted(set(keys))
    labels = {k: SLUG_ALIASES.get(k, k.split(".")[-1]) for k in keys}
    clash = {lab for lab in labels.values() if list(labels.values()).count(lab) > 1}
    return {k: (k.replace(".", "_") if labels[k] in clash else labels[k]) for k in keys}


def format_budget(c: float) -> str:
    """1e11 -> '1e11', 1.5e+18 -> '1.5e18'."""
    mant, _, exp = f"{c:.3g}".partition("e")
    return f"{mant}e{int(exp)}" if exp else mant


def point_id(family: str, settings: Sequence[tuple[str, str]], labels: dict[str, str], seed: int,
             budget: Optional[float] = None) -> str:
    parts = [f"{labels[k]}{_slug_value(v)}" for k, v in sorted(settings)]
    if budget is not None:
        parts.append(f"C{format_budget(budget)}")
    return "-".join([family, *(["_".join(parts)] if parts else []), f"seed{seed}"])


def _settings(spec: SweepSpec) -> list[tuple[tuple[str, str], ...]]:
    """The per-point settings of the grid or points mode (one empty setting without either)."""
    if spec.grid:
        keys = [k for k, _ in spec.grid]
        return [tuple(zip(keys, combo)) for combo in itertools.product(*(v for _, v in spec.grid))]
    if spec.points:
        return list(spec.points)
    return [()]


_SIZE_CACHE: dict[str, tuple[int, int, float]] = {}


def model_size(cfg: Config) -> tuple[int, int, float]:
    """(non-embedding parameters, all parameters, training FLOPs per token) of the model ``cfg`` builds. The model is
    built on the meta device (no memory, no initialisation), so a 10B-parameter point costs nothing to plan."""
    import torch

    from prime_scale.metrics import flops_per_token
    from prime_scale.model import PrimeTransformer

    d = config_to_dict(cfg)
    key = json.dumps([d["model"], d["prime"], d["data"]["vocab_size"], d["data"]["seq_len"], d["diffusion"]],
                     sort_keys=True)
    if key not in _SIZE_CACHE:
        try:
            with torch.device("meta"):
                model = PrimeTransformer.from_config(cfg)
        except Exception:  # a module that needs real values at construction: build it on the CPU instead
            model = PrimeTransformer.from_config(cfg)
        _SIZE_CACHE[key] = (model.num_params(include_embedding=False), model.num_params(),
                            float(flops_per_token(model, cfg.data.seq_len)))
    return _SIZE_CACHE[key]


def _load(overrides: Sequence[str], where: str, check_schedule: bool = True) -> Config:
    try:
        return load_config(list(overrides), check_schedule)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None


def expand(spec: SweepSpec, out_dir: str | Path = DEFAULT_OUT, cli_overrides: Sequence[str] = (),
           only: Sequence[str] = ()) -> list[Point]:
    """Every point of the sweep (families x settings x seeds; isoFLOP: families x budgets x sizes x seeds), in a
    stable order, each with its complete engine command line and its N, D, C. ``cli_overrides`` ("key=value") apply
    to every point after the spec's own settings; ``only`` keeps those families."""
    where = spec.path
    cli = parse_overrides(list(cli_overrides), "command line")
    varied = {k for s in _settings(spec) for k, _ in s} | {k for s in (spec.isoflop.sizes if spec.isoflop else ())
                                                          for k, _ in s}
    for key, _ in cli:
        if key in varied:
            raise SweepError(f"command line: {key} is varied by the sweep's points; it cannot be set for all of them")
        if key == "train.seed" and spec.seeds:
            raise SweepError("command line: train.seed is set by the spec's seeds:")
        if key == "train.steps" and spec.isoflop:
            raise SweepError("command line: train.steps is computed from the budget in isoFLOP mode")
    unknown = [f for f in only if f not in spec.family_names]
    if unknown:
        best = closest(unknown[0], spec.family_names)
        hint = f" (did you mean '{best}'?)" if best else ""
        raise SweepError(f"unknown family '{unknown[0]}'{hint}; the sweep has {', '.join(spec.family_names)}")
    families = [(n, o) for n, o in spec.families if not only or n in only]
    out = Path(out_dir).expanduser().resolve()

    if spec.isoflop:
        combos = [(size, b) for b in spec.isoflop.budgets for size in spec.isoflop.sizes]
    else:
        combos = [(s, None) for s in _settings(spec)]
    labels = _labels(k for s, _ in combos for k, _ in s)
    base_words = [f"config={spec.base}", *(f"{k}={v}" for k, v in spec.overrides)]
    points: list[Point] = []
    seen: dict[str, str] = {}
    for family, fov in families:
        for settings, budget in combos:
            words = [*base_words, *(f"{k}={v}" for k, v in fov), *(f"{k}={v}" for k, v in settings),
                     *(f"{k}={v}" for k, v in cli)]
            seeds = spec.seeds or (None,)
            for seed in seeds:
                pwords = words + ([f"train.seed={seed}"] if seed is not None else [])
                provisional = f"{family} {dict(settings)}" + (f" budget {budget:g}" if budget else "")
                # the point's warmup is clamped to its steps below: the final load checks the schedule
                cfg = _load(pwords, f"{where}: point {provisional}", check_schedule=False)
                seed_value = cfg.train.seed
                pid = point_id(family, settings, labels, seed_value, budget)
                if pid in seen:
                    raise SweepError(f"{where}: two points have the id '{pid}' ({seen[pid]} and {provisional}): "
                                     "a point is listed twice")
                seen[pid] = provisional
                n, n_total, fpt = model_size(cfg)
                tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
                warnings: list[str] = []
                extra: list[str] = []
                if budget is not None:
                    exact = budget / fpt / tokens_per_step
                    steps = max(1, round(exact))
                    achieved = fpt * steps * tokens_per_step
                    if abs(achieved / budget - 1) > ROUNDING_TOLERANCE:
                        warnings.append(f"{pid}: {exact:.3g} steps rounded to {steps} give C = {achieved:.3g}, "
                                        f"{100 * (achieved / budget - 1):+.0f}% off the budget {budget:.3g}")
                    extra.append(f"train.steps={steps}")
                else:
                    steps = cfg.train.steps
                warmup = min(cfg.train.warmup_steps, int(spec.max_warmup_fraction * steps))
                extra += [f"train.warmup_steps={warmup}", f"train.eval_every={steps}",
                          f"run.name={spec.name}/{pid}", f"run.out_dir={out}", "ckpt.resume=auto"]
                if cfg.ckpt.dir:  # one checkpoint folder per point under a shared checkpoint URL
                    extra.append(f"ckpt.dir={cfg.ckpt.dir.rstrip('/')}/{spec.name}/{pid}")
                final = _load(pwords + extra, f"{where}: point {pid}")
                D = steps * tokens_per_step
                points.append(Point(
                    sweep=spec.name, id=pid, family=family, seed=seed_value, settings=tuple(settings),
                    overrides=tuple(pwords + extra), run_dir=str(out / spec.name / pid), steps=steps,
                    batch_size=final.train.batch_size, seq_len=final.data.seq_len, N=n, N_total=n_total,
                    flops_per_token=fpt, D=D, C=fpt * D, budget=budget, warnings=tuple(warnings)))
    return points
