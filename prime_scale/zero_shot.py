"""Zero-shot perplexity on named public test sets: the suite of MDLM (Sahoo et al. 2024), also used by MDM-Prime and
BD3-LM (docs/evaluation.md, "Zero-shot sets").

``zero_shot=mdlm`` names the seven sets of MDLM's zero-shot table (PTB, WikiText-2, LM1B, LAMBADA, AG News, PubMed,
ArXiv); ``zero_shot=ptb,wikitext2`` names some of them. Each set is read the way MDLM's ``dataloader.py`` reads it
(the same hub data, split and text field; one document per row, empty rows included), its documented detokeniser
is applied (our own implementation of the same string rules, below), and the documents are then tokenized with the
evaluated model's tokenizer and packed like its training data (``text_metrics.pack_for_model``). MDLM packs every
set with ``wrap`` ([BOS] piece of seq_len - 2 [EOS], GPT-2's tokenizer, seq_len 1024): only a model whose data were
wrap-packed gives numbers of MDLM's kind.

Nothing is downloaded. A set is read from, in this order: a ``NAME=PATH`` folder given on the command line, the
folder ``ROOT/NAME`` (``ROOT``: ``mdlm=ROOT`` on the command line, else ``$PRIME_ZERO_SHOT_DIR``, else
``~/.cache/prime_scale/zero_shot``), each a ``datasets.save_to_disk`` copy; else the HuggingFace datasets cache,
read in HF offline mode. A set found nowhere is named, with the one-liner that fetches it on a connected machine,
before any model is loaded (``MissingSets``).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from prime_scale.text_metrics import EvalError

# ------------------------------------------------------------------------------------------------ detokenisers
# Each is an ordered list of rules, applied in turn to the whole document: (old, new) replaces a literal string
# everywhere, (re.Pattern, new) substitutes a regular expression. The order matters (e.g. " . " before brackets).


def _apply(rules: Sequence[tuple], text: str) -> str:
    for old, new in rules:
        text = old.sub(new, text) if isinstance(old, re.Pattern) else text.replace(old, new)
    return text


def _tight_pair(open_: str, close: str) -> tuple:
    """Remove the spaces just inside a bracket or quote pair: '( a b )' -> '(a b)' (non-greedy, no nesting)."""
    o, c = re.escape(open_), re.escape(close)
    return re.compile(rf"{o}\s*([^{c}]*?)\s*{c}"), rf"{open_}\1{close}"


# WikiText's tokenisation (Merity et al. 2016): numbers split as "1 @,@ 000", punctuation and brackets spaced out,
# headings "= = Title = =". MDLM's list (from Megatron-LM) also has a regex written with literal slashes,
# "/' [0-9]/", that only matches the text "/' 5/" and never fires on WikiText; it is left out.
_WIKITEXT = [
    ("s '", "s'"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    _tight_pair("(", ")"), _tight_pair("[", "]"), _tight_pair("{", "}"), _tight_pair('"', '"'),
    _tight_pair("'", "'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
    (" \u00b0 ", "\u00b0"),  # degree sign
    (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]

# Penn Treebank (Mikolov's text-only version): lower case, numbers replaced by N, rare words by <unk>, clitics split
# ("do n't"), slashes escaped. A run of N's ("N N N") becomes 1's throughout (MDLM repeats the replacement).
_PTB = [
    (" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/"),
    (re.compile(r"(?<= )N(?= )"), "1"),
    ("$ 1", "$1"), ("# 1", "#1"),
    ("<unk>", "?"),
]

# One Billion Word: sentences tokenised with spaces around punctuation, URLs split ("http : / / ").
_LM1B = [
    ("http : / / ", "http://"), ("https : / / ", "https://"),
    (re.compile(r" '(\w+)"), r"'\1"),
    (re.compile(r" (\w+) \. "), r" \1. "), (re.compile(r" (\w+) \.$"), r" \1."),
    (" ? ", "? "), (re.compile(r" \?$"), "?"),
    (" ! ", "! "), (re.compile(r" !$"), "!"),
    (" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/"),
    (re.compile(r'" ([^"]+) "'), r'"\1"'), (re.compile(r"' ([^']+) '"), r"'\1'"),
    (re.compile(r"\( ([^()]+) \)"), r"(\1)"), (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    ("$ ", "$"), ("\u00a3 ", "\u00a3"),  # pound sign
]


def detokenize_wikitext(text: str) -> str:
    """WikiText's spaced-out tokens joined back: '1 @,@ 000' -> '1,000', 'word , word' -> 'word, word', ..."""
    return _apply(_WIKITEXT, text)


