"""Where labelled images come from (``prep.input``; docs/data_prep_images.md): a folder of class folders (or the
ImageNet train/val layout, with a flat val folder labelled by a file), the CIFAR-10 python batches, or a HuggingFace
dataset. ``open_source`` picks the adapter; each one ``scan``s its input into a ``Scan`` (class names, and per split
the images as JSON-able references) and ``read``s one image back as (encoded bytes or pixels, label).
"""

from __future__ import annotations

import csv
import io
import pickle
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Optional

import fsspec
import numpy as np

from data_prep.pixels import Skip
from prime_scale.config import PrepConfig
from prime_scale.data.errors import DataPrepError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # compared lower-case: ImageNet's files end in .JPEG
VAL_DIRS = ("val", "validation", "test")  # beside train/, the first that exists is the val split
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt")
HF_VAL_SPLITS = ("validation", "val", "valid", "test")
CIFAR_DIR = "cifar-10-batches-py"  # what the CIFAR-10 tarball extracts to
CIFAR_SIDE = 32


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
