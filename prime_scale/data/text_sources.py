"""Text inputs: local or remote files (.txt, .jsonl, .json, .parquet, optionally .gz/.zst) and `datasets`, read as
documents. data_prep.text packs them into shards; prime_scale.text_metrics scores them as zero-shot text.

``prep.input`` is a comma-separated list of files, folders (searched recursively) or globs on any fsspec URL;
``hf:NAME`` (a hub dataset) or the path of a dataset saved with ``Dataset.save_to_disk``; or a preset name.

Work units are planned from the input alone: files in sorted order, small files grouped up to ``prep.unit_mb``,
large uncompressed line-oriented files (.jsonl, .txt read as lines) split into byte ranges. A line belongs to the
range holding its first byte, so ranges partition the lines exactly. Datasets are split into row ranges.
Documents that cannot be used are skipped with a reason, never fatal.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from typing import Iterator

import fsspec

from prime_scale.config import PrepConfig
from prime_scale.data.errors import DataPrepError, SkipLog

TEXT_FORMATS = (".txt", ".jsonl", ".json", ".parquet")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# Presets fill prep.input (and the text field) with a well-known corpus.
PRESETS = {"openwebtext": {"input": "hf:Skylion007/openwebtext", "text_field": "text"}}
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")


def apply_preset(prep: PrepConfig) -> PrepConfig:
    from dataclasses import replace

    preset = PRESETS.get(prep.input.strip())
    return replace(prep, **preset) if preset else prep


def file_format(path: str) -> tuple[str, str | None] | None:
    """(".jsonl", "gzip") for "a.jsonl.gz"; None for a file that is not a text input."""
    name = posixpath.basename(path).lower()
    compression = None
    for ext, codec in COMPRESSIONS.items():
        if name.endswith(ext):
            name, compression = name[: -len(ext)], codec
            break
    for fmt in TEXT_FORMATS:
        if name.endswith(fmt):
            return fmt, compression
    return None


def is_dataset(input: str) -> bool:
    if input.startswith("hf:"):
        return True
    fs, path = fsspec.core.url_to_fs(input)
    return fs.isdir(path) and any(fs.exists(posixpath.join(path, m)) for m in _DATASET_MARKERS)


def list_files(input: str) -> list[dict]:
    """Every input file as {url, bytes, fmt, compression}, sorted by URL; fails on a path that does not exist."""
    found: dict[str, dict] = {}
    for entry in [e.strip() for e in input.split(",") if e.strip()]:
        fs, path = fsspec.core.url_to_fs(entry)
        if any(c in path for c in "*?["):
            paths = fs.glob(path)
        elif fs.isdir(path):
            paths = fs.find(path)
        elif fs.isfile(path):
            if file_format(path) is None:
                raise DataPrepError(f"prep.input: {entry!r} is not a text input (expected one of "
                                    f"{', '.join(TEXT_FORMATS)}, optionally {', '.join(COMPRESSIONS)})")
            paths = [path]
        else:
            raise DataPrepError(f"prep.input: {entry!r} does not exist")
        for p in paths:
            fmt = file_format(p)
            if fmt is None or not fs.isfile(p):
                continue
            url = fs.unstrip_protocol(p)
            found[url] = {"url": url, "bytes": int(fs.size(p)), "fmt": fmt[0], "compression": fmt[1]}
        if not paths:
            raise DataPrepError(f"prep.input: {entry!r} matches nothing")
    if not found:
        raise DataPrepError(f"prep.input: no text files ({', '.join(TEXT_FORMATS)}) under {input!r}")
    return [found[url] for url in sorted(found)]


def plan_units(prep: PrepConfig) -> list[dict]:
    if not prep.input.strip():
        raise DataPrepError("prep.input is empty: name files, folders, globs, hf:NAME or a preset "
                            f"({', '.join(PRESETS)})")
    if is_dataset(prep.input.strip()):
        return _plan_dataset_units(prep)
    return _plan_file_units(list_files(prep.input), int(prep.unit_mb * 2**20), prep.txt_document)


def _plan_file_units(files: list[dict], unit_bytes: int, txt_document: str) -> list[dict]:
    units: list[dict] = []
    group: list[dict] = []

    def flush() -> None:
        if group:
            units.append({"kind": "files", "files": list(group), "bytes": sum(f["end"] - f["start"] for f in group)})
            group.clear()

    for f in files:
        splittable = f["compression"] is None and (f["fmt"] == ".jsonl" or (f["fmt"] == ".txt" and txt_document == "line"))
        entry = {k: f[k] for k in ("url", "fmt", "compression")}
        if splittable and f["bytes"] > unit_bytes:
            flush()
            for start in range(0, f["bytes"], unit_bytes):
                units.append({"kind": "files", "bytes": min(unit_bytes, f["bytes"] - start),
                              "files": [{**entry, "start": start, "end": min(f["bytes"], start + unit_bytes)}]})
            continue
        group.append({**entry, "start": 0, "end": f["bytes"]})
        if sum(g["end"] - g["start"] for g in group) >= unit_bytes:
            flush()
    flush()
    return units


def open_dataset(input: str, split: str):
    """A `datasets.Dataset`: ``hf:NAME`` from the hub (or its local cache offline), else a save_to_disk folder."""
    import datasets

    try:
        if input.startswith("hf:"):
            return datasets.load_dataset(input[3:], split=split)
        ds = datasets.load_from_disk(input)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataPrepError(f"{input!r} has splits {sorted(ds)}, not prep.hf_split={split!r}")
            ds = ds[split]
        return ds
    except DataPrepError:
        raise
    except Exception as e:  # datasets raises many types (hub errors, ConnectionError, FileNotFoundError, ...)
        raise DataPrepError(
            f"cannot load dataset {input!r} (split {split!r}): {type(e).__name__}: {e}. Without network access "
            "(or with HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1) only datasets already in the local cache load; "
            "otherwise download it where the hub is reachable, save_to_disk, and pass that folder as prep.input."
        ) from None


def _plan_dataset_units(prep: PrepConfig) -> list[dict]:
    ds = open_dataset(prep.input.strip(), prep.hf_split)
    if prep.text_field not in ds.column_names:
        raise DataPrepError(f"dataset {prep.input!r} has no column prep.text_field={prep.text_field!r} "
                            f"(columns: {', '.join(ds.column_names)})")
    n = len(ds)
    return [{"kind": "dataset", "start": s, "end": min(n, s + prep.unit_docs), "bytes": min(n, s + prep.unit_docs) - s}
            for s in range(0, n, prep.unit_docs)]


# ------------------------------------------------------------------------------------------------ reading


def iter_documents(spec: dict, prep: PrepConfig, skips: SkipLog) -> Iterator[tuple[str, str]]:
    """(where, text) for every usable document of a unit, in a fixed order; unusable ones go to ``skips``."""
    raw = _iter_dataset(spec, prep, skips) if spec["kind"] == "dataset" else _iter_files(spec, prep, skips)
    for where, text in raw:
        if not isinstance(text, str):
            skips.add("not_text", where)
        elif len(text) > prep.max_doc_chars:
            skips.add("giant", where)
        elif len(text.strip()) < max(1, prep.min_doc_chars):
            skips.add("empty", where)
        else:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates, e.g. from "\ud800" escapes in JSON
                skips.add("invalid_utf8", where)
                continue
            yield where, text


def _iter_dataset(spec: dict, prep: PrepConfig, skips: SkipLog) -> Iterator[tuple[str, object]]:
    ds = open_dataset(prep.input.strip(), prep.hf_split)
    for start in range(spec["start"], spec["end"], 1000):
        column = ds[start : min(spec["end"], start + 1000)][prep.text_field]
        for offset, text in enumerate(column):
            yield f"row {start + offset}", text


def _iter_files(spec: dict, prep: PrepConfig, skips: SkipLog) -> Iterator[tuple[str, object]]:
    for f in spec["files"]:
        try:
            yield from _iter_file(f, prep, skips)
        except (OSError, EOFError, ValueError, RuntimeError) as e:  # unreadable or corrupt (bad gzip/zstd, ...)
            skips.add("unreadable_file", f"{f['url']}: {type(e).__name__}: {e}")


def _iter_file(f: dict, prep: PrepConfig, skips: SkipLog) -> Iterator[tuple[str, object]]:
    url, fmt = f["url"], f["fmt"]
    if fmt == ".parquet":
        yield from _iter_parquet(f, prep, skips)
        return
    if fmt == ".json" or (fmt == ".txt" and prep.txt_document != "line"):
        if f["compression"] is None and f["end"] > 4 * prep.max_doc_chars + 1024 and fmt == ".txt" \
                and prep.txt_document == "file":
            skips.add("giant", url)  # no need to read a file that cannot hold a short enough document
            return
        with fsspec.open(url, "rb", compression=f["compression"]) as fh:
            data = fh.read()
        yield from _split_whole_file(url, fmt, data, prep, skips)
        return
    for where, line in _iter_lines(f):
        if fmt == ".jsonl":
            if not line.strip():
                continue
            yield from _json_records(where, line, prep, skips)
        else:
            try:
                yield where, line.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError:
                skips.add("invalid_utf8", where)


def _iter_lines(f: dict) -> Iterator[tuple[str, bytes]]:
    """Lines whose first byte lies in [start, end) of the file (all lines of a compressed file)."""
    url, start, end = f["url"], f["start"], f["end"]
    if f["compression"] is not None:
        with fsspec.open(url, "rb", compression=f["compression"]) as fh:
            # zstandard's reader has read/readinto but no line iteration: buffer it
            for number, line in enumerate(io.BufferedReader(fh, 1 << 20), 1):
                yield f"{url}:{number}", line
        return
    with fsspec.open(url, "rb") as fh:
        pos = start
        if start > 0:
            fh.seek(start - 1)
            pos = start - 1 + len(fh.readline())  # the line holding byte start-1 belongs to the previous range
        while pos < end:
            line = fh.readline()
            if not line:
                break
            yield f"{url}@{pos}", line
            pos += len(line)


def _json_records(where: str, data: bytes, prep: PrepConfig, skips: SkipLog) -> Iterator[tuple[str, object]]:
    try:
        record = json.loads(data)
    except UnicodeDecodeError:
        skips.add("invalid_utf8", where)
        return
    except json.JSONDecodeError:
        skips.add("bad_json", where)
        return
    records = record if isinstance(record, list) else [record]
    for i, r in enumerate(records):
        at = f"{where}[{i}]" if isinstance(record, list) else where
        if not isinstance(r, dict) or prep.text_field not in r:
            skips.add("missing_text_field", at)
        else:
            yield at, r[prep.text_field]


def _split_whole_file(url: str, fmt: str, data: bytes, prep: PrepConfig, skips: SkipLog):
    if fmt == ".json":
        yield from _json_records(url, data, prep, skips)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skips.add("invalid_utf8", url)
        return
    if prep.txt_document == "file":
        yield url, text
    else:
        for i, paragraph in enumerate(_PARAGRAPH.split(text)):
            yield f"{url}#p{i}", paragraph


def _iter_parquet(f: dict, prep: PrepConfig, skips: SkipLog) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    with fsspec.open(f["url"], "rb", compression=f["compression"]) as fh:
        pf = pq.ParquetFile(fh)
        if prep.text_field not in pf.schema_arrow.names:
            skips.add("missing_text_field", f"{f['url']} (columns: {', '.join(pf.schema_arrow.names)})")
            return
        row = 0
        for batch in pf.iter_batches(columns=[prep.text_field], batch_size=1000):
            for text in batch.column(0).to_pylist():
                yield f"{f['url']}#row{row}", text
                row += 1