def detokenize_ptb(text: str) -> str:
    """PTB's tokens joined back: "do n't" -> "don't", 'N' -> '1', '<unk>' -> '?', '\\/' -> '/'."""
    return _apply(_PTB, text)


def detokenize_lm1b(text: str) -> str:
    """LM1B's tokens joined back: 'word , word' -> 'word, word', '( a )' -> '(a)', 'http : / / ' -> 'http://'."""
    return _apply(_LM1B, text)


def detokenize_lambada(text: str) -> str:
    """LAMBADA passage: curly double quotes made straight, surrounding whitespace stripped, one newline in front."""
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


def detokenize_scientific_papers(text: str) -> str:
    """PubMed / ArXiv articles: the WikiText rules, then the LM1B rules (as MDLM does)."""
    return detokenize_lm1b(detokenize_wikitext(text))


# ------------------------------------------------------------------------------------------------ the sets


@dataclass(frozen=True)
class ZeroShotSet:
    """One named test set: where MDLM reads it, which rows and field, and the detokeniser it applies."""

    name: str  # the command-line name
    title: str  # as published tables name it
    repo: str  # HuggingFace hub dataset
    config: Optional[str]  # its configuration (None: the default one)
    split: str  # the split MDLM scores: 'validation' where the set has one, else 'test'
    field: str  # the text column
    detokenize: Optional[Callable[[str], str]]
    revision: Optional[str] = None  # refs/convert/parquet: the hub's Parquet copy of a script-only dataset
    origin: str = ""  # what MDLM's code loads, where it differs from ``repo``

    def load_expression(self) -> str:
        """The ``datasets.load_dataset(...)`` call that fetches exactly the scored split (for messages)."""
        args = [repr(self.repo)] + ([repr(self.config)] if self.config else []) + [f"split={self.split!r}"]
        if self.revision:
            args.append(f"revision={self.revision!r}")
        return f"datasets.load_dataset({', '.join(args)})"

    def fetch_command(self, target: str) -> str:
        """A shell one-liner that saves the split under ``target`` (run it where the hub can be reached)."""
        return f"python -c \"import datasets; {self.load_expression()}.save_to_disk('{target}')\""


_PARQUET = "refs/convert/parquet"  # datasets >= 4 runs no loading scripts; the hub keeps a Parquet conversion

# Hub sources, splits and fields as in MDLM's dataloader.py (get_dataset and get_dataloaders: the 'validation'
# split except for LM1B and AG News, which have none, and LAMBADA, OpenAI's test file). Order: MDLM's table.
SETS: dict[str, ZeroShotSet] = {s.name: s for s in (
    ZeroShotSet("ptb", "PTB", "ptb-text-only/ptb_text_only", "penn_treebank", "validation", "sentence",
                detokenize_ptb, _PARQUET, "load_dataset('ptb_text_only')"),
    ZeroShotSet("wikitext2", "WikiText-2", "Salesforce/wikitext", "wikitext-2-raw-v1", "validation", "text",
                detokenize_wikitext, None, "load_dataset('wikitext', name='wikitext-2-raw-v1')"),
    ZeroShotSet("lm1b", "LM1B", "billion-word-benchmark/lm1b", "plain_text", "test", "text", detokenize_lm1b,
                _PARQUET, "load_dataset('lm1b')"),
    ZeroShotSet("lambada", "LAMBADA", "EleutherAI/lambada_openai", "default", "test", "text", detokenize_lambada,
                None, "OpenAI's https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl, the same "
                "5,153 passages"),
    ZeroShotSet("ag_news", "AG News", "fancyzhx/ag_news", None, "test", "text", None, None,
                "load_dataset('ag_news')"),
    ZeroShotSet("pubmed", "PubMed", "armanc/scientific_papers", "pubmed", "validation", "article",
                detokenize_scientific_papers, _PARQUET, "load_dataset('scientific_papers', 'pubmed')"),
    ZeroShotSet("arxiv", "ArXiv", "armanc/scientific_papers", "arxiv", "validation", "article",
                detokenize_scientific_papers, _PARQUET, "load_dataset('scientific_papers', 'arxiv')"),
)}
SUITES: dict[str, tuple[str, ...]] = {"mdlm": tuple(SETS)}

ROOT_ENV = "PRIME_ZERO_SHOT_DIR"
DEFAULT_ROOT = "~/.cache/prime_scale/zero_shot"


