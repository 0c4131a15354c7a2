"""The sweep spec: ``prime_scale/configs/sweeps/NAME.yaml`` (the grammar is in the package's docstring) read into a
checked ``SweepSpec``. Every error is a ``SweepError`` (a ConfigError: exit status 2) that names the file and the
key."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from prime_scale.config import CONFIG_DIR, ConfigError, closest, field_types, named_yaml

SWEEP_DIR = CONFIG_DIR / "sweeps"
SPEC_KEYS = ("base", "overrides", "families", "grid", "points", "isoflop", "seeds", "max_warmup_fraction",
             "description")
# set by the sweep for every point; a spec or command line that sets them is refused
RESERVED = ("run.name", "run.out_dir", "ckpt.resume", "train.eval_every")


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
    types = field_types()
    if not isinstance(key, str) or key not in types:
        if key == "config":
            raise SweepError(f"{where}: config= cannot be set here; the base config is the spec's 'base:'")
        best = closest(str(key), types)
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
            best = closest(str(key), SPEC_KEYS)
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
