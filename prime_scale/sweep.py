"""Sweep specs (``prime_scale/configs/sweeps/NAME.yaml``, package data): a base config, model families and a grid
of points, expanded into one engine run per point with its parameter count N, training tokens D and training FLOPs C.

``python -m prime_scale.launch.sweep sweep=NAME`` runs them (docs/scaling.md, "Running a sweep"). A spec::

    base: text_demo                  # a config name from prime_scale/configs/, or a path relative to the spec
    overrides: [data.seq_len=64]     # applied to every point ("key=value" strings, or a mapping)
    families:                        # name -> overrides; every point runs once per family
      mdm: [prime.num_subtokens=1]
      prime_l2: [prime.num_subtokens=2]
    grid:                            # key -> values: the cartesian product ...
      model.d_model: [32, 64]
      train.steps: [50, 100]
    # points: [{model.d_model: 32, train.steps: 50}, ...]      # ... or an explicit list of points
    # isoflop: {budgets: [1e11, 3e11], sizes: [{model.d_model: 32}, ...]}   # ... or compute budgets x sizes
    seeds: [0, 1]                    # sets train.seed (default: the base config's seed)
    max_warmup_fraction: 0.1         # warmup is clamped to this fraction of a point's steps

Every point gets a stable id (``family-slug-seedS``, the slug naming the point's own settings, e.g.
``prime_l2-d64_s100-seed0``), ``run.name=SWEEP/ID``, ``run.out_dir=OUT`` (so its folder is OUT/SWEEP/ID),
``ckpt.resume=auto`` and ``train.eval_every=steps`` (validation once, at the end). N is the *non-embedding*
parameter count, ``model.num_params(include_embedding=False)`` (everything but the sub-token embedding table; the
output head and a Prime merge MLP count); D = steps x batch_size x seq_len tokens; C = flops_per_token x D with
``prime_scale.metrics.flops_per_token`` (matrices applied per token x 6, plus attention; not exactly 6 N).

In isoFLOP mode a point's steps are ``round(C_budget / flops_per_token / (batch_size x seq_len))`` (at least 1),
and a point whose rounded steps move C more than 10% off its budget carries a warning.

Everything above is a pure function of the spec, the overrides and the config files. The rest of the module reads
and writes the markers of a run folder (``done.json``, ``failed.json``, ``attempts.jsonl``), builds the results
table, and defines ``SweepJob``, the SLURM task of a point.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from prime_scale.config import CONFIG_DIR, Config, ConfigError, _closest, _field_types, config_to_dict, load_config, named_yaml
from prime_scale.slurm_job import TrainJob

SWEEP_DIR = CONFIG_DIR / "sweeps"
DEFAULT_OUT = "runs/sweeps"
SPEC_KEYS = ("base", "overrides", "families", "grid", "points", "isoflop", "seeds", "max_warmup_fraction",
             "description")
# set by the sweep for every point; a spec or command line that sets them is refused
RESERVED = ("run.name", "run.out_dir", "ckpt.resume", "train.eval_every")
ROUNDING_TOLERANCE = 0.10  # isoFLOP: warn when the rounded steps move C more than this off the budget
DONE, FAILED, ATTEMPTS = "done.json", "failed.json", "attempts.jsonl"
RESULT_COLUMNS = ("sweep", "id", "family", "seed", "N", "D", "C", "steps", "loss", "loss_stderr", "ppl", "wall_s",
                  "run_url", "status", "flops_per_token")
# short names of common keys in point ids; any other key is named by its last part
SLUG_ALIASES = {"model.n_layer": "L", "model.d_model": "d", "model.n_head": "h", "train.steps": "s",
                "train.batch_size": "bs", "data.seq_len": "T", "prime.num_subtokens": "l", "train.lr": "lr",
                "model.mlp_ratio": "mlp", "train.seed": "seed"}
# config keys that change how a run is executed or logged but not what it computes: a finished point whose saved
# config differs from the spec only in these still counts as the same point
EXECUTION_KEYS = ("run.out_dir", "train.num_threads", "train.device", "train.log_every", "engine.num_workers",
                  "log.", "ckpt.", "sample.")


class SweepError(ConfigError):
    """A sweep spec, override or command line that cannot make a sweep (a ConfigError: exit status 2)."""


@dataclass(frozen=True)
class IsoFlop:
    budgets: tuple[float, ...]  # training FLOPs C per point
    sizes: tuple[tuple[tuple[str, str], ...], ...]  # each a tuple of (key, value) overrides


@dataclass(frozen=True)
class SweepSpec:
    name: str  # the spec file's stem; runs go to OUT/name/ID
    path: str
    base: str  # config name or absolute path of a config file
    overrides: tuple[tuple[str, str], ...] = ()
    families: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()  # key -> values (override text)
    points: tuple[tuple[tuple[str, str], ...], ...] = ()
    isoflop: Optional[IsoFlop] = None
    seeds: tuple[int, ...] = ()  # empty: the base config's train.seed
    max_warmup_fraction: float = 0.1
    description: str = ""

    @property
    def family_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.families)

    @property
    def mode(self) -> str:
        return "isoflop" if self.isoflop else "points" if self.points else "grid"


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


@dataclass
class PointState:
    """What the run folder of a point says about it."""

    status: str  # done | failed | started (a run folder, no marker: interrupted or running) | pending | mismatch
    loss: Optional[float] = None
    loss_stderr: Optional[float] = None
    ppl: Optional[float] = None
    wall_s: Optional[float] = None
    detail: str = ""
    record: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ the spec


def available_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def spec_path(name: str) -> Path:
    """A shipped sweep NAME (prime_scale/configs/sweeps/NAME.yaml) or a path to a .yaml file."""
    return named_yaml(name, SWEEP_DIR, "sweep", error=SweepError)


def load_spec(name: str) -> SweepSpec:
    """Read and check ``prime_scale/configs/sweeps/NAME.yaml`` (or a path)."""
    path = spec_path(name)
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    return parse_spec(d, path.stem, path)


def override_text(key: str, value: Any, where: str) -> str:
    """A YAML value as the text of a ``key=value`` override (which load_config parses back to the same value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value) if not isinstance(value, float) else repr(value)
    raise SweepError(f"{where}: {key} must be a single value (number, string or bool), got {value!r}")


