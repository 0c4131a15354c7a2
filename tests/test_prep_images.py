"""Image data prep (data_prep/images.py): every source, the pixel pipeline, skips, determinism and errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image

from data_prep.batch import run_job
from data_prep.images import ImageJob, main
from prime_scale.config import load_config
from prime_scale.data.errors import DataPrepError
from prime_scale.data.shards import iter_image_samples, read_image_shards

# ----------------------------------------------------------------------------- helpers


def make_job(src, out, *overrides: str) -> ImageJob:
    # Small shards (16 KiB) so that every test writes several of them.
    return ImageJob(load_config([f"prep.input={src}", f"data.path={out}", "data.shard_size_mb=0.015625", *overrides]))


def prepare(src, out, *overrides: str, workers: int = 1, overwrite: bool = False) -> tuple[ImageJob, dict]:
    job = make_job(src, out, *overrides)
    return job, run_job(job, workers=workers, overwrite=overwrite, progress=False)


def reference(img: Image.Image, size: int) -> np.ndarray:
    """Straight Pillow: RGB, center crop to a square, BOX resize."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return np.asarray(img.crop((left, top, left + s, top + s)).resize((size, size), Image.BOX))


def keyed_items(job: ImageJob) -> dict[str, list]:
    """Sample key -> the input item it came from, from the job's plan (a pure function of input and config)."""
    return {f"{u:06d}-{i:09d}": item for u, spec in enumerate(job.plan()) for i, item in enumerate(spec["items"])}


def samples(out) -> dict[str, list[tuple[str, np.ndarray, int]]]:
    return {split: list(iter_image_samples(str(out), split)) for split in ("train", "val")}


