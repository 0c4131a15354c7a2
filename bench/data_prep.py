"""Text data-prep throughput, measured side by side in one run on the same text:

- the raw tokenizer ``encode`` (one thread, all documents in memory): the ceiling for one worker;
- the whole pipeline with 1 worker (read, hash split, encode, pack, write tar shards, manifest) and its ratio to
  the ceiling (target >= 0.85);
- the pipeline with 2 workers and its speed-up over 1 (target >= 1.7 on 2 cores).

    python bench/data_prep.py [--repeat 4] [--vocab 8192] [--unit-mb 2] [--tokenizer bpe|byte_bpe] [--docs N]
                              [--json PATH]

The text is Debian's python3.11-doc reStructuredText (~11 MB; --docs N: its first N documents), copied --repeat
times. The tokenizer (--tokenizer: a SentencePiece bpe, or the GPT-2-style byte_bpe of HuggingFace tokenizers, e.g.
--vocab 50257) is trained once beforehand and passed as prep.tokenizer, so no measured run includes tokenizer
training. Not a timed test.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script, bench/ would lead sys.path and this file shadow the data_prep package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import Figure, machine_line, parser, write_json  # noqa: E402
from data_prep.batch import run_job  # noqa: E402
from data_prep.text import TextJob  # noqa: E402
from prime_scale.config import load_config  # noqa: E402
from prime_scale.data.tokenizer import Tokenizer  # noqa: E402

PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def make_corpus(dest: Path, repeat: int, docs: int = 0) -> list[Path]:
    files = sorted(PY_DOCS.rglob("*.rst.txt"))[:docs or None]
    if not files:
        raise SystemExit("needs Debian's python3.11-doc: apt-get install python3.11-doc")
    out = []
    for r in range(repeat):
        for i, f in enumerate(files):
            target = dest / f"r{r}" / f"{i:05d}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
            out.append(target)
    return out


def config(data_path: Path, corpus: Path, args, tokenizer: str = "") -> object:
    return load_config([
        "config=tiny", f"data.path={data_path}", f"prep.input={corpus}", f"data.vocab_size={args.vocab}",
        "data.seq_len=1024", f"prep.unit_mb={args.unit_mb}", "prep.val_fraction=0.0005",
        # shards a quarter of a unit, as with the defaults (256 MB units, 64 MB shards)
        f"data.shard_size_mb={args.unit_mb / 4}",
        "prep.tokenizer_sentences=200000", f"prep.tokenizer={tokenizer}", f"prep.tokenizer_type={args.tokenizer}",
    ])


def main(argv=None) -> list[Figure]:
    p = parser(__doc__)
    p.add_argument("--repeat", type=int, default=4, help="copies of the ~11 MB corpus")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--unit-mb", type=float, default=2.0)
    p.add_argument("--docs", type=int, default=0, help="only the corpus's first N documents (default 0: all)")
    p.add_argument("--tokenizer", choices=("bpe", "byte_bpe"), default="bpe",
                   help="the trained tokenizer: SentencePiece bpe or HuggingFace byte-level BPE")
    args = p.parse_args(argv)
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp:
        tmp = Path(tmp)
        files = make_corpus(tmp / "corpus", args.repeat, args.docs)
        size = sum(f.stat().st_size for f in files)
        # the tokenizer, once, from the first copy only
        made = run_job(TextJob(config(tmp / "tok", tmp / "corpus" / "r0", args)), progress=False)
        tokenizer = str(tmp / "tok" / made["tokenizer"]["file"])

        docs = [f.read_text() for f in files]
        tok = Tokenizer.load(tokenizer)
        start = time.perf_counter()
        ids = tok.encode(docs, parallel=False)
        raw_s = time.perf_counter() - start
        raw_tokens = sum(len(x) for x in ids) + len(ids)  # + one EOS per document, as the pipeline counts
        raw_rate = raw_tokens / raw_s
        print(f"corpus: {len(files)} documents, {size / 2**20:.1f} MiB, {raw_tokens:,} tokens (vocab {args.vocab})")
        print(f"raw {tok.library} encode, 1 thread : {raw_rate:12,.0f} tokens/s  ({raw_s:.2f} s)")

        rates = {}
        for workers in (1, 2):
            start = time.perf_counter()
            manifest = run_job(TextJob(config(tmp / f"w{workers}", tmp / "corpus", args, tokenizer)),
                               workers=workers, progress=False)
            seconds = time.perf_counter() - start
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            assert tokens == raw_tokens, (tokens, raw_tokens)  # the same work was measured
            rates[workers] = tokens / seconds
            print(f"pipeline, {workers} worker(s)            : {rates[workers]:12,.0f} tokens/s  ({seconds:.2f} s, "
                  f"{rates[workers] / workers:,.0f} tokens/s per worker, {manifest['source']['units']} units)")
        ratio = rates[1] / raw_rate
        speedup = rates[2] / rates[1]
        print(f"summary: pipeline/raw encode per worker {ratio:.2f} (target >= 0.85); "
              f"1 -> 2 workers speed-up {speedup:.2f}x (target >= 1.7)")
    figures = [Figure("prep_pipeline_over_encode", ratio, "x", ">= 0.85"),
               Figure("prep_2_worker_speedup", speedup, "x", ">= 1.7"),
               Figure("prep_tokens_per_s_1_worker", rates[1], "tokens/s")]
    write_json(figures, args.json)
    return figures


if __name__ == "__main__":
    main()
