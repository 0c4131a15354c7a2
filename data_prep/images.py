"""Image data prep: labelled images -> square uint8 RGB pixels in WebDataset shards (docs/data_prep_images.md).

``python -m data_prep.images prep.input=PATH prep.image_size=32 data.path=OUT [--workers N] [--overwrite]``

Sources, chosen by ``prep.input``:

- a folder of class sub-folders, ``<root>/<class>/**/*.{png,jpg,jpeg,bmp,webp}``; label = index of the class
  folder's name among the sorted names;
- the same under ``train/`` with ``val/`` (or ``validation/``, ``test/``) beside it: the ImageNet layout. The val
  folder holds class folders, or is flat (``val/*.JPEG``) with ``LOC_val_solution.csv`` (Kaggle) or
  ``val_labels.txt`` (lines ``<file> <class>``) in the input folder or in the val folder;
- a CIFAR-10 python folder (``batches.meta``, ``data_batch_1..5``, ``test_batch``), or the folder above it;
- a HuggingFace datasets input: ``hf:NAME`` (the Hub, or only its local cache when HF_HUB_OFFLINE=1), or a folder
  written by ``save_to_disk``, with an image column and a label column.

The train/val split is the source's own where it has one; otherwise an image goes to val when the salted hash
of its encoded bytes (``data_prep.split``, salt ``prep.split_seed``) falls below ``prep.val_fraction`` (or is
among the ``prep.val_docs`` smallest), so duplicates land together. Each image is decoded with Pillow, made RGB,
center-cropped to a square and box (area) downsampled to ``prep.image_size``, as downsampled ImageNet was made.
A sample is ``{key}.pixels.u8`` (H*W*3 raw bytes, row-major HWC) and ``{key}.cls`` (the label in ASCII decimal),
with ``key = f"{unit:06d}-{i:09d}"``. Broken inputs (empty, unreadable, not an image, truncated, corrupt, too
large, unsupported mode, no label) are skipped and counted by reason, never fatal.

The sources are read by data_prep/image_sources.py, the pixels made by data_prep/pixels.py; this module holds the
job. The shards are read back with prime_scale.data.shards.read_image_shards (or iter_image_samples).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import asdict
from typing import Optional

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from data_prep.cli import cli_main
from data_prep.image_sources import IMAGE_EXTENSIONS, Scan, open_source
from data_prep.job import Job, Output, Progress
from data_prep.parts import promote_parts, remove_stale_shards
from data_prep.pixels import Skip, decode_image, square_pixels
from data_prep.split import content_hash, count_threshold, fraction_threshold
from prime_scale.config import Config
from prime_scale.data.errors import DataPrepError, SkipLog
from prime_scale.data.shards import ShardWriter

log = logging.getLogger("data_prep.images")

SPLITS = ("train", "val")
PROGRESS_EVERY = 256  # images per progress event: in a pool each event crosses a process boundary
# Bump when the pixels or the sample format change for the same input and config (part of the fingerprint).
IMAGES_VERSION = 1


def _order_key(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def _partition(entries: list[tuple[str, list, int]], split: Optional[str], max_items: int,
               max_bytes: int) -> list[dict]:
    """Consecutive runs of entries: units of at most max_items images and max_bytes of input (or one image)."""
    units, items, total = [], [], 0
    for _, item, size in entries:
        if items and (len(items) >= max_items or total + size > max_bytes):
            units.append({"split": split, "items": items, "bytes": total})
            items, total = [], 0
        items.append(item)
        total += size
    if items:
        units.append({"split": split, "items": items, "bytes": total})
    return units


class ImageJob(Job):
    """Images from ``prep.input`` -> ``{split}-NNNNNN.tar`` shards of square uint8 RGB pixels at ``data.path``."""

    progress_unit = "img"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._scan: Optional[Scan] = None  # the input's listing, shared by plan() and prepare(); never pickled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_scan": None}

    def scan(self) -> Scan:
        if self._scan is None:
            self._scan = open_source(self.cfg.prep).scan()
        return self._scan

    def fingerprint(self) -> dict:
        p = self.cfg.prep
        return {
            "job": "images", "version": IMAGES_VERSION, "input": p.input, "image_size": p.image_size,
            "image_shuffle_seed": p.image_shuffle_seed, "val_fraction": p.val_fraction, "val_docs": p.val_docs,
            "split_seed": p.split_seed, "hf_split": p.hf_split, "image_field": p.image_field,
            "label_field": p.label_field, "unit_docs": p.unit_docs, "unit_mb": p.unit_mb,
            "shard_size_mb": self.cfg.data.shard_size_mb,
        }

    def plan(self) -> list[dict]:
        scan = self.scan()
        p = self.cfg.prep
        if not any(scan.splits.values()):
            raise DataPrepError(f"prep.input {p.input}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
        units = []
        for split in ("train", "val", None):
            # A seeded order, so a shard holds a mix of classes rather than one class folder after another.
            ordered = sorted(scan.splits.get(split, []), key=lambda e: _order_key(p.image_shuffle_seed, e[0]))
            units += _partition(ordered, split, p.unit_docs, max(1, int(p.unit_mb * 2**20)))
        counts = {str(k or "by content hash"): len(v) for k, v in scan.splits.items()}
        log.info("%s: %d classes, images %s, in %d work units", p.input, len(scan.classes), counts, len(units))
        return units

    def prepare(self, out: Output, previous: Optional[dict], units: list[dict]) -> dict:
        scan = self.scan()
        facts = {"classes": scan.classes, "source": scan.info}
        if previous is not None and all(previous.get(k) == v for k, v in facts.items()):
            return previous  # an interrupted run of this very job: keep its val threshold (no second hashing pass)
        return facts | {"val_threshold": self.val_threshold(units)}

    def val_threshold(self, units: list[dict]) -> int:
        """Content hashes below this go to val (for inputs without a val split of their own)."""
        p = self.cfg.prep
        if not p.val_docs:
            return fraction_threshold(p.val_fraction)
        # An exact count needs every hash first: one extra pass that reads (but does not decode) each image.
        source, hashes = open_source(p), []
        for spec in tqdm([u for u in units if u["split"] is None], desc="hashing images for the val split",
                         unit="unit"):
            for item in spec["items"]:
                try:
                    hashes.append(content_hash(_raw(source.read(item)[0]), p.split_seed))
                except Skip:
                    pass  # unreadable: the unit will count it
        return count_threshold(hashes, p.val_docs)

    def unit_size(self, spec: dict) -> int:
        return len(spec["items"])

    def run_unit(self, index: int, spec: dict, out: Output, facts: dict, progress: Progress) -> dict:
        p = self.cfg.prep
        source = open_source(p)
        class_index = {name: i for i, name in enumerate(facts["classes"])}
        writers: dict[str, ShardWriter] = {}
        skipped = SkipLog()
        done = written = 0
        try:
            for i, item in enumerate(spec["items"]):
                try:
                    split, label, pixels = self._sample(source, spec["split"], item, class_index,
                                                        facts["val_threshold"])
                except Skip as s:
                    where = source.where(item)
                    skipped.add(s.reason, f"{where}: {s.detail}" if s.detail else where)
                else:
                    if split not in writers:
                        writers[split] = ShardWriter(out.uri(out.work("parts")), _part_name(split, index),
                                                     self.shard_bytes)
                    writers[split].write(f"{index:06d}-{i:09d}", {"pixels.u8": pixels.tobytes(),
                                                                  "cls": str(label).encode()})
                    written += 1
                done += 1
                if done == PROGRESS_EVERY:
                    progress(advance=done, images=written)
                    done = written = 0
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        progress(advance=done, images=written)
        splits = {}
        for split, w in sorted(writers.items()):
            parts = w.close()
            splits[split] = {"images": sum(s["samples"] for s in parts), "parts": parts}
        return {"splits": splits, "skipped": skipped.as_dict()}

    def _sample(self, source, split: Optional[str], item: list, class_index: dict,
                val_threshold: int) -> tuple[str, int, np.ndarray]:
        """(split, label, pixels) of one input, or Skip."""
        p = self.cfg.prep
        data, label = source.read(item)
        if isinstance(label, str):
            label = class_index.get(label)
        if label is None or not 0 <= label < len(class_index):
            raise Skip("no label", f"label {label!r}")
        if split is None:
            split = "val" if content_hash(_raw(data), p.split_seed) < val_threshold else "train"
        img = Image.fromarray(data) if isinstance(data, np.ndarray) else decode_image(data)
        return split, int(label), square_pixels(img, p.image_size)

    def finalize(self, out: Output, facts: dict, results: list[dict]) -> dict:
        p = self.cfg.prep
        splits = {}
        for split in SPLITS:
            parts = [part for r in results for part in r["splits"].get(split, {}).get("parts", [])]
            shards = promote_parts(out, split, parts, self.shard_bytes)
            remove_stale_shards(out, split, len(shards))
            splits[split] = {"images": sum(s["samples"] for s in shards), "shards": shards}
        return {
            "kind": "image",
            "vocab_size": 256,  # a token is one channel value
            "seq_len": p.image_size * p.image_size * 3,
            "image_size": p.image_size,
            "channels": 3,
            "dtype": "uint8",
            "layout": "HWC",
            "members": {"pixels.u8": "image_size * image_size * 3 raw bytes, row-major HWC", "cls": "label, ASCII"},
            "classes": facts["classes"],
            "num_classes": len(facts["classes"]),
            "splits": splits,
            "skipped": SkipLog.merge([r["skipped"] for r in results]),
            "source": facts["source"] | {"pillow": Image.__version__},
            "config": {"prep": asdict(p), "data": asdict(self.cfg.data)},
        }


def _raw(data) -> bytes:
    """The bytes whose hash decides an image's split: the encoded file, or the pixels of an array source."""
    return data.tobytes() if isinstance(data, np.ndarray) else data


def _part_name(split: str, unit: int):
    return lambda k: f"{split}-u{unit:06d}-{k:04d}.tar"


def main(argv: list[str] | None = None) -> int:
    return cli_main(ImageJob, "python -m data_prep.images", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