def order_key(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def is_val(data: bytes, fraction: float, seed: int = 0) -> bool:
    """The content split of data_prep.split: a salted 64-bit BLAKE2b hash below fraction * 2**64."""
    digest = hashlib.blake2b(data, digest_size=8, salt=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") < int(fraction * 2**64)


def save(img: Image.Image, path, fmt: str | None = None, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)


def shard_digests(manifest: dict) -> dict:
    return {split: [(s["name"], s["bytes"], s["sha256"]) for s in v["shards"]]
            for split, v in manifest["splits"].items()}


def rgb_noise(rng, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def broken_png(rng) -> bytes:
    """A PNG with a valid header whose compressed pixel data is zeroed: Pillow opens it, then load() fails."""
    buf = io.BytesIO()
    rgb_noise(rng, 20, 20).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.find(b"IDAT") + 20
    data[at : at + 16] = bytes(16)
    return bytes(data)


# ----------------------------------------------------------------------------- 1. class folders with broken files


def make_class_folders(root, rng) -> dict[str, str]:
    """Three classes of images in many modes and sizes; returns {relative path: class}."""
    made = {}
    for c, cls in enumerate(["cat", "dog", "zebra"]):
        for k in range(6):
            h, w = int(rng.integers(8, 60)), int(rng.integers(8, 60))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            kind = (c + k) % 6
            if kind == 0:
                name, img, fmt = f"{k}.jpg", Image.fromarray(arr), "JPEG"
            elif kind == 1:
                name, img, fmt = f"{k}.png", Image.fromarray(arr[..., 0]), "PNG"  # L
            elif kind == 2:
                name, img, fmt = f"{k}.png", Image.fromarray(arr).quantize(16), "PNG"  # P, no transparency
            elif kind == 3:
                name, img, fmt = f"{k}.JPEG", Image.fromarray(arr).convert("CMYK"), "JPEG"
            elif kind == 4:
                name, img, fmt = f"sub/{k}.bmp", Image.fromarray(arr), "BMP"  # nested deeper in the class folder
            else:
                name, img, fmt = f"{k}.webp", Image.fromarray(arr), "WEBP"
            save(img, root / cls / name, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
            made[f"{cls}/{name}"] = cls
    return made


def test_class_folders_with_broken_files(tmp_path):
    rng = np.random.default_rng(0)
    src, out = tmp_path / "src", tmp_path / "out"
    made = make_class_folders(src, rng)
    # Exact values for the mode conversions: transparency goes onto white, 16-bit grey is scaled (not clipped).
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 0)  # fully transparent red
    rgba[:, 8:] = (0, 0, 255, 255)  # opaque blue
    save(Image.fromarray(rgba), src / "cat" / "alpha.png")
    save(Image.fromarray(np.full((10, 12), 257 * 100, dtype=np.uint16)), src / "dog" / "grey16.png")
    palette = Image.fromarray(np.repeat([[0] * 4 + [1] * 4], 8, axis=0).astype(np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0])  # index 0 red, but transparent; index 1 green
    save(palette, src / "dog" / "palette.png", transparency=0)
    grey_alpha = np.zeros((8, 8, 2), dtype=np.uint8)
    grey_alpha[4:] = (50, 255)  # top half transparent black, bottom half opaque grey 50
    save(Image.fromarray(grey_alpha, "LA"), src / "cat" / "grey_alpha.png")
    known = rgb_noise(rng, 37, 50)  # non-square, 50 wide: the crop drops 6 columns left and 7 right
    save(known, src / "zebra" / "known.png")
    made |= {"cat/alpha.png": "cat", "dog/grey16.png": "dog", "dog/palette.png": "dog", "cat/grey_alpha.png": "cat",
             "zebra/known.png": "zebra"}
    # Broken inputs, one per reason.
    jpeg = io.BytesIO()
    rgb_noise(rng, 40, 40).save(jpeg, "JPEG")
    (src / "cat" / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (src / "dog" / "noise.png").write_bytes(rng.bytes(500))
    (src / "dog" / "broken.png").write_bytes(broken_png(rng))
    (src / "dog" / "empty.jpg").write_bytes(b"")
    os.symlink(tmp_path / "nowhere.png", src / "zebra" / "dangling.png")
    save(Image.new("1", (20000, 10000)), src / "zebra" / "bomb.png")  # 200 MP: over Pillow's hard limit
    # Not data: other extensions, hidden files, an image outside any class folder.
    (src / "cat" / "notes.txt").write_text("hello")
    (src / "cat" / ".DS_Store").write_bytes(b"\0\1")
    save(rgb_noise(rng, 8, 8), src / "stray.png")

    job, manifest = prepare(src, out, "prep.image_size=8", "prep.val_fraction=0.3", "prep.unit_docs=7")

    assert manifest["kind"] == "image" and manifest["image_size"] == 8 and manifest["channels"] == 3
    assert manifest["dtype"] == "uint8" and manifest["classes"] == ["cat", "dog", "zebra"]
    assert manifest["skipped"]["counts"] == {"corrupt": 1, "empty": 1, "not an image": 1, "too large": 1,
                                             "truncated": 1, "unreadable": 1}
    assert manifest["skipped"]["examples"]["truncated"][0].startswith("cat/cut.jpg: OSError")
    assert manifest["source"]["split"] == "content hash"
    assert manifest["source"]["ignored_files"] == 2  # notes.txt and stray.png
    # The content hash decides the split: recompute it from the file bytes.
    want_val = sorted(rel for rel in made if is_val((src / rel).read_bytes(), 0.3))
    assert 0 < len(want_val) < len(made)
    assert manifest["splits"]["val"]["images"] == len(want_val)
    assert manifest["splits"]["train"]["images"] == len(made) - len(want_val) == 18 + 5 - len(want_val)
    assert len(manifest["splits"]["train"]["shards"]) > 1

    items = keyed_items(job)
    classes = manifest["classes"]
    got = samples(out)
    assert sorted(items[k][0] for k, _, _ in got["val"]) == want_val
    for split, rows in got.items():
        for key, pixels, label in rows:
            rel = items[key][0]
            assert classes[label] == made[rel]
            assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
            if rel == "cat/alpha.png":
                np.testing.assert_array_equal(pixels[:, :4], 255)
                np.testing.assert_array_equal(pixels[:, 4:], np.broadcast_to([0, 0, 255], (8, 4, 3)))
            elif rel == "dog/grey16.png":
                np.testing.assert_array_equal(pixels, 100)
            elif rel == "dog/palette.png":
                np.testing.assert_array_equal(pixels[:, :4], 255)
                np.testing.assert_array_equal(pixels[:, 4:], np.broadcast_to([0, 255, 0], (8, 4, 3)))
            elif rel == "cat/grey_alpha.png":
                np.testing.assert_array_equal(pixels[:4], 255)
                np.testing.assert_array_equal(pixels[4:], 50)
            else:
                np.testing.assert_array_equal(pixels, reference(Image.open(src / rel), 8), err_msg=rel)
        # Seeded order, not class order: keys follow sha256(seed:path) within each split's units.
        rels = [items[k][0] for k, _, _ in rows]
        assert rels == sorted(rels, key=lambda r: order_key(0, r))
    # The known image, by hand: columns 6..43 of the 37 x 50 picture, box-averaged 37 -> 8.
    key = next(k for k, item in items.items() if item[0] == "zebra/known.png")
    pixels = next(p for rows in got.values() for k, p, _ in rows if k == key)
    crop = known.crop((6, 0, 43, 37))
    np.testing.assert_array_equal(pixels, np.asarray(crop.resize((8, 8), Image.BOX)))
    # read_image_shards gives the same, as arrays.
    images, labels = read_image_shards(str(out), "train")
    assert images.shape == (len(got["train"]), 8, 8, 3) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [lab for _, _, lab in got["train"]])
    # Only final shards and the manifest are left.
    names = sorted(os.listdir(out))
    assert names == sorted(["manifest.json"] + [s["name"] for v in manifest["splits"].values() for s in v["shards"]])


# ----------------------------------------------------------------------------- 2. sklearn digits


def test_digits_round_trip_exactly(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.rint(digits.images * 255 / 16).astype(np.uint8)  # 0..16 -> 0..255
    src, out = tmp_path / "digits", tmp_path / "out"
    for i, (img, target) in enumerate(zip(grey, digits.target)):
        save(Image.fromarray(img), src / str(target) / f"{i:04d}.png")

    job, manifest = prepare(src, out, "prep.image_size=8", "prep.val_fraction=0.1")

    assert manifest["classes"] == [str(d) for d in range(10)]
    assert manifest["skipped"]["counts"] == {}
    n_val = sum(is_val((src / str(t) / f"{i:04d}.png").read_bytes(), 0.1) for i, t in enumerate(digits.target))
    assert manifest["splits"]["val"]["images"] == n_val and 100 < n_val < 260
    assert manifest["splits"]["train"]["images"] == len(grey) - n_val == 1797 - n_val
    items = keyed_items(job)
    seen = 0
    for rows in samples(out).values():
        for key, pixels, label in rows:
            i = int(items[key][0].split("/")[1][:4])
            assert label == digits.target[i]
            for channel in range(3):  # grey -> RGB copies the value into each channel, no resize at 8 px
                np.testing.assert_array_equal(pixels[..., channel], grey[i])
            seen += 1
    assert seen == 1797


# ----------------------------------------------------------------------------- 3. CIFAR-10 pickles


def make_cifar(root, rng, per_batch: int = 7, test: int = 5) -> dict[str, dict]:
    """Fake CIFAR-10 python batches in the real format: {b"data": uint8 (N, 3072) CHW rows, b"labels": [...]}."""
    root.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=2)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        doc = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               b"labels": [int(x) for x in rng.integers(0, 10, n)],
               b"filenames": [f"{name}_{r}.png".encode() for r in range(n)]}
        with open(root / name, "wb") as f:
            pickle.dump(doc, f, protocol=2)  # protocol 2, as the Python 2 originals
        batches[name] = doc
    return batches


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(3)
    batches = make_cifar(tmp_path / "cifar-10-batches-py", rng)

    # The folder above cifar-10-batches-py works too (it is what the tarball extracts into).
    job, manifest = prepare(tmp_path, tmp_path / "out32", "prep.image_size=32", "prep.unit_docs=10")

    assert manifest["classes"][:3] == ["airplane", "automobile", "bird"] and len(manifest["classes"]) == 10
    assert manifest["splits"]["train"]["images"] == 35 and manifest["splits"]["val"]["images"] == 5
    assert manifest["source"]["kind"] == "cifar10"
    items = keyed_items(job)
    got = samples(tmp_path / "out32")
    for split, rows in got.items():
        assert len({items[k][0] == "test_batch" for k, _, _ in rows}) == 1
        assert (items[rows[0][0]][0] == "test_batch") == (split == "val")
        for key, pixels, label in rows:
            name, row = items[key]
            doc = batches[name]
            np.testing.assert_array_equal(pixels, doc[b"data"][row].reshape(3, 32, 32).transpose(1, 2, 0))
            assert label == doc[b"labels"][row]

    # At 16 px each output pixel is the mean of a 2 x 2 block. Pillow's BOX filter averages rows then columns in
    # two separable passes, rounding half up to 8 bits after each: model exactly that.
    _, manifest16 = prepare(tmp_path, tmp_path / "out16", "prep.image_size=16", "prep.unit_docs=10")
    images16, labels16 = read_image_shards(str(tmp_path / "out16"), "val")
    assert images16.shape == (5, 16, 16, 3)
    images32, labels32 = read_image_shards(str(tmp_path / "out32"), "val")
    np.testing.assert_array_equal(labels16, labels32)
    x = images32.astype(np.int64)
    across = (x[:, :, 0::2] + x[:, :, 1::2] + 1) // 2
    np.testing.assert_array_equal(images16, (across[:, 0::2] + across[:, 1::2] + 1) // 2)
    assert np.abs(images16 - x.reshape(5, 16, 2, 16, 2, 3).mean(axis=(2, 4))).max() <= 1.0  # the exact mean


def test_cifar_refuses_code_in_pickles(tmp_path):
    rng = np.random.default_rng(4)
    make_cifar(tmp_path / "c", rng, per_batch=2, test=2)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "c" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DataPrepError, match="data_batch_2 is not a CIFAR-10 pickle: refusing to load"):
        prepare(tmp_path / "c", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 4. the ImageNet layout


WNIDS = ["n01440764", "n01443537", "n01484850"]


def make_imagenet(root, rng, val: str) -> dict[str, int]:
    """train/<wnid>/*.JPEG and a val split laid out as `val`; returns {relative path: label}."""
    labels = {}
    for c, wnid in enumerate(WNIDS):
        for k in range(4):
            rel = f"train/{wnid}/{wnid}_{k}.JPEG"
            save(rgb_noise(rng, int(rng.integers(12, 40)), int(rng.integers(12, 40))), root / rel, "JPEG")
            labels[rel] = c
    lines = []
    for k in range(6):
        c = int(rng.integers(0, 3))
        stem = f"ILSVRC2012_val_{k + 1:08d}"
        rel = f"val/{WNIDS[c]}/{stem}.JPEG" if val == "folders" else f"val/{stem}.JPEG"
        save(rgb_noise(rng, 30, 20), root / rel, "JPEG")
        labels[rel] = c
        lines.append((stem, WNIDS[c]))
    if val == "csv":  # Kaggle's file: the first word of PredictionString is the class
        text = "ImageId,PredictionString\n" + "".join(f"{s},{w} 1 2 30 40 {w} 3 4 5 6\n" for s, w in lines)
        (root / "LOC_val_solution.csv").write_text(text)
    elif val == "txt":
        (root / "val" / "val_labels.txt").write_text("".join(f"{s}.JPEG {w}\n" for s, w in lines))
    return labels


@pytest.mark.parametrize("val", ["folders", "csv", "txt"])
def test_imagenet_layout(tmp_path, val, capsys):
    rng = np.random.default_rng(5)
    src, out = tmp_path / "imagenet", tmp_path / "out"
    labels = make_imagenet(src, rng, val)
    save(rgb_noise(rng, 10, 10), src / "test" / "ILSVRC2012_test_00000001.JPEG")  # unlabelled: not used

    # Through the command line, as a user would run it.
    rc = main([f"prep.input={src}", f"data.path={out}", "prep.image_size=16", "data.shard_size_mb=0.01",
               "--no-progress"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["splits"]["train"]["images"] == 12 and printed["splits"]["val"]["images"] == 6

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == WNIDS and manifest["source"]["split"] == "source"
    assert manifest["source"]["ignored_files"] == 1 + (val != "folders")  # the test image (and the label file)
    job = make_job(src, out, "prep.image_size=16", "data.shard_size_mb=0.01")
    items = keyed_items(job)
    for split, rows in samples(out).items():
        assert len(rows) == {"train": 12, "val": 6}[split]
        for key, pixels, label in rows:
            rel, _ = items[key]
            assert rel.startswith(f"{split}/") and label == labels[rel]
            np.testing.assert_array_equal(pixels, reference(Image.open(src / rel), 16))


def test_imagenet_flat_val_needs_labels(tmp_path):
    rng = np.random.default_rng(6)
    src = tmp_path / "imagenet"
    make_imagenet(src, rng, "flat")
    with pytest.raises(DataPrepError, match="val/ holds no class folders .*LOC_val_solution.csv or val_labels.txt"):
        prepare(src, tmp_path / "out")
    (src / "val" / "val_labels.txt").write_text("ILSVRC2012_val_00000001.JPEG n01440764\n")
    with pytest.raises(DataPrepError, match=r"5 images without a line \(e.g. \['ILSVRC2012_val_00000002.JPEG'"):
        prepare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 5. HuggingFace datasets


def test_hf_saved_dataset(tmp_path):
    import datasets

    rng = np.random.default_rng(7)
    pics = [rgb_noise(rng, int(rng.integers(6, 30)), int(rng.integers(6, 30))) for _ in range(20)]
    labels = [int(x) for x in rng.integers(0, 4, 20)]
    ds = datasets.Dataset.from_dict({"image": pics, "label": labels}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))

    job, manifest = prepare(tmp_path / "hf", tmp_path / "out", "prep.image_size=4", "prep.val_fraction=0.25")

    assert manifest["classes"] == ["0", "1", "2", "3"] and manifest["source"]["kind"] == "hf"
    assert manifest["source"]["image_column"] == "image" and manifest["source"]["label_column"] == "label"
    stored = datasets.load_from_disk(str(tmp_path / "hf")).cast_column("image", datasets.Image(decode=False))
    n_val = sum(is_val(stored[i]["image"]["bytes"], 0.25) for i in range(20))
    assert manifest["splits"]["val"]["images"] == n_val and manifest["splits"]["train"]["images"] == 20 - n_val
    items = keyed_items(job)
    for rows in samples(tmp_path / "out").values():
        for key, pixels, label in rows:
            _, row = items[key]
            assert label == labels[row]
            np.testing.assert_array_equal(pixels, reference(pics[row], 4))


def test_hf_dataset_dict_with_classlabel_and_a_broken_row(tmp_path):
    import datasets

    rng = np.random.default_rng(8)
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["x", "y", "z"])})

    def split(n):
        pics = [{"bytes": png(rgb_noise(rng, 9, 12)), "path": None} for _ in range(n)]
        return pics, [int(x) for x in rng.integers(0, 3, n)]

    def png(img):
        b = io.BytesIO()
        img.save(b, "PNG")
        return b.getvalue()

    train_pics, train_labels = split(10)
    train_pics[3] = {"bytes": b"definitely not an image", "path": None}
    test_pics, test_labels = split(4)
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"img": train_pics, "fine": train_labels}, features=features),
        "test": datasets.Dataset.from_dict({"img": test_pics, "fine": test_labels}, features=features),
    })
    dd.save_to_disk(str(tmp_path / "hf"))

    _, manifest = prepare(tmp_path / "hf", tmp_path / "out", "prep.image_size=6")

    assert manifest["classes"] == ["x", "y", "z"] and manifest["source"]["split"] == "source"
    assert manifest["source"]["source_splits"] == {"train": "train", "val": "test"}
    assert manifest["splits"]["train"]["images"] == 9 and manifest["splits"]["val"]["images"] == 4
    assert manifest["skipped"]["counts"] == {"not an image": 1}
    assert manifest["skipped"]["examples"]["not an image"] == ["train[3]"]
    images, labels = read_image_shards(str(tmp_path / "out"), "val")
    assert sorted(labels.tolist()) == sorted(test_labels)