def default_root() -> str:
    """Where local copies are looked for when the command line names no root: $PRIME_ZERO_SHOT_DIR or
    ~/.cache/prime_scale/zero_shot (expanded)."""
    return os.path.expanduser(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


# ------------------------------------------------------------------------------------------------ the command line


@dataclass
class ZeroShotRequest:
    """What ``zero_shot=`` asks for: named sets (each with the local folder given for it, if any), the root of
    local copies, and the local-text input of the other items (comma-joined; '' when there are none)."""

    sets: list[tuple[ZeroShotSet, Optional[str]]] = field(default_factory=list)
    root: Optional[str] = None
    local: str = ""


def _is_name(word: str) -> bool:
    return word.lower() in SETS or word.lower() in SUITES


def parse_zero_shot(value: str) -> ZeroShotRequest:
    """Split ``zero_shot=`` into named sets and local text.

    The rule: a comma-separated item is a name when it is exactly (case aside) a set name or a suite name,
    optionally followed by ``=PATH``; every other item is a local path or glob, read as one body of text as
    before. A name never holds '/', '.' or a glob character, so a local file named like a set is reached as
    ``./ptb``. ``SET=PATH`` is a ``save_to_disk`` folder of that set; ``mdlm=ROOT`` (a suite) a folder holding one
    such folder per set (``ROOT/ptb``, ...)."""
    request = ZeroShotRequest()
    chosen: dict[str, Optional[str]] = {}
    local: list[str] = []
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        word, sep, path = item.partition("=")
        word, path = word.strip(), path.strip()
        if not _is_name(word):
            local.append(item)
            continue
        word = word.lower()
        if sep and not path:
            raise EvalError(f"zero_shot: {item!r} names no folder after '='")
        if word in SUITES:
            if path:
                if request.root not in (None, path):
                    raise EvalError(f"zero_shot: two roots of local copies given: {request.root!r} and {path!r}")
                request.root = path
            names = SUITES[word]
        else:
            names = (word,)
            if path and chosen.get(word) not in (None, path):
                raise EvalError(f"zero_shot: {word} is given two folders: {chosen[word]!r} and {path!r}")
        for name in names:
            chosen[name] = (path if word == name and path else None) or chosen.get(name)
    request.sets = [(SETS[name], where) for name, where in chosen.items()]
    request.local = ",".join(local)
    return request


# ------------------------------------------------------------------------------------------------ reading


class MissingSets(EvalError):
    """Named sets that are neither on local disk nor in the HuggingFace cache (the message says how to fetch
    each)."""


@dataclass
class LoadedSet:
    """A set's documents, detokenised, and where they came from."""

    spec: ZeroShotSet
    documents: list[str]
    source: str  # the local folder, or 'hf-cache:REPO[/CONFIG]'
    split: str  # the split read ('' for a saved Dataset: it holds one split)

    def describe(self) -> dict:
        s = self.spec
        return {"set": s.name, "title": s.title, "source": self.source, "split": self.split or s.split,
                "field": s.field, "hub": s.repo, "hub_config": s.config, "hub_split": s.split,
                "mdlm_reads": s.origin, "detokenizer": s.detokenize.__name__ if s.detokenize else None}


@contextlib.contextmanager
def hf_offline():
    """HF hub and datasets in offline mode for the block (no request leaves the machine; the cache is read)."""
    import datasets.config as datasets_config
    import huggingface_hub.constants as hub_constants

    saved = datasets_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets_config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def from_hf_cache(spec: ZeroShotSet):
    """The set's split from the HuggingFace datasets cache, read offline, or None when it is not cached."""
    import datasets

    kwargs = {"split": spec.split, **({"revision": spec.revision} if spec.revision else {})}
    with hf_offline():
        try:
            return datasets.load_dataset(spec.repo, spec.config, **kwargs)
        except Exception:  # offline and not cached: ConnectionError, FileNotFoundError, ValueError, ... by version
            return None


def _from_disk(spec: ZeroShotSet, folder: str):
    """A ``save_to_disk`` folder: a Dataset (the split itself) or a DatasetDict (the set's split is taken)."""
    import datasets

    try:
        data = datasets.load_from_disk(folder)
    except Exception as e:  # not a saved dataset, or one datasets cannot read back (FileNotFoundError, ValueError,
        # IndexError for a saved split of 0 rows, ...): the folder is the problem, said in one line
        raise EvalError(f"zero_shot {spec.name}: {folder} is not a readable datasets.save_to_disk folder "
                        f"({type(e).__name__}: {e}); save it with {spec.fetch_command(folder)}") from None
    if isinstance(data, datasets.DatasetDict):
        if spec.split not in data:
            raise EvalError(f"zero_shot {spec.name}: {folder} has the splits {', '.join(data)}, not "
                            f"{spec.split!r} (the split MDLM scores)")
        return data[spec.split], spec.split
    return data, ""


def _documents(spec: ZeroShotSet, data, where: str) -> list[str]:
    if spec.field not in data.column_names:
        raise EvalError(f"zero_shot {spec.name}: {where} has the columns {', '.join(data.column_names)}, not "
                        f"{spec.field!r}")
    texts = ["" if t is None else str(t) for t in data[spec.field]]
    return [spec.detokenize(t) for t in texts] if spec.detokenize else texts


def load_sets(request: ZeroShotRequest) -> list[LoadedSet]:
    """Every named set of ``request``, read and detokenised, or MissingSets naming each one that is found nowhere
    (with the command that fetches it). Nothing is downloaded; nothing waits on the network."""
    root = os.path.expanduser(request.root) if request.root else default_root()
    found, missing = [], []
    for spec, explicit in request.sets:
        folder = os.path.expanduser(explicit) if explicit else os.path.join(root, spec.name)
        if Path(folder).is_dir():
            data, split = _from_disk(spec, folder)
            found.append(LoadedSet(spec, _documents(spec, data, folder), folder, split))
            continue
        data = None if explicit else from_hf_cache(spec)
        if data is None:
            missing.append((spec, folder, explicit))
            continue
        source = f"hf-cache:{spec.repo}" + (f"/{spec.config}" if spec.config else "")
        found.append(LoadedSet(spec, _documents(spec, data, source), source, spec.split))
    if missing:
        lines = [f"{len(missing)} zero-shot set(s) not found locally: {', '.join(s.name for s, _, _ in missing)} "
                 "(nothing is downloaded). On a machine with internet access, save each with:"]
        for spec, folder, explicit in missing:
            where = "no folder" if explicit else "not in the HF datasets cache and no folder"
            lines.append(f"{spec.name} ({where} {folder}):\n    {spec.fetch_command(folder)}")
        if any(spec.revision for spec, _, _ in missing):
            lines.append(f"(revision={_PARQUET!r} is the hub's Parquet copy of a script-only dataset; where it is "
                         "missing, run the same load_dataset without it under datasets<4 with trust_remote_code=True)")
        lines.append(f"then copy the folders here (one per set under a root: zero_shot=mdlm=ROOT, ${ROOT_ENV}, or "
                     f"{DEFAULT_ROOT}; or SET=FOLDER), or fill this machine's HF cache by running the same "
                     "load_dataset calls here once online")
        raise MissingSets("\n  ".join(lines))
    return found


# ------------------------------------------------------------------------------------------------ packing


def set_blocks(pretrained, loaded: LoadedSet, streams: dict, limit: int = 0):
    """(blocks or None, facts): a set's documents tokenized with the model's tokenizer and packed like its
    training data (``text_metrics.pack_for_model``), the first ``limit`` blocks kept (0 = all; evaluate_nelbo
    scores no more). ``streams`` caches the token stream per (tokenizer, set) across models. A set that gives
    fewer than 2 whole blocks (no standard error) comes back as None with ``status`` 'too_short' and the reason."""
    from prime_scale.data.packing import piece_length
    from prime_scale.text_metrics import document_stream, pack_for_model, require_tokenizer

    tok = require_tokenizer(pretrained, "zero-shot perplexity")
    key = (tok.sha256, tuple(sorted(tok.special.items(), key=lambda kv: kv[0])), loaded.spec.name)
    if key not in streams:
        streams[key] = document_stream(pretrained, loaded.documents)
    blocks, facts = pack_for_model(pretrained, streams[key], len(loaded.documents))
    seq_len = pretrained.config.data.seq_len
    facts = {**loaded.describe(), **facts, "seq_len": seq_len,
             "protocol": "MDLM (wrap)" if facts["packing"] == "wrap" else "concat: not MDLM's protocol"}
    if len(blocks) >= 2:
        return (blocks[:limit] if limit else blocks), {**facts, "status": "scored"}
    if not loaded.documents:
        reason = "the split has no rows"
    else:
        piece = piece_length(facts["packing"], seq_len)
        reason = (f"{facts['text_tokens']} tokens (documents + EOS) give {len(blocks)} whole block(s) of {seq_len} "
                  f"({facts['packing']}: {piece} text tokens each); a standard error needs 2")
    return None, {**facts, "status": "too_short", "reason": reason}