def _check_key(key: Any, where: str) -> str:
    types = _field_types()
    if not isinstance(key, str) or key not in types:
        if key == "config":
            raise SweepError(f"{where}: config= cannot be set here; the base config is the spec's 'base:'")
        best = _closest(str(key), types)
        hint = f"; did you mean '{best}'?" if best else ""
        raise SweepError(f"{where}: unknown config key '{key}'{hint}")
    if key in RESERVED:
        raise SweepError(f"{where}: {key} is set by the sweep for every point and cannot be set here")
    return key


def parse_overrides(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """A list of "key=value" strings, or a mapping {key: value}, as checked (key, text) pairs."""
    if value is None:
        return ()
    pairs: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, v in value.items():
            pairs.append((_check_key(key, where), override_text(key, v, where)))
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, dict):
                pairs.extend(parse_overrides(item, where))
                continue
            if not isinstance(item, str) or "=" not in item:
                raise SweepError(f"{where}: expected 'key=value' strings, got {item!r}")
            key, _, raw = item.partition("=")
            pairs.append((_check_key(key.strip(), where), raw))
    else:
        raise SweepError(f"{where}: expected a list of 'key=value' strings or a mapping, got {value!r}")
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise SweepError(f"{where}: {', '.join(dup)} given more than once")
    return tuple(pairs)


def _number(value: Any, where: str) -> float:
    """A positive finite number; YAML 1.1 reads 1e18 (no dot) as a string, so strings that parse are accepted."""
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or x <= 0:
        raise SweepError(f"{where}: expected a positive number, got {value!r}")
    return x