def test_hf_string_labels_and_an_exact_val_count(tmp_path):
    import datasets

    rng = np.random.default_rng(11)
    pics = [rgb_noise(rng, 10, 14) for _ in range(12)]
    kinds = ["dog", "cat", None, "dog", "cat", "cat", "dog", "cat", "dog", "dog", "cat", "cat"]
    ds = datasets.Dataset.from_dict({"picture": pics, "kind": kinds}).cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))

    job, manifest = prepare(tmp_path / "hf", tmp_path / "out", "prep.image_size=4", "prep.val_docs=3",
                            "prep.label_field=kind")

    assert manifest["classes"] == ["cat", "dog"]  # sorted names
    assert manifest["skipped"]["counts"] == {"no label": 1} and manifest["skipped"]["examples"]["no label"] == [
        "row 2: label None"]
    # val_docs: the 3 smallest content hashes of all rows go to val (the unlabelled row may be one of them).
    stored = datasets.load_from_disk(str(tmp_path / "hf")).cast_column("picture", datasets.Image(decode=False))
    hashes = [int.from_bytes(hashlib.blake2b(stored[i]["picture"]["bytes"], digest_size=8,
                                             salt=bytes(8)).digest(), "little") for i in range(12)]
    threshold = sorted(hashes)[2]
    want_val = sorted(i for i in range(12) if hashes[i] <= threshold and kinds[i] is not None)
    items = keyed_items(job)
    got = samples(tmp_path / "out")
    assert sorted(items[k][1] for k, _, _ in got["val"]) == want_val
    assert manifest["splits"]["train"]["images"] == 11 - len(want_val)
    for rows in got.values():
        for key, pixels, label in rows:
            row = items[key][1]
            assert manifest["classes"][label] == kinds[row]
            np.testing.assert_array_equal(pixels, reference(pics[row], 4))


