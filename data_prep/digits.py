"""scikit-learn's 8x8 handwritten digits as token shards: every pixel is a token with 17 grey levels (C = 17).

``python -m data_prep.digits config=digits [data.path=...]``

The 1,797 images ship with scikit-learn, so the image demo needs no download. Each image is 64 tokens in
row-major order; the train/val split is by a salted hash of the image's pixels (``prep.val_fraction``,
``prep.split_seed``, as for text and images). A batch job like the others (data_prep/batch.py): deterministic,
idempotent, refusing a foreign output folder.
"""

from __future__ import annotations

import sys

import numpy as np

from data_prep.cli import cli_main
from data_prep.job import Job, Output, Progress
from data_prep.parts import promote_parts, remove_stale_shards
from data_prep.split import content_hash, fraction_threshold
from prime_scale.data.errors import SkipLog
from prime_scale.data.shards import ShardWriter

SIDE, LEVELS = 8, 17
SPLITS = ("train", "val")


def load_digits_tokens() -> tuple[np.ndarray, np.ndarray]:
    """(images as int64 tokens (1797, 64) in 0..16, labels (1797,))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.reshape(len(digits.images), SIDE * SIDE).astype(np.int64), digits.target.astype(np.int64)


class DigitsJob(Job):
    progress_unit = "img"

    def fingerprint(self) -> dict:
        p = self.cfg.prep
        return {"job": "digits", "val_fraction": p.val_fraction, "split_seed": p.split_seed,
                "shard_size_mb": self.cfg.data.shard_size_mb}

    def plan(self) -> list[dict]:
        return [{"images": len(load_digits_tokens()[0])}]  # one unit: the whole set is 115 KB

    def unit_size(self, spec: dict) -> int:
        return spec["images"]

    def run_unit(self, index: int, spec: dict, out: Output, facts: dict, progress: Progress) -> dict:
        tokens, labels = load_digits_tokens()
        threshold = fraction_threshold(self.cfg.prep.val_fraction)
        writers = {s: ShardWriter(out.uri(out.work("parts")), lambda k, s=s: f"{s}-u{index:06d}-{k:04d}.tar",
                                  self.shard_bytes) for s in SPLITS}
        counts = {s: 0 for s in SPLITS}
        for i, (row, label) in enumerate(zip(tokens, labels)):
            split = "val" if content_hash(row.astype("<u2").tobytes(), self.cfg.prep.split_seed) < threshold \
                else "train"
            writers[split].write(f"{index:06d}-{i:09d}", {"tokens.u16": row.astype("<u2").tobytes(),
                                                          "cls": str(int(label)).encode()})
            counts[split] += 1
        progress(len(tokens), images=len(tokens))
        return {"splits": {s: {"sequences": counts[s], "parts": writers[s].close()} for s in SPLITS},
                "skipped": SkipLog().as_dict()}

    def finalize(self, out: Output, facts: dict, results: list[dict]) -> dict:
        splits = {}
        for split in SPLITS:
            shards = promote_parts(out, split, results[0]["splits"][split]["parts"], self.shard_bytes)
            remove_stale_shards(out, split, len(shards))
            n = results[0]["splits"][split]["sequences"]
            splits[split] = {"sequences": n, "tokens": n * SIDE * SIDE, "shards": shards}
        return {"kind": "digits", "source": "sklearn.datasets.load_digits", "vocab_size": LEVELS,
                "seq_len": SIDE * SIDE, "dtype": "uint16", "image_size": SIDE, "channels": 1, "levels": LEVELS,
                "splits": splits,
                "skipped": SkipLog.merge([r["skipped"] for r in results])}


def main(argv: list[str] | None = None) -> int:
    return cli_main(DigitsJob, "python -m data_prep.digits", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
