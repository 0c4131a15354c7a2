"""The one command-line layer of every prime_scale entry point (docs/cli.md).

Every command reads ``key=value`` words. The commands that run a training config (the engine, the launchers, data
prep) take ``config=NAME`` plus the config's dotted keys, parsed by ``config.load_config``; the tools (evaluate,
sample, export, inspect, scaling) declare their keys as :class:`Key` rows, parsed by :func:`parse_keys` by the
same rules: a misspelled key is refused with the closest key, a value is checked against its type, a key is given
once. ``--help`` lists the keys with what they mean (a config's keys with the comments of ``config_schema.py``). Flags
(``--nproc``, the SLURM options) say how a command is run, never what it computes.

Exit status, the same for every command (``EXIT_*``; docs/cli.md lists which each command can give):

    0   done
    1   failed: the work started and did not succeed (a corrupt checkpoint, a failed data-prep unit, a diverged run)
    2   usage or config error, found before any work started: an unknown key or a bad value, a missing input, data
        that disagrees with the config, a run folder held by another live run
    75  stopped and resumable (EX_TEMPFAIL): a signal stopped training after a save; run the same command again
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from prime_scale.config import ConfigError, closest, field_types, key_help, parse_value

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RESUMABLE = 75


class UsageError(ConfigError):
    """A command line that cannot run (exit status 2). A ConfigError, so that a command reports both alike."""


@dataclass(frozen=True)
class Key:
    """One ``name=value`` argument of a tool: its type, default, allowed values and what it means."""

    name: str
    help: str
    default: Any = None  # None: not given (the command decides); ignored when required
    type: type = str  # str | int | float | bool
    choices: tuple[str, ...] = ()
    minimum: Optional[float] = None  # int/float keys: the smallest value allowed
    required: bool = False

    def convert(self, raw: str) -> Any:
        """The value of ``name=raw``: read as a config override is (``config.parse_value``), then checked against
        ``minimum`` and ``choices``."""
        try:
            value = parse_value(self.name, self.type, raw)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        if self.minimum is not None and value < self.minimum:
            raise UsageError(f"{self.name} must be at least {self.minimum:g}, got {raw.strip()}")
        if self.choices and value not in self.choices:
            hint = did_you_mean(value, self.choices)
            raise UsageError(f"{self.name} must be one of {', '.join(self.choices)}; got {raw!r}{hint}")
        return value


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest option (config's rule), or "" when none is close."""
    best = closest(word, options)
    return f" (did you mean '{best}'?)" if best else ""


def unknown_key(key: str, options: Iterable[str], what: str = "key") -> UsageError:
    """The error of a key no table holds: the closest key, or the whole list when none is close."""
    options = list(options)
    best = closest(key, options)
    hint = f"; did you mean '{best}'?" if best else f"; keys: {', '.join(options)}"
    return UsageError(f"unknown {what} '{key}'{hint}")


def parse_keys(argv: Sequence[str], keys: Sequence[Key], *, extra: Optional[Callable[[str, str], bool]] = None,
               positional: Sequence[str] = ()) -> dict[str, Any]:
    """``key=value`` words -> {name: value} for every key (defaults filled in). ``extra(key, raw)``, asked first,
    may take a word itself (e.g. ``sample.KEY=VALUE``) by returning True. Older releases spelled some keys as flags
    (``--split val``, ``-n 2``, ``--shards``) or as bare words (the ``positional`` keys, in order); such words are
    read as ``split=val``, ``url=WORD`` etc., with a note on stderr."""
    table = {k.name: k for k in keys}
    args = {k.name: k.default for k in keys}
    seen: set[str] = set()
    for key, raw in _words(argv, table, list(positional)):
        if extra is not None and extra(key, raw):
            continue
        if key not in table:
            raise unknown_key(key, table)
        if key in seen:
            raise UsageError(f"{key}= given twice")
        seen.add(key)
        args[key] = table[key].convert(raw)
    missing = [k.name for k in keys if k.required and k.name not in seen]
    if missing:
        raise UsageError(f"{', '.join(f'{m}=' for m in missing)} {'is' if len(missing) == 1 else 'are'} required")
    return args