def test_hf_hub_unreachable_offline(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataPrepError, match=r"hf:nobody/no-such-images: cannot load the dataset \(HF_HUB_OFFLINE"):
        prepare("hf:nobody/no-such-images", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 6. determinism, reuse, resume


@pytest.mark.slow
def test_workers_resume_reuse_and_refusal(tmp_path, monkeypatch):
    rng = np.random.default_rng(9)
    src = tmp_path / "src"
    for k in range(40):
        save(rgb_noise(rng, int(rng.integers(10, 30)), int(rng.integers(10, 30))), src / f"c{k % 4}" / f"{k}.png")
    (src / "c0" / "bad.png").write_bytes(broken_png(rng))
    args = ("prep.image_size=8", "prep.unit_docs=6", "prep.val_fraction=0.2")

    _, one = prepare(src, tmp_path / "w1", *args, workers=1)
    _, two = prepare(src, tmp_path / "w2", *args, workers=2)
    assert shard_digests(one) == shard_digests(two)
    assert one["skipped"] == two["skipped"] and one["skipped"]["counts"] == {"corrupt": 1}
    assert one["splits"]["train"]["images"] + one["splits"]["val"]["images"] == 40
    assert len(one["splits"]["train"]["shards"]) >= 7  # one or more per unit: 41 images / 6 per unit

    # A second run on a finished folder is a no-op returning the same manifest.
    mtimes = {p: os.stat(tmp_path / "w1" / p).st_mtime_ns for p in os.listdir(tmp_path / "w1")}
    _, again = prepare(src, tmp_path / "w1", *args)
    assert again == one
    assert {p: os.stat(tmp_path / "w1" / p).st_mtime_ns for p in os.listdir(tmp_path / "w1")} == mtimes

    # A job killed after two units resumes and ends with the same bytes.
    calls = []
    real = ImageJob.run_unit

    def dies_on_third(self, index, *a, **kw):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(self, index, *a, **kw)

    monkeypatch.setattr(ImageJob, "run_unit", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "w3", *args)
    assert len(os.listdir(tmp_path / "w3" / "_work" / "units")) == 2
    monkeypatch.setattr(ImageJob, "run_unit", real)
    _, resumed = prepare(src, tmp_path / "w3", *args)
    assert shard_digests(resumed) == shard_digests(one)

    # Other settings on the same folder are refused, unless overwrite.
    with pytest.raises(DataPrepError, match="image_size"):
        prepare(src, tmp_path / "w1", "prep.image_size=4", "prep.unit_docs=6", "prep.val_fraction=0.2")
    _, smaller = prepare(src, tmp_path / "w1", "prep.image_size=4", "prep.unit_docs=100", "prep.val_fraction=0.2",
                         overwrite=True)
    assert smaller["image_size"] == 4
    assert len(smaller["splits"]["train"]["shards"]) < len(one["splits"]["train"]["shards"])
    names = sorted(os.listdir(tmp_path / "w1"))  # the larger dataset's extra shards are gone
    assert names == sorted(["manifest.json"] + [s["name"] for v in smaller["splits"].values() for s in v["shards"]])
    assert read_image_shards(str(tmp_path / "w1"), "train")[0].shape[1:] == (4, 4, 3)


def test_fsspec_urls_in_and_out(tmp_path):
    """Input and output on any fsspec filesystem (here memory://), not only local paths."""
    rng = np.random.default_rng(10)
    src, out = f"memory://in-{uuid.uuid4().hex}", f"memory://out-{uuid.uuid4().hex}"
    pics = {}
    for k in range(6):
        img = rgb_noise(rng, 12, 9)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        with fsspec.open(f"{src}/train/{'ab'[k % 2]}/{k}.png", "wb") as f:
            f.write(buf.getvalue())
        pics[f"train/{'ab'[k % 2]}/{k}.png"] = img
    img = rgb_noise(rng, 9, 9)
    with fsspec.open(f"{src}/val/b/v.png", "wb") as f:
        img.save(f, "PNG")
    pics["val/b/v.png"] = img

    job, manifest = prepare(src, out, "prep.image_size=4")

    assert manifest["splits"]["train"]["images"] == 6 and manifest["splits"]["val"]["images"] == 1
    items = keyed_items(job)
    for rows in samples(out).values():
        for key, pixels, label in rows:
            rel = items[key][0]
            assert label == "ab".index(rel.split("/")[1])
            np.testing.assert_array_equal(pixels, reference(pics[rel], 4))


# ----------------------------------------------------------------------------- 7. bad inputs fail before any work


def test_bad_inputs_fail_before_writing(tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(DataPrepError, match=f"prep.input {missing}: no such file or folder"):
        prepare(missing, out)
    with pytest.raises(DataPrepError, match="prep.input is empty"):
        prepare("", out)
    (tmp_path / "a.tar").write_bytes(b"x")
    with pytest.raises(DataPrepError, match="a.tar: is a file"):
        prepare(tmp_path / "a.tar", out)
    (tmp_path / "flat").mkdir()
    save(rgb_noise(np.random.default_rng(0), 4, 4), tmp_path / "flat" / "x.png")
    with pytest.raises(DataPrepError, match="flat: no class sub-folders"):
        prepare(tmp_path / "flat", out)
    (tmp_path / "nothing" / "cls").mkdir(parents=True)
    with pytest.raises(DataPrepError, match="no images found"):
        prepare(tmp_path / "nothing", out)
    assert not out.exists()