def parse_spec(d: Any, name: str, path: Path | str = "<spec>") -> SweepSpec:
    """The checked spec from its YAML mapping. Errors name the file and the key."""
    where = str(path)
    if not isinstance(d, dict):
        raise SweepError(f"{where}: expected a mapping with base:, families: and grid:/points:/isoflop:, "
                         f"got {type(d).__name__}")
    for key in d:
        if key not in SPEC_KEYS:
            best = _closest(str(key), SPEC_KEYS)
            hint = f"; did you mean '{best}'?" if best else ""
            raise SweepError(f"{where}: unknown sweep key '{key}'{hint} (keys: {', '.join(SPEC_KEYS)})")
    base = d.get("base")
    if not isinstance(base, str) or not base.strip():
        raise SweepError(f"{where}: base: must name a config (e.g. base: text_demo)")
    base = base.strip()
    if base.endswith((".yaml", ".yml")) or "/" in base:  # a path: relative to the spec file
        base_path = Path(base).expanduser()
        if not base_path.is_absolute() and Path(path).exists():
            base_path = Path(path).resolve().parent / base_path
        base = str(base_path)

    overrides = parse_overrides(d.get("overrides"), f"{where}: overrides")

    fams = d.get("families")
    if fams is None:
        fams = {"default": []}
    if not isinstance(fams, dict) or not fams:
        raise SweepError(f"{where}: families: must map family names to override lists, "
                         "e.g. {mdm: [prime.num_subtokens=1]}")
    families = []
    for fname, fov in fams.items():
        if not isinstance(fname, str) or not re.fullmatch(r"[A-Za-z0-9_]+", fname):
            raise SweepError(f"{where}: family name {fname!r} must be letters, digits and underscores")
        families.append((fname, parse_overrides(fov, f"{where}: families.{fname}")))

    modes = [k for k in ("grid", "points", "isoflop") if d.get(k) is not None]
    if len(modes) > 1:
        raise SweepError(f"{where}: give one of grid:, points: and isoflop:, not {' and '.join(modes)}")

    grid: list[tuple[str, tuple[str, ...]]] = []
    if d.get("grid") is not None:
        g = d["grid"]
        if not isinstance(g, dict) or not g:
            raise SweepError(f"{where}: grid: must map config keys to lists of values")
        for key, values in g.items():
            w = f"{where}: grid.{key}"
            _check_key(key, f"{where}: grid")
            if not isinstance(values, list) or not values:
                raise SweepError(f"{w}: expected a non-empty list of values, got {values!r}")
            texts = tuple(override_text(key, v, w) for v in values)
            if len(set(texts)) != len(texts):
                raise SweepError(f"{w}: repeated values {list(texts)}")
            grid.append((key, texts))

    points: list[tuple[tuple[str, str], ...]] = []
    if d.get("points") is not None:
        if not isinstance(d["points"], list) or not d["points"]:
            raise SweepError(f"{where}: points: must be a non-empty list of mappings {{key: value}}")
        for i, p in enumerate(d["points"]):
            if not isinstance(p, dict):
                raise SweepError(f"{where}: points[{i}]: expected a mapping {{key: value}}, got {p!r}")
            points.append(parse_overrides(p, f"{where}: points[{i}]"))

    isoflop = None
    if d.get("isoflop") is not None:
        iso = d["isoflop"]
        w = f"{where}: isoflop"
        if not isinstance(iso, dict):
            raise SweepError(f"{w}: expected {{budgets: [...], sizes: [...]}}")
        unknown = [k for k in iso if k not in ("budgets", "sizes")]
        if unknown:
            raise SweepError(f"{w}: unknown key '{unknown[0]}' (keys: budgets, sizes)")
        budgets, sizes = iso.get("budgets"), iso.get("sizes")
        if not isinstance(budgets, list) or not budgets:
            raise SweepError(f"{w}.budgets: expected a non-empty list of FLOP budgets, e.g. [1e17, 3e17]")
        if not isinstance(sizes, list) or not sizes:
            raise SweepError(f"{w}.sizes: expected a non-empty list of mappings, e.g. [{{model.d_model: 64}}]")
        parsed_sizes = []
        for i, s in enumerate(sizes):
            if not isinstance(s, dict) or not s:
                raise SweepError(f"{w}.sizes[{i}]: expected a mapping {{key: value}}, got {s!r}")
            pairs = parse_overrides(s, f"{w}.sizes[{i}]")
            if any(k == "train.steps" for k, _ in pairs):
                raise SweepError(f"{w}.sizes[{i}]: train.steps is computed from the budget in isoFLOP mode")
            parsed_sizes.append(pairs)
        isoflop = IsoFlop(tuple(_number(b, f"{w}.budgets[{i}]") for i, b in enumerate(budgets)), tuple(parsed_sizes))
        if len(set(isoflop.budgets)) != len(isoflop.budgets):
            raise SweepError(f"{w}.budgets: repeated budgets {list(isoflop.budgets)}")
        for wh, pairs in [("overrides", overrides), *((f"families.{n}", o) for n, o in families)]:
            if any(k == "train.steps" for k, _ in pairs):
                raise SweepError(f"{where}: {wh}: train.steps is computed from the budget in isoFLOP mode")

    seeds: tuple[int, ...] = ()
    if d.get("seeds") is not None:
        s = d["seeds"]
        if not isinstance(s, list) or not s or not all(isinstance(x, int) and not isinstance(x, bool) for x in s):
            raise SweepError(f"{where}: seeds: expected a non-empty list of integers, got {s!r}")
        if len(set(s)) != len(s):
            raise SweepError(f"{where}: seeds: repeated seeds {s}")
        seeds = tuple(s)
        every = [("overrides", overrides), *((f"families.{n}", o) for n, o in families), *(
            (f"points[{i}]", p) for i, p in enumerate(points)), ("grid", tuple((k, "") for k, _ in grid))]
        for wh, pairs in every:
            if any(k == "train.seed" for k, _ in pairs):
                raise SweepError(f"{where}: {wh}: train.seed is set by seeds:; leave one of them out")

    frac = d.get("max_warmup_fraction", 0.1)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
        raise SweepError(f"{where}: max_warmup_fraction: expected a number in [0, 1], got {frac!r}")
    description = d.get("description", "")
    if not isinstance(description, str):
        raise SweepError(f"{where}: description: expected a string")
    return SweepSpec(name=name, path=str(path), base=base, overrides=overrides, families=tuple(families),
                     grid=tuple(grid), points=tuple(points), isoflop=isoflop, seeds=seeds,
                     max_warmup_fraction=float(frac), description=description)


