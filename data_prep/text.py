"""Text data prep: documents -> SentencePiece tokens -> packed blocks -> WebDataset shards + manifest.

    python -m data_prep.text config=owt_small prep.input=openwebtext data.path=s3://bucket/owt --workers 16
    python -m data_prep.text config=owt_small prep.input=/data/owt/*.jsonl.zst data.path=/scratch/owt \\
        --slurm --array-parallelism 64 --partition cpu

Steps: plan work units from the input (data_prep.text_sources); train a SentencePiece model on a bounded sample of
training documents, or take prep.tokenizer; every unit tokenizes its documents, sends each to train or val by a
salted hash of its content (data_prep.split), and packs them. ``prep.packing=concat`` joins documents with EOS and cuts the stream
into data.seq_len blocks (the OWT/MDLM way); each unit's last partial block is carried to the end of the split,
where the carried tokens are packed in unit order and only the final remainder (< seq_len tokens) is dropped and
counted. ``prep.packing=pad`` stores one sample per document chunk of at most seq_len tokens; readers pad it and
build the attention mask (prime_scale.data.shards.read_padded_token_shards).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
from dataclasses import asdict

import numpy as np
from tqdm.auto import tqdm

from data_prep import tokenizer as tok
from data_prep.batch import DataPrepError, Job, Output, Progress, SkipLog, cli_main, promote_parts, remove_stale_shards
from data_prep.split import content_hash, count_threshold, fraction_threshold
from data_prep.text_sources import apply_preset, iter_documents, plan_units
from prime_scale.config import Config
from prime_scale.data.shards import ShardWriter, token_dtype

SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.model"
# Documents are tokenized in batches of about this many characters (one SentencePiece call per batch).
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
        return units

    # ---------------------------------------------------------------------------------------- tokenizer

    def is_validation(self, text: str, threshold: int) -> bool:
        return content_hash(text.encode("utf-8"), self.prep.split_seed) < threshold

    def prepare(self, out: Output, previous: dict | None, units: list[dict]) -> dict:
        path = out.work(TOKENIZER_FILE)
        if previous is not None and out.fs.exists(path):
            with out.fs.open(path, "rb") as f:
                model = f.read()
            if hashlib.sha256(model).hexdigest() == previous["tokenizer"]["sha256"]:
                return previous  # an interrupted run of this very job: keep its tokenizer and split
        threshold = self.val_threshold(units)
        if self.prep.tokenizer:
            model, trained = tok.load_model_bytes(self.prep.tokenizer), None
        else:
            lines = self.sample_lines(units, threshold)
            if not lines:
                raise DataPrepError("no usable training documents to train a tokenizer on")
            print(f"[data_prep] training a SentencePiece {self.prep.tokenizer_type} tokenizer "
                  f"(vocab {self.vocab_size}) on {len(lines):,} lines", flush=True)
            model = tok.train_sentencepiece(lines, self.vocab_size, self.prep.tokenizer_type,
                                            self.prep.tokenizer_threads)
            trained = {"type": self.prep.tokenizer_type, "sample_lines": len(lines)}
        facts = tok.describe(model, self.vocab_size)
        out.fs.makedirs(out.work(), exist_ok=True)
        with out.fs.open(path, "wb") as f:
            f.write(model)
        return {"val_threshold": threshold,
                "tokenizer": {**facts, "file": TOKENIZER_FILE, "source": self.prep.tokenizer or "trained",
                              "trained": trained}}

    def val_threshold(self, units: list[dict]) -> int:
        if not self.prep.val_docs:
            return fraction_threshold(self.prep.val_fraction)
        hashes = (content_hash(text.encode("utf-8"), self.prep.split_seed)
                  for spec in tqdm(units, desc="hashing documents for the val split", unit="unit")
                  for _, text in iter_documents(spec, self.prep, SkipLog(quiet=True)))
        return count_threshold(hashes, self.prep.val_docs)

    def sample_lines(self, units: list[dict], threshold: int) -> list[str]:
        """At most prep.tokenizer_sentences non-empty lines of training documents, an equal quota per unit
        taken from its start: spread over the whole corpus, yet reading only a prefix of each unit."""
        quota = math.ceil(self.prep.tokenizer_sentences / len(units))
        lines: list[str] = []
        for spec in units:
            taken = 0
            for _, text in iter_documents(spec, self.prep, SkipLog(quiet=True)):
                if self.is_validation(text, threshold):
                    continue  # the tokenizer never sees validation text
                for line in text.splitlines():
                    if line.strip():
                        lines.append(line)
                        taken += 1
                        if taken == quota:
                            break
                if taken == quota:
                    break
        return lines[: self.prep.tokenizer_sentences]

    # ---------------------------------------------------------------------------------------- units

    def run_unit(self, index: int, spec: dict, out: Output, facts: dict, progress: Progress) -> dict:
        with out.fs.open(out.work(TOKENIZER_FILE), "rb") as f:
            sp = tok.processor(f.read())
        eos = facts["tokenizer"]["eos_id"]
        skips = SkipLog()
        packers = {
            split: _Packer(self, ShardWriter(out.uri(out.work("parts")),
                                             lambda k, s=split: f"{s}-u{index:06d}-{k:04d}.tar", self.shard_bytes),
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
                    ids = sp.encode(texts, out_type=int, num_threads=1)
                    tokens += packers[split].add(ids, eos)
                    docs += len(texts)
                    texts.clear()
            # input bytes are approximated by the characters read; the unit's end settles the bar exactly
            advance = min(pending_chars, spec["bytes"] - reported) if self.progress_unit == "B" else docs
            reported += advance
            progress(advance, docs=docs, tokens=tokens)
            pending_chars = 0

        try:
            for _, text in iter_documents(spec, self.prep, skips):
                split = "val" if self.is_validation(text, facts["val_threshold"]) else "train"
                batches[split].append(text)
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
        splits = {}
        for split in SPLITS:
            parts = [p for r in results for p in r["splits"][split]["parts"]]
            counts = {k: sum(r["splits"][split][k] for r in results) for k in ("documents", "tokens", "sequences")}
            # concat: the units' carried tails, joined in unit order, make the split's last blocks
            carry = np.asarray([t for r in results for t in r["splits"][split]["carry"]], dtype=np.int64)
            tail = list(_blocks(carry, self.seq_len, self.dtype, self.ext, key_prefix="tail"))
            shards = promote_parts(out, split, parts, self.shard_bytes, tail)
            counts["sequences"] += len(tail)
            dropped = len(carry) - len(tail) * self.seq_len
            remove_stale_shards(out, split, len(shards))
            splits[split] = {**counts, "dropped_tail_tokens": dropped, "shards": shards}
        src, dst = out.work(TOKENIZER_FILE), out.path(TOKENIZER_FILE)
        if out.fs.exists(src):
            out.fs.mv(src, dst)
        return {
            "kind": "text",
            "source": {"input": self.prep.input, "units": len(results)},
            "tokenizer": facts["tokenizer"],
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "packing": self.prep.packing,
            "dtype": self.dtype.name,
            "splits": splits,
            "skipped": SkipLog.merge([r["skipped"] for r in results]),
            "config": {"data": asdict(self.cfg.data), "prep": asdict(self.prep)},
        }


def eos_stream(docs: list[list[int]], eos: int) -> np.ndarray:
    """Tokenized documents, each followed by EOS, as one int64 stream: what concat packing cuts into blocks."""
    n = sum(len(d) for d in docs) + len(docs)
    return np.fromiter(itertools.chain.from_iterable(itertools.chain(d, (eos,)) for d in docs), dtype=np.int64, count=n)


def _blocks(tokens: np.ndarray, seq_len: int, dtype: np.dtype, ext: str, key_prefix: str, first: int = 0):
    """(key, members) samples of the whole seq_len blocks of ``tokens``; the remainder is left out."""
    full = len(tokens) // seq_len
    for i, row in enumerate(tokens[: full * seq_len].reshape(full, seq_len)):
        yield f"{key_prefix}-{first + i:09d}", {ext: row.astype(dtype).tobytes()}


class _Packer:
    """Turns tokenized documents of one split into samples: seq_len blocks (concat) or document chunks (pad)."""

    def __init__(self, job: TextJob, writer: ShardWriter, key_prefix: str):
        self.job, self.writer, self.key_prefix = job, writer, key_prefix
        self.carry = np.zeros(0, dtype=np.int64)
        self.documents = self.tokens = self.sequences = 0

    def add(self, docs: list[list[int]], eos: int) -> int:
        """Append documents (each followed by EOS); returns the number of tokens added."""
        flat = eos_stream(docs, eos)
        n = len(flat)
        self.documents += len(docs)
        self.tokens += n
        job = self.job
        if job.prep.packing == "concat":
            self.carry = np.concatenate([self.carry, flat])
            full = len(self.carry) // job.seq_len
            for key, members in _blocks(self.carry, job.seq_len, job.dtype, job.ext, self.key_prefix, self.sequences):
                self.writer.write(key, members)
            self.sequences += full
            self.carry = self.carry[full * job.seq_len :]
        else:  # pad: every document chunk of at most seq_len tokens is a sample of its own
            bounds = np.cumsum([0] + [len(d) + 1 for d in docs])
            for a, b in zip(bounds[:-1], bounds[1:]):
                for s in range(a, b, job.seq_len):
                    chunk = flat[s : min(b, s + job.seq_len)]
                    self.writer.write(f"{self.key_prefix}-{self.sequences:09d}", {job.ext: chunk.astype(job.dtype).tobytes()})
                    self.sequences += 1
        return n

    def close(self) -> dict:
        return {"parts": self.writer.close(), "documents": self.documents, "tokens": self.tokens,
                "sequences": self.sequences, "carry": self.carry.tolist()}


def main(argv: list[str] | None = None) -> int:
    return cli_main(TextJob, "python -m data_prep.text", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