def _words(argv: Sequence[str], table: dict[str, Key], positional: list[str]) -> Iterable[tuple[str, str]]:
    words = list(argv)
    while words:
        word = words.pop(0)
        name = word.lstrip("-").replace("-", "_")
        if word.startswith("-") and "=" not in word and name in table:  # an older release's flag
            if table[name].type is bool:
                raw = "true"
            elif words:
                raw = words.pop(0)
            else:
                raise UsageError(f"{word} needs a value: write {name}=VALUE")
            _old_spelling(word if table[name].type is bool else f"{word} {raw}", f"{name}={raw}")
            yield name, raw
            continue
        key, sep, raw = word.partition("=")
        if not sep and positional and not word.startswith("-"):  # an older release's bare argument
            key, raw = positional.pop(0), word
            _old_spelling(word, f"{key}={word}")
        elif not sep or not key.strip():
            raise UsageError(f"expected key=value, got {word!r}")
        yield key.strip(), raw


def _old_spelling(old: str, new: str) -> None:
    print(f"note: '{old}' is an older spelling of {new}; write {new}", file=sys.stderr)


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def keys_help(keys: Sequence[Key], width: int = 100) -> str:
    """The table of a tool's keys for its ``--help``."""
    lines = []
    for k in keys:
        kind = "|".join(k.choices) if k.choices else {str: "TEXT", int: "N", float: "X", bool: "true|false"}[k.type]
        default = " (required)" if k.required else (f" (default {k.default})" if k.default not in (None, "") else "")
        lines.append(f"  {k.name}={kind}")
        lines += textwrap.wrap(k.help + default, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def config_help(sections: Optional[Sequence[str]] = None, width: int = 100) -> str:
    """Every config key (or those of ``sections``) with its type and its comment in config_schema.py, for ``--help``."""
    lines = []
    for key, tp in field_types().items():
        if sections is not None and key.split(".", 1)[0] not in sections:
            continue
        lines.append(f"  {key}={tp.__name__}")
        text = key_help().get(key, "")
        if text:
            lines += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def config_parser(prog: str, description: str, sections: Optional[Sequence[str]] = None,
                  words: str = "config=NAME and dotted key=value overrides") -> argparse.ArgumentParser:
    """The parser of a command that takes flags plus ``config=NAME key=value`` words (launchers, data prep): the
    words are collected as ``overrides`` for ``load_config``, and ``--help`` ends with the config's keys (those of
    ``sections``, default all) and their meaning."""
    p = _ConfigKeysParser(sections, prog=prog, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="WORD", help=words)
    return p


class _ConfigKeysParser(argparse.ArgumentParser):
    """An ArgumentParser whose help ends with the config keys: written when help is asked for, not at every start."""

    def __init__(self, sections: Optional[Sequence[str]], **kwargs):
        super().__init__(**kwargs)
        self.sections = sections

    def format_help(self) -> str:
        self.epilog = f"config keys (key=value):\n{config_help(self.sections)}"
        return super().format_help()


def text_table(header: Sequence[str], lines: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    """The fixed-width table every command prints: the header, a rule, the lines (cells already formatted as
    text); the columns whose index is in ``right`` right-aligned (numbers), the others left-aligned."""
    right = set(right)
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(header)]

    def row(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([row(header), "  ".join("-" * w for w in widths), *map(row, lines)])


def print_error(message: str, prog: str) -> None:
    print(f"error: {message}\n(see: {prog} --help)", file=sys.stderr)


def guarded(run: Callable[[], int], prog: str, usage: tuple[type[BaseException], ...] = ()) -> int:
    """``run()``'s exit status; a ConfigError/UsageError or one of ``usage`` (errors found before any work) becomes
    EXIT_USAGE with a one-line message. Anything else is a bug and keeps its traceback."""
    try:
        return run()
    except (ConfigError, *usage) as e:
        print_error(str(e), prog)
        return EXIT_USAGE
