"""Loading and saving a run's config: named YAML files under ``prime_scale/configs/`` (package data) with ``base:``
inheritance, dotted ``section.key=value`` overrides read by one value parser (``parse_value``, which the tools' own
keys use too), and the (de)serialisation of a Config to nested dicts and YAML. Every loaded config is checked by
the rules (prime_scale.config.rules)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from prime_scale.config.rules import raise_problems, schedule_problems, validate
from prime_scale.config_schema import Config, ConfigError, closest, field_types, section_types

# The shipped configs (and sweeps/, the sweep specs) are package data: config=NAME finds them in a checkout, an
# editable install and an installed wheel alike, whatever the working directory.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
# PyYAML follows YAML 1.1, which reads "1e-3" (no dot) as a string; float fields accept such literals.
_FLOAT_LITERAL = re.compile(r"[+-]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][+-]?\d+)?")


def _unknown_key(key: str, options: Iterable[str]) -> ConfigError:
    best = closest(key, options)
    hint = f"; did you mean '{best}'?" if best else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _convert(key: str, tp: type, value: Any, raw: str | None = None) -> Any:
    """Check `value` (already YAML-parsed) against `tp`; `raw` is the override text, if any."""
    shown = repr(raw) if raw is not None else repr(value)
    bad = ConfigError(f"{key} expects {tp.__name__}, got {shown}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if raw is not None and raw.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[raw.strip().lower()]
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            value = float(value.strip().replace("_", ""))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} expects a finite float, got {shown}")
            return float(value)
        raise bad
    if tp is str:
        if raw is not None:
            return raw
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} expects str, got {shown} (quote it in YAML to make it a string)")
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _set(cfg: Config, key: str, value: Any, raw: str | None = None) -> None:
    types = field_types()
    if key not in types:
        sections = section_types()
        if key in sections:
            example = f"{key}.{dataclasses.fields(sections[key])[0].name}"
            raise ConfigError(f"'{key}' is a section, not a value; set one of its keys, e.g. '{example}'")
        raise _unknown_key(key, types)
    section, name = key.split(".", 1)
    setattr(getattr(cfg, section), name, _convert(key, types[key], value, raw))


def _apply_dict(cfg: Config, d: Any, where: str = "") -> None:
    """Apply a nested {section: {key: value}} mapping onto cfg, with type and key checks."""
    prefix = f"{where}: " if where else ""
    if d is None:
        return
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix}expected a mapping of sections, got {type(d).__name__}")
    sections = section_types()
    try:
        for section, body in d.items():
            if section not in sections:
                raise _unknown_key(str(section), sections)
            if body is None:
                continue
            if not isinstance(body, dict):
                raise ConfigError(f"section '{section}' must be a mapping of keys to values, got {body!r}")
            for name, value in body.items():
                _set(cfg, f"{section}.{name}", value)
    except ConfigError as e:
        raise ConfigError(prefix + str(e)) from None


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def named_yaml(name: str, folder: Path, kind: str = "config", relative_to: Path | None = None,
               error: type[ConfigError] = ConfigError) -> Path:
    """``folder/NAME.yaml`` for a shipped NAME (with a did-you-mean), or a path to a .yaml file (relative paths
    against ``relative_to``). Configs and sweep specs are found the same way."""
    if name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name:
        path = Path(name).expanduser()
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            raise error(f"{kind} file '{path}' does not exist")
        return path
    path = folder / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        best = closest(name, names)
        hint = f" (did you mean '{best}'?)" if best else ""
        raise error(f"unknown {kind} '{name}'{hint}; available {kind}s: {', '.join(names) or '(none)'}")
    return path


def _config_path(name: str, relative_to: Path | None = None) -> Path:
    return named_yaml(name, CONFIG_DIR, "config", relative_to)


def _load_file(path: Path, chain: tuple[Path, ...] = ()) -> Config:
    """Config from a YAML file, following `base:` links (each file overrides its base)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise ConfigError(f"config base cycle: {cycle}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(d).__name__}")
    d = dict(d)
    base = d.pop("base", None)
    if base is None:
        cfg = Config()
    elif isinstance(base, str) and base:
        try:
            base_path = _config_path(base, relative_to=path.parent)
        except ConfigError as e:
            raise ConfigError(f"{path}: base: {e}") from None
        cfg = _load_file(base_path, (*chain, path))
    else:
        raise ConfigError(f"{path}: base must be a config name or path, got {base!r}")
    _apply_dict(cfg, d, str(path))
    return cfg


def _parse_override(arg: str) -> tuple[str, str]:
    key, sep, raw = arg.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"malformed override '{arg}': expected key=value, e.g. train.steps=10 or config=demo")
    return key, raw


def _read_text(tp: Optional[type], raw: str) -> Any:
    """The text after ``key=`` as YAML reads it (``1e-3``, ``true``, ``[1, 2]``), except for a str field: as given."""
    if tp is str:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_value(key: str, tp: type, raw: str) -> Any:
    """One command-line value of type ``tp`` (str, int, float or bool) by the rules of every config override: the
    text read as YAML, then checked against the type (``true``/``yes``/``1`` for a bool, ``1e-3`` for a float; a
    ConfigError naming ``key`` otherwise). The tools' own keys (prime_scale.cli.Key) are read by it too."""
    return _convert(key, tp, _read_text(tp, raw), raw)


def load_config(argv: list[str], check_schedule: bool = True) -> Config:
    """Config from `config=NAME` (or a .yaml path) plus dotted `section.key=value` overrides, in order.
    ``check_schedule=False`` skips schedule_problems, for a caller that fixes the schedule up itself afterwards
    (the sweep, which clamps each point's warmup to its steps)."""
    overrides = [_parse_override(arg) for arg in argv]
    names = [raw for key, raw in overrides if key == "config"]
    if len(names) > 1:
        raise ConfigError(f"config= given {len(names)} times ({', '.join(names)}); give it once")
    if names:
        if not names[0].strip():
            raise ConfigError(f"config= needs a name; available configs: {', '.join(available_configs())}")
        cfg = _load_file(_config_path(names[0].strip()))
    else:
        cfg = Config()
    types = field_types()
    for key, raw in overrides:
        if key == "config":
            continue
        _set(cfg, key, _read_text(types.get(key), raw), raw)
    validate(cfg)
    problems = schedule_problems(cfg.train) if check_schedule else []
    if problems:
        raise_problems(problems)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Config from a nested {section: {key: value}} dict; missing keys keep their defaults."""
    cfg = Config()
    _apply_dict(cfg, d)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    path.write_text(f"# Resolved config of run '{cfg.run.name}' (load with config={path}).\n{text}")

