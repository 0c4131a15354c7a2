"""Text data prep: documents -> tokens -> packed blocks -> WebDataset shards + manifest.

    python -m data_prep.text config=owt_small prep.input=openwebtext prep.tokenizer=/shared/gpt2 \\
        data.path=s3://bucket/owt --workers 16
    python -m data_prep.text config=text_demo prep.tokenizer_type=byte_bpe data.path=/scratch/pydocs_bpe \\
        --slurm --array-parallelism 64 --partition cpu

Steps: plan work units from the input (prime_scale.data.text_sources); choose the validation documents
(``prep.val_select``: ``hash``, a salted hash of each document's content, data_prep.split; or ``last``, the last
``prep.val_docs`` documents in input order); train a tokenizer on a bounded sample of training documents
(SentencePiece or a byte-level BPE, data_prep.tokenizer) or take ``prep.tokenizer``; every unit tokenizes its
documents, sends each to its split, and packs them (prime_scale.data.packing). ``concat`` joins documents with
EOS and cuts the stream into data.seq_len blocks; ``wrap`` (MDLM / MDM-Prime) cuts it into pieces of seq_len - 2,
each stored as [BOS] piece [EOS]. Each unit's last partial block is carried to the end of the split, where the
carried tokens are packed in unit order and only the final remainder (less than one block) is dropped and counted.
Every sample is a block of exactly data.seq_len tokens: what the training loader and the evaluation read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
from dataclasses import asdict

import numpy as np
from tqdm.auto import tqdm

from data_prep import tokenizer as tok_lib
from data_prep.cli import cli_main
from data_prep.job import Job, Output, Progress
from data_prep.parts import promote_parts, remove_stale_shards
from data_prep.split import content_hash, count_threshold, fraction_threshold
from prime_scale.config import Config
from prime_scale.data.errors import DataPrepError, SkipLog
from prime_scale.data.packing import eos_stream, pack
from prime_scale.data.shards import ShardWriter, token_dtype
from prime_scale.data.text_sources import apply_preset, iter_documents, plan_units
from prime_scale.data.tokenizer import FILES, Tokenizer, entry_file
from prime_scale.storage import move_into_place

SPLITS = ("train", "val")
# Documents are tokenized in batches of about this many characters (one tokenizer call per batch).
_BATCH_CHARS = 1 << 20


class TextJob(Job):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.prep = apply_preset(cfg.prep)
        self.seq_len = cfg.data.seq_len
        self.vocab_size = cfg.data.vocab_size
        self.dtype = token_dtype(self.vocab_size - 1)
        self.ext = "tokens.u16" if self.dtype.itemsize == 2 else "tokens.u32"

    def fingerprint(self) -> dict:
        prep = {k: v for k, v in asdict(self.prep).items() if not k.startswith("image_")}
        prep.pop("tokenizer_threads")  # fixed per run but it cannot change a given input's output
        data = {"vocab_size": self.vocab_size, "seq_len": self.seq_len, "shard_size_mb": self.cfg.data.shard_size_mb}
        return {"kind": "text", "data": data, "prep": prep}

    def plan(self) -> list[dict]:
        units = plan_units(self.prep)
        self.progress_unit = "doc" if units and units[0]["kind"] == "dataset" else "B"
        if self.prep.val_select == "last" and units and units[0]["kind"] == "dataset":
            units = self._cut_rows(units)
        return units

    def _cut_rows(self, units: list[dict]) -> list[dict]:
        """Dataset units with a boundary at row num_rows - val_docs, so that validation is whole units."""
        rows, k = units[-1]["end"], self.prep.val_docs
        cut = rows - k
        if cut <= 0:
            raise DataPrepError(f"prep.val_select=last with prep.val_docs={k:,}, but {self.prep.input!r} has "
                                f"{rows:,} rows: nothing would be left to train on; lower prep.val_docs")
        out = []
        for u in units:
            if u["start"] < cut < u["end"]:
                out += [{**u, "end": cut, "bytes": cut - u["start"]}, {**u, "start": cut, "bytes": u["end"] - cut}]
            else:
                out.append(u)
        return out

    # ---------------------------------------------------------------------------------------- validation

    def val_selection(self, units: list[dict]) -> dict:
        """The facts that decide each document's split: ``val_threshold`` (hash: documents hashing below it are
        validation) or ``val_from`` (last: per unit, the index of its first validation document, or None), and
        ``val_select``, what the manifest records about the choice."""
        p = self.prep
        if p.val_select == "hash":
            if not p.val_docs:
                return {"val_threshold": fraction_threshold(p.val_fraction),
                        "val_select": {"method": "hash", "val_fraction": p.val_fraction, "split_seed": p.split_seed}}
            hashes = (content_hash(text.encode("utf-8"), p.split_seed)
                      for spec in tqdm(units, desc="hashing documents for the val split", unit="unit")
                      for _, text in iter_documents(spec, p, SkipLog(quiet=True)))
            return {"val_threshold": count_threshold(hashes, p.val_docs),
                    "val_select": {"method": "hash", "val_docs": p.val_docs, "split_seed": p.split_seed}}
        if units[0]["kind"] == "dataset":  # rows: the plan cut the units at row num_rows - val_docs
            cut = units[-1]["end"] - p.val_docs
            return {"val_from": [0 if u["start"] >= cut else None for u in units],
                    "val_select": {"method": "last", "val_docs": p.val_docs, "skipped_count": True}}
        counts = [sum(1 for _ in iter_documents(spec, p, SkipLog(quiet=True)))
                  for spec in tqdm(units, desc="counting documents for the val split", unit="unit")]
        total = sum(counts)
        if p.val_docs >= total:
            raise DataPrepError(f"prep.val_select=last with prep.val_docs={p.val_docs:,}, but {p.input!r} holds "
                                f"{total:,} usable documents: nothing would be left to train on; lower prep.val_docs")
        cut, first, val_from = total - p.val_docs, 0, []
        for count in counts:
            val_from.append(None if first + count <= cut else max(0, cut - first))
            first += count
        return {"val_from": val_from,
                "val_select": {"method": "last", "val_docs": p.val_docs, "skipped_count": False}}

    def val_rule(self, facts: dict, unit: int):
        """``is_val(offset, text)`` for the documents of work unit ``unit`` (offset: its index in the unit)."""
        if "val_from" in facts:
            first = facts["val_from"][unit]
            return lambda offset, text: first is not None and offset >= first
        threshold, seed = facts["val_threshold"], self.prep.split_seed
        return lambda offset, text: content_hash(text.encode("utf-8"), seed) < threshold

    # ---------------------------------------------------------------------------------------- tokenizer

    def prepare(self, out: Output, previous: dict | None, units: list[dict]) -> dict:
        if previous is not None:
            path = out.work(entry_file(previous["tokenizer"]))
            if out.fs.exists(path):
                with out.fs.open(path, "rb") as f:
                    if hashlib.sha256(f.read()).hexdigest() == previous["tokenizer"]["sha256"]:
                        return previous  # an interrupted run of this very job: keep its tokenizer and split
        trained = None
        if self.prep.tokenizer:  # checked before any pass over the input
            tok = tok_lib.load(self.prep.tokenizer)
            facts = tok_lib.dataset_facts(tok, self.vocab_size, self.prep.packing)
        val = self.val_selection(units)
        if not self.prep.tokenizer:
            tok, trained = self.train_tokenizer(units, val)
            facts = tok_lib.dataset_facts(tok, self.vocab_size, self.prep.packing)
        out.fs.makedirs(out.work(), exist_ok=True)
        with out.fs.open(out.work(tok.file), "wb") as f:
            f.write(tok.data)
        return {**val, "tokenizer": {**facts, "source": self.prep.tokenizer or "trained", "trained": trained}}

    def train_tokenizer(self, units: list[dict], val: dict) -> tuple[Tokenizer, dict]:
        docs = self.sample_documents(units, val)
        if not docs:
            raise DataPrepError("no usable training documents to train a tokenizer on")
        kind, threads = self.prep.tokenizer_type, self.prep.tokenizer_threads
        if kind == "byte_bpe":
            chars = sum(len(d) for d in docs)
            print(f"[data_prep] training a byte-level BPE tokenizer (vocab {self.vocab_size}) on {len(docs):,} "
                  f"documents ({chars:,} characters)", flush=True)
            return tok_lib.train_byte_bpe(docs, self.vocab_size, threads), {
                "type": kind, "sample_documents": len(docs), "sample_chars": chars,
                "sample_lines": sum(_non_empty_lines(d) for d in docs)}
        lines = [line for d in docs for line in d.splitlines() if line.strip()]
        print(f"[data_prep] training a SentencePiece {kind} tokenizer (vocab {self.vocab_size}) on {len(lines):,} "
              "lines", flush=True)
        return tok_lib.train_sentencepiece(lines, self.vocab_size, kind, threads), {"type": kind,
                                                                                     "sample_lines": len(lines)}

    def sample_documents(self, units: list[dict], val: dict) -> list[str]:
        """The tokenizer's sample: training documents from the start of every unit, up to an equal quota of
        non-empty lines per unit and prep.tokenizer_sentences lines in all; the document in which a quota runs out
        is cut after its last line. Spread over the whole corpus, yet reading only a prefix of each unit.

        SentencePiece trains on the sample's non-empty lines (it reads sentences); byte_bpe on the documents
        themselves, so its merges see the newlines, blank lines and indentation between lines (as GPT-2's BPE
        was trained on whole documents). Both see the same text."""
        limit = self.prep.tokenizer_sentences
        quota = math.ceil(limit / len(units))
        docs: list[str] = []
        total = 0
        for u, spec in enumerate(units):
            if val.get("val_from") and val["val_from"][u] == 0:
                continue  # a unit of validation documents only
            is_val, taken = self.val_rule(val, u), 0
            for offset, (_, text) in enumerate(iter_documents(spec, self.prep, SkipLog(quiet=True))):
                if is_val(offset, text):
                    continue  # the tokenizer never sees validation text
                head, n = _head_lines(text, min(quota - taken, limit - total))
                docs.append(head)
                taken, total = taken + n, total + n
                if taken == quota or total == limit:
                    break
            if total == limit:
                break
        return docs

    # ---------------------------------------------------------------------------------------- units

    def run_unit(self, index: int, spec: dict, out: Output, facts: dict, progress: Progress) -> dict:
        tok = _unit_tokenizer(out.uri(out.work()), json.dumps(facts["tokenizer"], sort_keys=True))
        is_val = self.val_rule(facts, index)
        skips = SkipLog()
        packers = {
            split: _Packer(self, tok, ShardWriter(out.uri(out.work("parts")),
                                                  lambda k, s=split: f"{s}-u{index:06d}-{k:04d}.tar",
                                                  self.shard_bytes),
                           key_prefix=f"{index:06d}")
            for split in SPLITS
        }
        batches: dict[str, list[str]] = {s: [] for s in SPLITS}
        pending_chars, reported = 0, 0

        def flush() -> None:
            nonlocal pending_chars, reported
            docs = tokens = 0
            for split, texts in batches.items():
                if texts:
                    tokens += packers[split].add(tok.encode(texts, parallel=False))
                    docs += len(texts)
                    texts.clear()
            # input bytes are approximated by the characters read; the unit's end settles the bar exactly
            advance = min(pending_chars, spec["bytes"] - reported) if self.progress_unit == "B" else docs
            reported += advance
            progress(advance, docs=docs, tokens=tokens)
            pending_chars = 0

        try:
            for offset, (_, text) in enumerate(iter_documents(spec, self.prep, skips)):
                batches["val" if is_val(offset, text) else "train"].append(text)
                pending_chars += len(text)
                if pending_chars >= _BATCH_CHARS:
                    flush()
            flush()
            result = {split: packer.close() for split, packer in packers.items()}
        except BaseException:
            for packer in packers.values():
                packer.writer.abort()
            raise
        progress(spec["bytes"] - reported)
        return {"splits": result, "skipped": skips.as_dict()}

    # ---------------------------------------------------------------------------------------- finalize

    def finalize(self, out: Output, facts: dict, results: list[dict]) -> dict:
        entry = facts["tokenizer"]
        splits = {}
        for split in SPLITS:
            parts = [p for r in results for p in r["splits"][split]["parts"]]
            counts = {k: sum(r["splits"][split][k] for r in results) for k in ("documents", "tokens", "sequences")}
            # concat, wrap: the units' carried tails, joined in unit order, make the split's last blocks
            carry = np.asarray([t for r in results for t in r["splits"][split]["carry"]], dtype=np.int64)
            tail, used = pack(carry, self.prep.packing, self.seq_len, entry["bos_id"], entry["eos_id"])
            shards = promote_parts(out, split, parts, self.shard_bytes, self.samples(tail, "tail"))
            counts["sequences"] += len(tail)
            remove_stale_shards(out, split, len(shards))
            splits[split] = {**counts, "dropped_tail_tokens": len(carry) - used, "shards": shards}
        file = entry_file(entry)
        src, dst = out.work(file), out.path(file)
        if out.fs.exists(src):
            move_into_place(out.fs, src, dst)  # durable on a local disk, before the manifest names it
        for other in FILES.values():  # a dataset made before with the other library left its file here
            if other != file and out.fs.exists(out.path(other)):
                out.fs.rm(out.path(other))
        return {
            "kind": "text",
            "source": {"input": self.prep.input, "units": len(results)},
            "tokenizer": entry,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "packing": self.prep.packing,
            "val_select": facts.get("val_select"),
            "dtype": self.dtype.name,
            "splits": splits,
            "skipped": SkipLog.merge([r["skipped"] for r in results]),
            "config": {"data": asdict(self.cfg.data), "prep": asdict(self.prep)},
        }

    def samples(self, blocks: np.ndarray, key_prefix: str, first: int = 0):
        """(key, members) shard samples of token blocks."""
        for i, row in enumerate(blocks.astype(self.dtype)):
            yield f"{key_prefix}-{first + i:09d}", {self.ext: row.tobytes()}


@functools.lru_cache(maxsize=2)
def _unit_tokenizer(folder: str, entry: str) -> Tokenizer:
    """The job's tokenizer, loaded once per process for all the units it runs (parsing a 50k-token
    tokenizer.json takes a good part of a second); the entry pins its sha256."""
    return Tokenizer.from_dataset(folder, json.loads(entry))


def _head_lines(text: str, k: int) -> tuple[str, int]:
    """The text up to and including its k-th non-empty line, and how many non-empty lines that is (at most k)."""
    n = end = 0
    for line in text.splitlines(keepends=True):
        end += len(line)
        if line.strip():
            n += 1
            if n == k:
                return text[:end], n
    return text, n


def _non_empty_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip())


class _Packer:
    """Turns tokenized documents of one split into samples: blocks of seq_len tokens (concat or wrap)."""

    def __init__(self, job: TextJob, tok: Tokenizer, writer: ShardWriter, key_prefix: str):
        self.job, self.writer, self.key_prefix = job, writer, key_prefix
        self.bos, self.eos = tok.bos_id, tok.eos_id
        self.carry = np.zeros(0, dtype=np.int64)
        self.documents = self.tokens = self.sequences = 0

    def add(self, docs: list[list[int]]) -> int:
        """Append documents (each followed by EOS); returns the number of tokens added."""
        flat = eos_stream(docs, self.eos)
        self.documents += len(docs)
        self.tokens += len(flat)
        job = self.job
        self.carry = np.concatenate([self.carry, flat])
        blocks, used = pack(self.carry, job.prep.packing, job.seq_len, self.bos, self.eos)
        for key, members in job.samples(blocks, self.key_prefix, self.sequences):
            self.writer.write(key, members)
        self.sequences += len(blocks)
        self.carry = self.carry[used:]
        return len(flat)

    def close(self) -> dict:
        return {"parts": self.writer.close(), "documents": self.documents, "tokens": self.tokens,
                "sequences": self.sequences, "carry": self.carry.tolist()}


def main(argv: list[str] | None = None) -> int:
    return cli_main(TextJob, "python -m data_prep.text", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
