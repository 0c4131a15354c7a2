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
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import pickle
import posixpath
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from data_prep.batch import (
    DataPrepError,
    Job,
    Output,
    Progress,
    SkipLog,
    cli_main,
    promote_parts,
    remove_stale_shards,
)
from data_prep.split import content_hash, count_threshold, fraction_threshold
from prime_scale.config import Config, PrepConfig
from prime_scale.data.shards import ShardWriter, iter_samples, read_manifest

log = logging.getLogger("data_prep.images")

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # compared lower-case: ImageNet's files end in .JPEG
VAL_DIRS = ("val", "validation", "test")  # beside train/, the first that exists is the val split
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt")
HF_VAL_SPLITS = ("validation", "val", "valid", "test")
CIFAR_DIR = "cifar-10-batches-py"  # what the CIFAR-10 tarball extracts to
CIFAR_SIDE = 32
PROGRESS_EVERY = 256  # images per progress event: in a pool each event crosses a process boundary
# Bump when the pixels or the sample format change for the same input and config (part of the fingerprint).
IMAGES_VERSION = 1


# ------------------------------------------------------------------------------------------------ pixels


class Skip(Exception):
    """An input left out of the dataset; ``reason`` is counted in the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes completely, or raise Skip with the reason."""
    if not data:
        raise Skip("empty")
    try:
        # Images up to Pillow's hard limit (2 x MAX_IMAGE_PIXELS, ~179 MP) are decoded without its warning;
        # above it Pillow raises DecompressionBombError before allocating anything.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # inside the try: a truncated file fails here, not later in convert() or resize()
    except Image.DecompressionBombError as e:
        raise Skip("too large", str(e)) from None
    except UnidentifiedImageError:
        raise Skip("not an image") from None
    except Exception as e:  # Pillow reports broken data as OSError, SyntaxError, ValueError, EOFError, ...
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise Skip(reason, f"{type(e).__name__}: {e}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: 16-bit grey is scaled (convert() would clip it), transparency is composited on white."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        grey = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    bands = img.getbands()
    if "A" in bands or "a" in bands or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def square_pixels(img: Image.Image, size: int) -> np.ndarray:
    """Center crop to a square, then box (area-average) resize to size x size: uint8 (size, size, 3), HWC."""
    try:
        img = to_rgb(img)
    except (ValueError, OSError) as e:  # e.g. a mode Pillow cannot convert to RGB
        raise Skip("unsupported mode", f"{img.mode}: {e}") from None
    w, h = img.size
    side = min(w, h)
    if side < 1:
        raise Skip("empty", f"{w}x{h} pixels")
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def _order_key(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


# ------------------------------------------------------------------------------------------------ sources


@dataclass
class Scan:
    """What a source holds: class names and, per split, its images as (order key, item, input bytes).

    Split ``None`` holds images whose split is decided by their content hash. An item is the
    JSON-able reference a unit hands back to the source's ``read``."""

    classes: list[str]
    splits: dict[Optional[str], list[tuple[str, list, int]]]
    info: dict


def _url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise DataPrepError(f"prep.input {url}: cannot open it: {e}") from None
    return fs, root.rstrip("/")


def _read(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    try:
        return fs.cat_file(path)
    except OSError as e:  # vanished, a dangling link, no permission, a network error that outlived retries
        raise Skip("unreadable", f"{type(e).__name__}: {e}") from None


class FolderSource:
    """Images in class sub-folders: ``<root>/<class>/...``, or ``train/<class>/...`` with a val split beside it."""

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, root: str):
        self.url, self.fs, self.root = url, fs, root

    def _subdirs(self, path: str) -> list[str]:
        names = [posixpath.basename(i["name"].rstrip("/")) for i in self.fs.ls(path, detail=True)
                 if i["type"] == "directory"]
        return sorted(n for n in names if not n.startswith("."))

    def scan(self) -> Scan:
        # Walk folder by folder, keeping only (path, size): ImageNet's 1.3M full stat records would take ~1 GB.
        files: dict[str, int] = {}
        ignored = 0  # files that are not images, or images outside any class folder
        for folder, subdirs, found in self.fs.walk(self.root, detail=True):
            for hidden in [d for d in subdirs if d.startswith(".")]:
                del subdirs[hidden]  # pruned from the walk: .git, .ipynb_checkpoints, ... are not data
            for name, info in found.items():
                if name.startswith("."):
                    continue  # .DS_Store, macOS ._ twins
                rel = posixpath.join(folder, name)[len(self.root) + 1 :]
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files[rel] = int(info.get("size") or 0)
                else:
                    ignored += 1
        files = dict(sorted(files.items()))  # listing order varies by filesystem; messages should not
        dirs = self._subdirs(self.root)
        if "train" not in dirs:
            if not dirs:
                raise DataPrepError(
                    f"prep.input {self.url}: no class sub-folders; expected <input>/<class>/*.png (or .jpg, ...), "
                    "train/<class>/... with val/ beside it, a CIFAR-10 folder or a save_to_disk folder"
                )
            classes, layout = dirs, "class folders"
            splits = {None: self._labelled(files, "", classes)}
        else:
            classes = self._subdirs(posixpath.join(self.root, "train"))
            if not classes:
                raise DataPrepError(f"prep.input {self.url}: train/ has no class sub-folders "
                                    "(expected train/<class>/*)")
            splits = {"train": self._labelled(files, "train", classes)}
            val_dir = next((d for d in VAL_DIRS if d in dirs), None)
            val_classes = self._subdirs(posixpath.join(self.root, val_dir)) if val_dir else []
            if val_dir is None:
                layout, splits = "train/ class folders", {None: splits["train"]}
            elif val_classes:
                unknown = sorted(set(val_classes) - set(classes))
                if unknown:
                    raise DataPrepError(f"prep.input {self.url}: {val_dir}/ has class folders that train/ lacks: "
                                        f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
                layout, splits["val"] = f"train/ and {val_dir}/ class folders", self._labelled(files, val_dir, classes)
            else:
                label_file, splits["val"] = self._flat_val(files, val_dir, classes)
                layout = f"train/ class folders, flat {val_dir}/ labelled by {label_file}"
        used = sum(len(items) for items in splits.values())
        info = {"kind": "folder", "input": self.url, "layout": layout,
                "split": "content hash" if None in splits else "source", "ignored_files": ignored + len(files) - used}
        return Scan(classes, splits, info)

    def _labelled(self, files: dict[str, int], prefix: str, classes: list[str]) -> list[tuple[str, list, int]]:
        """The images under ``prefix/<class>/`` (any depth), labelled by their class folder."""
        index = {name: i for i, name in enumerate(classes)}
        head = f"{prefix}/" if prefix else ""
        items = []
        for rel, size in files.items():
            parts = rel[len(head) :].split("/") if rel.startswith(head) else []
            if len(parts) >= 2 and parts[0] in index:
                items.append((rel, [rel, index[parts[0]]], size))
        return items

    def _flat_val(self, files: dict[str, int], val_dir: str, classes: list[str]) -> tuple[str, list]:
        """The images directly in ``val_dir/``, labelled by a LOC_val_solution.csv or val_labels.txt file."""
        candidates = [posixpath.join(folder, name) for folder in (self.root, posixpath.join(self.root, val_dir))
                      for name in VAL_LABEL_FILES]
        path = next((c for c in candidates if self.fs.exists(c)), None)
        if path is None:
            raise DataPrepError(
                f"prep.input {self.url}: {val_dir}/ holds no class folders and there is no label file "
                f"({' or '.join(VAL_LABEL_FILES)}) in {self.url} or {self.url}/{val_dir}"
            )
        label_file = path[len(self.root) + 1 :]
        labels = parse_val_labels(self.fs.cat_file(path).decode("utf-8-sig"), label_file)
        index = {name: i for i, name in enumerate(classes)}
        items, missing, unknown = [], [], set()
        for rel, size in files.items():
            folder, _, name = rel.rpartition("/")
            if folder != val_dir:
                continue
            cls = labels.get(posixpath.splitext(name)[0])
            if cls is None:
                missing.append(name)
            elif cls not in index:
                unknown.add(cls)
            else:
                items.append((rel, [rel, index[cls]], size))
        problems = []
        if missing:
            problems.append(f"{len(missing)} images without a line (e.g. {missing[:3]})")
        if unknown:
            problems.append(f"{len(unknown)} classes that train/ lacks (e.g. {sorted(unknown)[:3]})")
        if problems:
            raise DataPrepError(f"prep.input {self.url}: {label_file} does not label {val_dir}/: {'; '.join(problems)}")
        return label_file, items

    def read(self, item: list) -> tuple[bytes, int]:
        rel, label = item
        return _read(self.fs, posixpath.join(self.root, rel)), label

    def where(self, item: list) -> str:
        return item[0]


def parse_val_labels(text: str, name: str) -> dict[str, str]:
    """File stem -> class name, from LOC_val_solution.csv (ImageId,PredictionString) or ``<file> <class>`` lines."""
    labels = {}
    if name.endswith(".csv"):
        for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            words = (row.get("PredictionString") or "").split()
            if not row.get("ImageId") or not words:
                raise DataPrepError(f"{name} line {n}: expected 'ImageId,PredictionString' with a class first")
            labels[row["ImageId"]] = words[0]
        return labels
    for n, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        if len(words) != 2:
            raise DataPrepError(f"{name} line {n}: expected '<file> <class>', got {line!r}")
        labels[posixpath.splitext(words[0])[0]] = words[1]
    return labels


class _NumpyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; this one rebuilds numpy arrays and plain containers and refuses anything else,
    so a hostile file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


class CifarSource:
    """The CIFAR-10 python batches: data_batch_* is train, test_batch is val; rows are (3072,) CHW uint8."""

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, root: str):
        self.url, self.fs, self.root = url, fs, root
        self._batches: dict[str, tuple[np.ndarray, list[int]]] = {}

    @staticmethod
    def find(fs: fsspec.AbstractFileSystem, root: str) -> Optional[str]:
        for folder in (root, posixpath.join(root, CIFAR_DIR)):
            if fs.exists(posixpath.join(folder, "batches.meta")):
                return folder
        return None

    def _load(self, name: str) -> dict:
        path = posixpath.join(self.root, name)
        try:
            with self.fs.open(path, "rb") as f:
                doc = _NumpyUnpickler(f, encoding="bytes").load()
        except FileNotFoundError:
            raise DataPrepError(f"prep.input {self.url}: CIFAR-10 folder without {name}") from None
        except Exception as e:
            raise DataPrepError(f"prep.input {self.url}: {name} is not a CIFAR-10 pickle: {e}") from None
        if not isinstance(doc, dict):
            raise DataPrepError(f"prep.input {self.url}: {name} is not a CIFAR-10 pickle (no dict inside)")
        return doc

    def _batch(self, name: str) -> tuple[np.ndarray, list[int]]:
        if name not in self._batches:
            doc = self._load(name)
            data = doc.get(b"data")
            labels = doc.get(b"labels")
            if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                    or data.shape[1] != 3 * CIFAR_SIDE**2 or labels is None or len(labels) != len(data)):
                raise DataPrepError(f"prep.input {self.url}: {name} is not a CIFAR-10 batch "
                                    "(expected b'data' uint8 (N, 3072) and N b'labels')")
            self._batches[name] = (data, [int(x) for x in labels])
        return self._batches[name]

    def scan(self) -> Scan:
        names = sorted(posixpath.basename(p) for p in self.fs.ls(self.root, detail=False))
        train = sorted((n for n in names if re.fullmatch(r"data_batch_\d+", n)), key=lambda n: int(n[11:]))
        if not train:
            raise DataPrepError(f"prep.input {self.url}: CIFAR-10 folder without data_batch_* files")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in self._load("batches.meta")[b"label_names"]]
        splits: dict[Optional[str], list] = {}
        for split, files in (("train", train), ("val", ["test_batch"])):
            splits[split] = []
            for name in files:
                data, labels = self._batch(name)
                if labels and not 0 <= min(labels) <= max(labels) < len(classes):
                    raise DataPrepError(f"prep.input {self.url}: {name} has labels outside 0..{len(classes) - 1}")
                splits[split] += [(f"{name}:{r}", [name, r], data.shape[1]) for r in range(len(data))]
        self._batches.clear()  # the plan keeps only references; units load what they need
        return Scan(classes, splits, {"kind": "cifar10", "input": self.url, "split": "source",
                                      "files": {"train": train, "val": ["test_batch"]}})

    def read(self, item: list) -> tuple[np.ndarray, int]:
        name, row = item
        data, labels = self._batch(name)
        pixels = data[row].reshape(3, CIFAR_SIDE, CIFAR_SIDE).transpose(1, 2, 0)  # CHW rows -> HWC
        return np.ascontiguousarray(pixels), labels[row]

    def where(self, item: list) -> str:
        return f"{item[0]}[{item[1]}]"