# ------------------------------------------------------------------------------------------------ expansion


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
        best = _closest(unknown[0], spec.family_names)
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


# ------------------------------------------------------------------------------------------------ run folders


def final_record(run_dir: str | Path, steps: int) -> Optional[dict]:
    """The last validation record of ``metrics.jsonl`` at the final step, or None."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if r.get("step") == steps and "val/nelbo_per_token" in r:
            found = r
    return found


def attempts_wall_s(run_dir: str | Path) -> float:
    path = Path(run_dir) / ATTEMPTS
    if not path.is_file():
        return 0.0
    total = 0.0
    for line in path.read_text().splitlines():
        try:
            total += float(json.loads(line).get("wall_s", 0.0))
        except (json.JSONDecodeError, TypeError, ValueError):
            continue
    return total


def record_attempt(run_dir: str | Path, wall_s: float, exit_code: Optional[int], where: str) -> None:
    """One line per training attempt of a point (its wall time is summed into the point's wall_s)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / ATTEMPTS, "a") as f:
        f.write(json.dumps({"time": time.time(), "wall_s": wall_s, "exit_code": exit_code, "where": where}) + "\n")


def write_local_json(path: Path, data: dict) -> None:
    """A sweep status file (done.json, failed.json, slurm.json), never half-written and on the disk once written:
    the shards' atomic, durable JSON writer (fsync of the file, rename, fsync of the folder) on the local
    filesystem."""
    import fsspec

    from prime_scale.data.shards import write_json

    write_json(fsspec.filesystem("file"), str(path), data)


def mark_finished(point: Point, where: str) -> PointState:
    """After a training process ended with status 0: write ``done.json`` from the final validation record, or
    ``failed.json`` when there is none. Returns the state."""
    run_dir = Path(point.run_dir)
    record = final_record(run_dir, point.steps)
    wall = attempts_wall_s(run_dir)
    if record is None:
        return mark_failed(point, 0, f"training ended without a validation record at step {point.steps} in "
                                     f"{run_dir / 'metrics.jsonl'}", where)
    (run_dir / FAILED).unlink(missing_ok=True)
    write_local_json(run_dir / DONE, {"id": point.id, "status": "done", "loss": record["val/nelbo_per_token"],
                                 "loss_stderr": record.get("val/stderr"), "ppl": record.get("val/ppl"),
                                 "wall_s": wall, "steps": point.steps, "where": where, "finished": time.time(),
                                 "record": record, "overrides": list(point.overrides)})
    return read_state(point)


def mark_failed(point: Point, exit_code: Optional[int], detail: str, where: str) -> PointState:
    run_dir = Path(point.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_local_json(run_dir / FAILED, {"id": point.id, "status": "failed", "exit_code": exit_code, "detail": detail,
                                   "where": where, "time": time.time()})
    return PointState("failed", detail=detail)


def _identity(d: dict) -> dict:
    flat = {f"{s}.{k}": v for s, body in d.items() if isinstance(body, dict) for k, v in body.items()}
    return {k: v for k, v in flat.items() if not any(k == e or (e.endswith(".") and k.startswith(e))
                                                     for e in EXECUTION_KEYS)}


def config_mismatch(point: Point) -> list[str]:
    """Fields in which the config a point's folder was run with differs from the point's (execution-only keys
    aside): a folder of another sweep definition, whose results must not be mixed in."""
    path = Path(point.run_dir) / "config.yaml"
    if not path.is_file():
        return []
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return [f"{path} is not valid YAML"]
    old, new = _identity(saved), _identity(config_to_dict(point.config()))
    return [f"{k}: run {old.get(k)!r}, spec {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


def read_state(point: Point, check_config: bool = True) -> PointState:
    """The point's state from its run folder: done / failed / started / pending, or mismatch (a run folder made
    with another config)."""
    run_dir = Path(point.run_dir)
    if check_config:
        diff = config_mismatch(point)
        if diff:
            return PointState("mismatch", detail="; ".join(diff[:4]) + (" ..." if len(diff) > 4 else ""))
    done = run_dir / DONE
    if done.is_file():
        try:
            d = json.loads(done.read_text())
            return PointState("done", d.get("loss"), d.get("loss_stderr"), d.get("ppl"), d.get("wall_s"),
                              record=d.get("record", {}))
        except json.JSONDecodeError:
            pass  # a marker cut short: the point is not known to be done
    if (run_dir / FAILED).is_file():
        try:
            detail = json.loads((run_dir / FAILED).read_text()).get("detail", "")
        except json.JSONDecodeError:
            detail = ""
        return PointState("failed", detail=detail, wall_s=attempts_wall_s(run_dir) or None)
    if (run_dir / "metrics.jsonl").is_file() or (run_dir / "checkpoints").is_dir():
        return PointState("started", wall_s=attempts_wall_s(run_dir) or None)
    return PointState("pending")


def results_rows(points: Sequence[Point], states: Sequence[PointState], isoflop: bool = False) -> list[dict]:
    """One row per point with RESULT_COLUMNS (+ ``budget`` in isoFLOP mode); no loss unless it is done."""
    rows = []
    for p, s in zip(points, states):
        row = {"sweep": p.sweep, "id": p.id, "family": p.family, "seed": p.seed, "N": p.N, "D": p.D, "C": p.C,
               "steps": p.steps, "loss": s.loss if s.status == "done" else None,
               "loss_stderr": s.loss_stderr if s.status == "done" else None,
               "ppl": s.ppl if s.status == "done" else None, "wall_s": s.wall_s, "run_url": p.run_dir,
               "status": s.status, "flops_per_token": p.flops_per_token}
        if isoflop:
            row["budget"] = p.budget
        rows.append(row)
    return rows


def write_results(rows: Sequence[dict], folder: str | Path) -> list[Path]:
    """``results.csv`` (always) and ``results.parquet`` (when pyarrow works) in ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0].keys()) if rows else list(RESULT_COLUMNS)
    path = folder / "results.csv"
    tmp = folder / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else repr(r[k]) if isinstance(r[k], float) else r[k])
                        for k in columns})
    tmp.replace(path)
    written = [path]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: [r.get(c) for r in rows] for c in columns})
        pq.write_table(table, folder / "results.parquet")
        written.append(folder / "results.parquet")
    except Exception:  # pyarrow missing or unable to write: the CSV is the table of record
        pass
    return written


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain text table (numbers in a compact form)."""
    def fmt(c: str, v: Any) -> str:
        if v is None or v == "":
            return "-"
        if c in ("C", "flops_per_token", "budget") and isinstance(v, (int, float)):
            return f"{v:.3e}"
        if c in ("N", "D") and isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.1f}" if c == "wall_s" else f"{v:.4f}"
        return str(v)

    cells = [[fmt(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    right = {"N", "D", "C", "steps", "loss", "loss_stderr", "ppl", "wall_s", "seed", "budget", "flops_per_token"}
    def line(values):
        return "  ".join(v.rjust(w) if c in right else v.ljust(w) for c, v, w in zip(columns, values, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


# ------------------------------------------------------------------------------------------------ SLURM task


class SweepJob(TrainJob):
    """A point as a SLURM array task: ``TrainJob`` (save-and-requeue on SIGUSR2, resume from the checkpoint) that
    also records its wall time and, on rank 0 after a complete run, the point's ``done.json``."""

    def __init__(self, point: Point, max_requeues: int = 20):
        super().__init__(list(point.overrides), max_requeues)
        self.point = point
        self._start = time.time()

    def __call__(self) -> dict:
        import submitit

        self._start = time.time()
        env = submitit.JobEnvironment()
        where = f"slurm:{env.job_id}"
        try:
            summary = super().__call__()
        except Exception as e:
            if env.global_rank == 0:
                record_attempt(self.point.run_dir, time.time() - self._start, 1, where)
                mark_failed(self.point, 1, f"{type(e).__name__}: {e} (log: the task's SLURM log)", where)
            raise
        if summary.get("rank", 0) == 0:
            record_attempt(self.point.run_dir, time.time() - self._start, summary["exit_code"], where)
            if summary["exit_code"] == 0:
                state = mark_finished(self.point, where)
                summary = {**summary, "sweep_status": state.status, "loss": state.loss}
        return summary

    def checkpoint(self):
        """Rank 0, after every rank saved: record this attempt, then requeue as a SweepJob again."""
        import submitit

        resubmit = super().checkpoint()
        record_attempt(self.point.run_dir, time.time() - self._start, 75,
                       f"slurm:{submitit.JobEnvironment().job_id} (preempted)")
        if resubmit is None:
            return None
        return submitit.helpers.DelayedSubmission(SweepJob(self.point, self.max_requeues))
