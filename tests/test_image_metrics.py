"""Image metrics (prime_scale/image_metrics.py): grids, the stand-in extractor, feature stats, FID, IS, the cached
reference stats of prepared shards, and the Inception extractor's refusals without network."""

from __future__ import annotations

import io
import os
import socket
import uuid

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.batch import run_job
from data_prep.images import ImageJob
from prime_scale.config import load_config
from prime_scale.data.shards import read_image_shards, read_manifest
from prime_scale.image_metrics import (
    INCEPTION_WEIGHTS_FILE,
    FeatureStats,
    StandInFeatures,
    feature_stats,
    fid,
    frechet_distance,
    inception_extractor,
    inception_score,
    inception_score_from_logits,
    reference_stats,
    save_image_grid,
    to_nchw,
)


def digits_rgb(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 RGB (N, 8, 8, 3), grey 0..16 scaled to 0..255, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.rint(digits.images[:n] * 255 / 16).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), digits.target[:n]


def shifted(images: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(images.astype(np.int64) + amount, 0, 255).astype(np.uint8)


def read_png(path) -> np.ndarray:
    with fsspec.open(str(path), "rb") as f:
        return np.asarray(Image.open(io.BytesIO(f.read())))


# ----------------------------------------------------------------------------- grids


def test_save_image_grid_tiles_and_size(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (5, 8, 6, 3), dtype=np.uint8)  # 0..254: a tile never equals the white padding

    path = save_image_grid(rgb, tmp_path / "sub" / "grid.png", nrow=3, pad=2, scale=2)

    assert path == tmp_path / "sub" / "grid.png"
    got = read_png(path)
    assert got.shape == (2 * 16 + 2, 3 * 12 + 2 * 2, 3)  # 2 rows x 3 columns of 16 x 12 tiles, 2 px between
    for i in range(5):
        r, c = divmod(i, 3)
        tile = got[r * 18 : r * 18 + 16, c * 14 : c * 14 + 12]
        np.testing.assert_array_equal(tile, rgb[i].repeat(2, axis=0).repeat(2, axis=1))
    assert (got[16:18] == 255).all() and (got[:, 12:14] == 255).all()  # the padding
    assert (got[18:, 28:] == 255).all()  # the empty sixth cell

    # Grey, as a torch tensor, to an fsspec URL: a grey PNG; the default grid is near-square (7 -> 3 x 3).
    grey = torch.from_numpy(rng.integers(0, 256, (7, 8, 8), dtype=np.uint8))
    url = f"memory://grids-{uuid.uuid4().hex}/g.png"
    assert save_image_grid(grey, url, pad=1) == url
    with fsspec.open(url, "rb") as f:
        img = Image.open(io.BytesIO(f.read()))
        assert img.mode == "L" and img.size == (3 * 8 + 2, 3 * 8 + 2)
        got = np.asarray(img)
    np.testing.assert_array_equal(got[9:17, 18:26], grey[5].numpy())

    # Channels-first RGB tiles the same as channels-last.
    save_image_grid(torch.from_numpy(rgb).permute(0, 3, 1, 2), tmp_path / "chw.png", nrow=3, scale=2)
    np.testing.assert_array_equal(read_png(tmp_path / "chw.png"), read_png(path))
    with pytest.raises(TypeError, match="uint8"):
        save_image_grid(rgb.astype(np.float32), tmp_path / "f.png")


# ----------------------------------------------------------------------------- extractors


def test_stand_in_is_fixed_and_takes_any_size():
    a, b, other = StandInFeatures(), StandInFeatures(), StandInFeatures(seed=1)
    x = to_nchw(digits_rgb(16)[0])
    fa, la = a(x)
    assert fa.shape == (16, 64) and la.shape == (16, 10) and not fa.requires_grad
    torch.testing.assert_close(fa, b(x)[0], rtol=0, atol=0)  # the same seed, the same network
    assert not torch.allclose(fa, other(x)[0])
    big = StandInFeatures(num_features=32, num_classes=7)(to_nchw(np.zeros((2, 40, 24, 3), np.uint8)))
    assert big[0].shape == (2, 32) and big[1].shape == (2, 7)
    a.train()
    assert not a.training  # fixed features never leave eval mode
    with pytest.raises(ValueError, match="H, W >= 8"):
        a(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        a(torch.zeros(1, 3, 8, 8))


def test_inception_extractor_refuses_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    for path in ["", str(tmp_path / "missing" / INCEPTION_WEIGHTS_FILE)]:
        with pytest.raises(FileNotFoundError) as err:
            inception_extractor(path)
        message = str(err.value)
        assert INCEPTION_WEIGHTS_FILE in message and "https://github.com/toshas/torch-fidelity/releases" in message
        assert "Nothing is downloaded" in message
    wrong = tmp_path / INCEPTION_WEIGHTS_FILE
    wrong.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="not the standard file"):
        inception_extractor(str(wrong))


# ----------------------------------------------------------------------------- stats and distances


def test_feature_stats_batches_match_numpy_and_round_trip():
    rng = np.random.default_rng(1)
    x = 1e4 + rng.normal(size=(503, 6)) @ rng.normal(size=(6, 6))  # a large mean next to the spread
    stats = FeatureStats()
    for lo, hi in [(0, 1), (1, 100), (100, 101), (101, 503)]:
        stats.update(x[lo:hi])
    assert stats.count == 503
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)

    url = f"memory://stats-{uuid.uuid4().hex}/s.npz"
    stats.save(url)
    back = FeatureStats.load(url)
    assert back.count == 503
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.cov, stats.cov)
    back.update(x[:3])  # a loaded count keeps accumulating exactly
    np.testing.assert_allclose(back.cov, np.cov(np.concatenate([x, x[:3]]), rowvar=False), rtol=1e-9)

    # A published stats file (mu and sigma only) loads, but has no count to accumulate onto.
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mean, sigma=stats.cov)
    with fsspec.open(url, "wb") as f:
        f.write(buf.getvalue())
    published = FeatureStats.load(url)
    np.testing.assert_array_equal(published.cov, stats.cov)
    with pytest.raises(ValueError, match="without a count"):
        published.update(x[:2])


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # the singular case, on purpose
def test_frechet_distance_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.5, 3.0])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))  # 7.25 + 4 + 1 + 0 + 0.5
    assert want == pytest.approx(12.75)
    got = frechet_distance(FeatureStats(mu1, np.diag(s1), 10), FeatureStats(mu2, np.diag(s2), 10))
    assert got == pytest.approx(want, rel=1e-12)
    # A common rotation of both Gaussians changes nothing (the covariances are full, non-diagonal matrices now).
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(4, 4)))
    rotated = frechet_distance(FeatureStats(q @ mu1, q @ np.diag(s1) @ q.T, 10),
                               FeatureStats(q @ mu2, q @ np.diag(s2) @ q.T, 10))
    assert rotated == pytest.approx(want, rel=1e-9)
    # Singular covariances (rank 1 each, orthogonal): sqrt(S1 S2) = 0.
    singular = frechet_distance(FeatureStats(np.zeros(2), np.diag([1.0, 0.0]), 10),
                                FeatureStats(np.ones(2), np.diag([0.0, 1.0]), 10))
    assert singular == pytest.approx(2.0 + 2.0, abs=1e-6)