class HFSource:
    """A HuggingFace dataset: ``hf:NAME`` from the Hub (or its cache), or a folder written by ``save_to_disk``."""

    def __init__(self, prep: PrepConfig, name: str, hub: bool):
        self.prep, self.name, self.hub = prep, name, hub
        self._data: Optional[dict] = None
        self._columns: Optional[tuple[str, str]] = None

    @property
    def shown(self) -> str:
        return f"hf:{self.name}" if self.hub else self.name

    def _load(self) -> dict:
        """{source split name: Dataset} with the image column left encoded (we decode, so we can skip)."""
        if self._data is not None:
            return self._data
        import datasets  # slow to import: only for this source

        try:
            if self.hub:
                loaded = datasets.load_dataset(self.name)
            else:
                loaded = datasets.load_from_disk(self.name)
        except Exception as e:
            offline = ""
            if self.hub and datasets.config.HF_HUB_OFFLINE:
                offline = " (HF_HUB_OFFLINE is set and it is not in the local cache)"
            raise DataPrepError(f"prep.input {self.shown}: cannot load the dataset{offline}: "
                                f"{type(e).__name__}: {e}") from None
        if isinstance(loaded, datasets.Dataset):
            loaded = {"": loaded}
        elif not isinstance(loaded, (dict, datasets.DatasetDict)):
            raise DataPrepError(f"prep.input {self.shown}: expected a Dataset or DatasetDict, got {type(loaded)}")
        data = dict(loaded)
        if not data:
            raise DataPrepError(f"prep.input {self.shown}: the dataset has no splits")
        features = next(iter(data.values())).features
        image_col, label_col = self._pick_columns(features)
        if not isinstance(features[image_col], datasets.Image):
            raise DataPrepError(f"prep.input {self.shown}: column {image_col!r} is {features[image_col]}, "
                                "not an Image feature")
        self._data = {k: v.cast_column(image_col, datasets.Image(decode=False)) for k, v in data.items()}
        self._columns = (image_col, label_col)
        return self._data

    def _pick_columns(self, features) -> tuple[str, str]:
        import datasets

        columns = list(features)
        image_col, label_col = self.prep.image_field, self.prep.label_field
        if not image_col:
            found = [k for k, f in features.items() if isinstance(f, datasets.Image)]
            if len(found) != 1:
                raise DataPrepError(f"prep.input {self.shown}: {len(found)} Image columns {found} among {columns}; "
                                    "name one with prep.image_field")
            image_col = found[0]
        if not label_col:
            found = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
            if len(found) > 1:
                raise DataPrepError(f"prep.input {self.shown}: several ClassLabel columns {found}; "
                                    "name one with prep.label_field")
            label_col = found[0] if found else "label"
        for what, col in (("image", image_col), ("label", label_col)):
            if col not in features:
                raise DataPrepError(f"prep.input {self.shown}: no {what} column {col!r}; columns: {columns} "
                                    f"(set prep.{what}_field)")
        return image_col, label_col

    def _splits(self) -> dict[Optional[str], str]:
        """Our split -> the source split it is read from (None: split by content hash)."""
        data = self._load()
        if list(data) == [""]:
            return {None: ""}
        train = self.prep.hf_split
        if train not in data:
            raise DataPrepError(f"prep.input {self.shown}: no split {train!r} (prep.hf_split); it has {list(data)}")
        val = next((s for s in HF_VAL_SPLITS if s in data and s != train), None)
        return {"train": train, "val": val} if val else {None: train}

    def scan(self) -> Scan:
        import datasets

        splits = self._splits()
        data = self._data
        image_col, label_col = self._columns
        feature = data[next(iter(splits.values()))].features[label_col]
        if isinstance(feature, datasets.ClassLabel):
            classes = list(feature.names)
        else:
            values = sorted({v for src in splits.values() for v in data[src].unique(label_col) if v is not None})
            if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                classes = [str(i) for i in range(max(values, default=-1) + 1)]
            elif all(isinstance(v, str) for v in values):
                classes = values
            else:
                raise DataPrepError(f"prep.input {self.shown}: label column {label_col!r} holds {feature}; "
                                    "expected a ClassLabel, integers or strings")
        items = {split: [(f"{src}/{row}", [src, row], 0) for row in range(len(data[src]))]
                 for split, src in splits.items()}
        info = {"kind": "hf", "input": self.shown, "image_column": image_col, "label_column": label_col,
                "split": "source" if None not in splits else "content hash",
                "source_splits": {str(k) if k else "content hash": v for k, v in splits.items()}}
        return Scan(classes, items, info)

    def read(self, item: list) -> tuple[bytes, Any]:
        src, row = item
        record = self._load()[src][row]
        image_col, label_col = self._columns
        value = record[image_col] or {}
        data = value.get("bytes")
        if data is None and value.get("path"):  # an image stored as a reference to a file
            fs, path = fsspec.core.url_to_fs(value["path"])
            data = _read(fs, path)
        return data or b"", record[label_col]

    def where(self, item: list) -> str:
        return f"{item[0]}[{item[1]}]" if item[0] else f"row {item[1]}"


def open_source(prep: PrepConfig):
    """The source ``prep.input`` names; DataPrepError when there is none."""
    url = prep.input.strip()
    if not url:
        raise DataPrepError("prep.input is empty: give a folder of images in class folders, a CIFAR-10 folder, "
                            "hf:NAME or a folder written by datasets' save_to_disk")
    if url.startswith("hf:"):
        return HFSource(prep, url[3:], hub=True)
    fs, root = _url_to_fs(url)
    if not fs.exists(root):
        raise DataPrepError(f"prep.input {url}: no such file or folder")
    if not fs.isdir(root):
        raise DataPrepError(f"prep.input {url}: is a file; give the folder that holds the images "
                            "(extract an archive first)")
    if any(fs.exists(posixpath.join(root, f)) for f in ("dataset_info.json", "dataset_dict.json")):
        return HFSource(prep, url, hub=False)
    cifar = CifarSource.find(fs, root)
    if cifar is not None:
        return CifarSource(url, fs, cifar)
    return FolderSource(url, fs, root)


# ------------------------------------------------------------------------------------------------ the job


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


# ------------------------------------------------------------------------------------------------ reading back


def iter_image_samples(url: str, split: str) -> Iterator[tuple[str, np.ndarray, int]]:
    """Yield ``(key, pixels uint8 (H, W, 3), label)`` per sample of a split, in shard (= dataset) order."""
    for key, members in iter_samples(url, split):
        raw, cls = members.get("pixels.u8"), members.get("cls")
        if raw is None or cls is None:
            raise ValueError(f"sample {key} of split {split!r} at {url} lacks pixels.u8 or cls")
        side = math.isqrt(len(raw) // 3)
        if side * side * 3 != len(raw):
            raise ValueError(f"sample {key} of split {split!r} at {url}: {len(raw)} bytes is no square RGB image")
        yield key, np.frombuffer(raw, dtype=np.uint8).reshape(side, side, 3), int(cls)


def read_image_shards(url: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images of a split as uint8 (N, H, W, 3) and their labels as int64 (N,), in dataset order."""
    images, labels = [], []
    for _, pixels, label in iter_image_samples(url, split):
        images.append(pixels)
        labels.append(label)
    if not images:
        try:
            manifest = read_manifest(url)
        except FileNotFoundError:
            manifest = {}
        if split not in manifest.get("splits", {}):
            raise FileNotFoundError(f"no {split}-*.tar shards (or no samples) under {url}")
        side = manifest["image_size"]
        return np.zeros((0, side, side, 3), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    return cli_main(ImageJob, "python -m data_prep.images", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