def test_fid_zero_for_the_same_set_and_monotone_in_shift():
    images, _ = digits_rgb(600)
    extractor = StandInFeatures()
    reference = feature_stats(images, extractor, batch_size=128)

    perm = np.random.default_rng(3).permutation(len(images))
    same = fid(images[perm], reference, extractor, batch_size=50)  # other order and batches, the same set
    brightness = [fid(shifted(images, d), reference, extractor) for d in (20, 60, 120)]
    noise_rng = np.random.default_rng(4)
    noise = [fid(shifted(images, noise_rng.normal(0, s, images.shape).round().astype(np.int64)), reference, extractor)
             for s in (10, 30, 80)]

    assert brightness[0] > 0.01 and noise[0] > 0.01
    assert abs(same) < 1e-6 * brightness[0]
    assert brightness[0] < brightness[1] < brightness[2]
    assert noise[0] < noise[1] < noise[2]
    # An iterable of batches (streamed samples) gives the same number as one array.
    streamed = fid((shifted(images, 20)[i : i + 100] for i in range(0, 600, 100)), reference, extractor)
    assert streamed == pytest.approx(brightness[0], rel=1e-9)


def test_inception_score_formula_and_extractor():
    k, n = 10, 1000
    labels = np.arange(n) % k  # every split of 100 sees each class 10 times
    one_hot = 30.0 * np.eye(k)[labels]
    mean, std = inception_score_from_logits(one_hot, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
    assert inception_score_from_logits(np.zeros((n, k)), splits=10) == pytest.approx((1.0, 0.0))
    assert inception_score_from_logits(30.0 * np.eye(k)[labels % 2], splits=10)[0] == pytest.approx(2.0)
    # Softened predictions land in between, and the splits differ when the classes are unevenly spread.
    soft = inception_score_from_logits(np.eye(k)[labels] * 2.0, splits=10)[0]
    assert 1.0 < soft < k
    uneven = np.eye(k)[np.sort(labels)] * 30.0  # sorted: split j holds only class j -> each split scores 1
    assert inception_score_from_logits(uneven, splits=10) == pytest.approx((1.0, 0.0))

    images, _ = digits_rgb(200)
    extractor = StandInFeatures()
    logits = extractor(to_nchw(images))[1]
    got = inception_score(images, extractor, splits=4, batch_size=64)
    assert got == pytest.approx(inception_score_from_logits(logits.numpy(), splits=4), rel=1e-9)
    assert 1.0 < got[0] < 10.0
    with torch.no_grad():  # a head that predicts the same class for every image: IS = 1
        extractor.head.weight.zero_()
        extractor.head.bias.copy_(torch.arange(10.0) * 5)
    assert inception_score(images, extractor, splits=4) == pytest.approx((1.0, 0.0))


# ----------------------------------------------------------------------------- reference stats from shards


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    """The 1,797 digits as PNGs in class folders, prepared into 8x8 RGB shards by data_prep.images."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = digits_rgb()
    for i, (img, label) in enumerate(zip(images, labels)):
        path = root / "src" / str(label) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(path)
    out = root / "out"
    run_job(ImageJob(load_config([f"prep.input={root / 'src'}", f"data.path={out}", "prep.image_size=8",
                                  "prep.val_fraction=0.2"])), progress=False)
    return str(out)


def test_reference_stats_computed_once_from_shards(digits_shards, monkeypatch):
    url = digits_shards
    extractor = StandInFeatures()
    calls = []
    real_forward = StandInFeatures.forward

    def counted(self, x):
        calls.append(len(x))
        return real_forward(self, x)

    monkeypatch.setattr(StandInFeatures, "forward", counted)

    stats = reference_stats(url, "val", extractor, batch_size=64)

    val, _ = read_image_shards(url, "val")
    n_val = read_manifest(url)["splits"]["val"]["images"]
    assert stats.count == len(val) == n_val == sum(calls) and 250 < n_val < 470
    cache = os.path.join(url, f"fid_stats_val_{extractor.name}.npz")
    assert os.path.isfile(cache)
    direct = feature_stats(val, extractor, batch_size=1000)
    np.testing.assert_allclose(stats.mean, direct.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, direct.cov, rtol=1e-9, atol=1e-12)

    # The second call loads the file: the extractor never runs, the file is untouched.
    calls.clear()
    mtime = os.stat(cache).st_mtime_ns
    again = reference_stats(url, "val", extractor, batch_size=64)
    assert calls == [] and os.stat(cache).st_mtime_ns == mtime
    np.testing.assert_array_equal(again.mean, stats.mean)
    np.testing.assert_array_equal(again.cov, stats.cov)

    # The val images score FID ~ 0 against their own reference; the train images (other digits) a little more.
    calls.clear()
    assert abs(fid(val, again, extractor)) < 1e-9
    train, _ = read_image_shards(url, "train")
    assert fid(train, again, extractor) > 1e-4

    # max_images: its own cache file, the first images in dataset order.
    first = reference_stats(url, "val", extractor, batch_size=64, max_images=50)
    assert first.count == 50 and os.path.isfile(os.path.join(url, f"fid_stats_val_{extractor.name}_n50.npz"))
    np.testing.assert_allclose(first.mean, feature_stats(val[:50], extractor).mean, rtol=1e-12, atol=1e-12)

    # Stats written for other shards (another fingerprint) are recomputed, not reused.
    stats.save(cache, fingerprint="other shards")
    calls.clear()
    fresh = reference_stats(url, "val", extractor, batch_size=64)
    assert sum(calls) == n_val
    np.testing.assert_allclose(fresh.mean, stats.mean, rtol=1e-12, atol=1e-12)
    calls.clear()
    reference_stats(url, "val", extractor, batch_size=64)
    assert calls == []

