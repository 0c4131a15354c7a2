"""Image sample quality: sample grids, FID and Inception Score, without downloading anything (docs/image_metrics.md).

- ``save_image_grid``: uint8 images -> one PNG of tiles, on a local path or any fsspec URL; ``save_sample_grid``:
  a model's sampled tokens as such a PNG when they are pixels.
- Feature extractors: modules with a ``name`` that map uint8 images (N, 3, H, W) to ``(features (N, D),
  logits (N, K))``. ``inception_extractor(weights_path)`` is the InceptionV3 of the FID literature (torchmetrics'
  ``NoTrainInceptionV3`` from torch-fidelity) built from a local weights file; ``StandInFeatures`` is a small
  fixed random network for tests and CPU smoke runs, whose FIDs are NOT comparable to published FIDs.
- ``FeatureStats``: mean and covariance of features, accumulated batch by batch in float64, saved as ``.npz``.
- ``reference_stats``: the stats of a prepared image split (data_prep.images shards), computed once and cached
  beside the shards. ``frechet_distance``, ``fid`` and ``inception_score`` on top.
- ``independent_pixel_baseline``: the bits per dimension of the best independent per-pixel model, the bar a model
  of pixel tokens must clear.

Images are uint8 everywhere: arrays (N, H, W, 3) as data prep and the sampler produce them, (N, H, W) grey, or
channels-first (N, 3, H, W) / (N, 1, H, W); numpy or torch. A layout whose last axis is 1 or 3 is channels-last.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import os
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path

import fsspec
import numpy as np
import torch
from torch import nn

from prime_scale.data.shards import iter_image_samples, list_shards, read_manifest
from prime_scale.storage import atomic_write_bytes

log = logging.getLogger("prime_scale.image_metrics")

Images = np.ndarray | torch.Tensor

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# pytorch-fid's pt_inception-2015-12-05-6726825d.pth and torch-fidelity's weights-inception-2015-12-05-6726825d.pth
# are the same file (the TF 2015-12-05 Inception graph ported to PyTorch): 95,628,359 bytes with this SHA-256.
INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_WEIGHTS_URLS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)
INCEPTION_NAME = "inception-v3-compat"


# ------------------------------------------------------------------------------------------------ layouts


def _channels_last(images: Images) -> np.ndarray:
    """uint8 (N, H, W, C) numpy with C = 1 or 3, from any accepted layout."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.shape[-1] in (1, 3):
        return x
    if x.shape[1] in (1, 3):
        return x.transpose(0, 2, 3, 1)
    raise ValueError(f"images of shape {x.shape} have neither 1 nor 3 channels on axis 1 or -1")


def to_nchw(images: Images) -> torch.Tensor:
    """uint8 images in any accepted layout -> a uint8 torch tensor (N, 3, H, W); grey is copied to 3 channels."""
    x = _channels_last(images)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _batches(images: Images | Iterable[Images], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of at most batch_size from one array of images, or from an iterable of such
    arrays, each a batch (so 50k generated samples can stream from the sampler without being held at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = [images] if isinstance(images, (np.ndarray, torch.Tensor)) else images
    for chunk in chunks:
        for i in range(0, len(chunk), batch_size):
            yield to_nchw(chunk[i : i + batch_size])


# ------------------------------------------------------------------------------------------------ grids


def save_image_grid(images: Images, path: str | os.PathLike, nrow: int | None = None, pad: int = 2,
                    scale: int = 1, pad_value: int = 255) -> Path | str:
    """Tile uint8 images into one PNG at ``path`` (a local path or any fsspec URL) and return where it went.

    ``images``: (N, H, W, 3) RGB or (N, H, W) grey, numpy or torch (channels-first works too). ``nrow``: tiles
    per row, as in torchvision's make_grid (default ceil(sqrt(N)), a near-square grid); ``pad`` pixels of
    ``pad_value`` between tiles (not around the border); every tile upscaled by the integer ``scale`` with
    nearest neighbour, so 8x8 images stay crisp and visible. A grey input gives a grey ("L") PNG. Returns a
    ``Path`` for a local path, else the URL.
    """
    from PIL import Image

    x = _channels_last(images)
    n, h, w, c = x.shape
    if n == 0:
        raise ValueError("no images to tile")
    if scale < 1 or pad < 0:
        raise ValueError(f"scale must be >= 1 and pad >= 0, got scale={scale}, pad={pad}")
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = r * (h + pad), q * (w + pad)
        grid[top : top + h, left : left + w] = x[i]
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buf, format="PNG")
    url = os.fspath(path)
    with fsspec.open(url, "wb", auto_mkdir=True) as f:
        f.write(buf.getvalue())
    return url if "://" in url else Path(url)


def save_sample_grid(manifest: dict, tokens: torch.Tensor, path: Path) -> Path | None:
    """A PNG of the samples when the tokens are pixels (image shards or the digits), else None."""
    if manifest.get("kind") == "image":
        side = manifest["image_size"]
        images = tokens.numpy().astype(np.uint8).reshape(len(tokens), side, side, 3)
    elif manifest.get("kind") == "digits":
        side, levels = manifest["image_size"], manifest["levels"]
        images = (tokens.numpy() * 255 // (levels - 1)).astype(np.uint8).reshape(len(tokens), side, side)
    else:
        return None
    return save_image_grid(images, path, scale=max(1, 64 // side))


# ------------------------------------------------------------------------------------------------ extractors


class StandInFeatures(nn.Module):
    """A small fixed random conv net standing in for InceptionV3 in tests and CPU smoke runs.

    uint8 images (N, 3, H, W), any H, W >= 8 -> ``(features (N, num_features), logits (N, num_classes))``. Three
    3x3 convs (stride 1, 2, 2) with ReLU, global average pooling, a linear head; weights drawn from numpy's PCG64
    with ``seed`` (stable across numpy and torch versions), never trained, always in eval mode without grad.
    It tells image sets apart (brightness, noise, content move its features), so FID and IS behave sensibly, but
    its FIDs are NOT comparable to published FIDs, nor across different seeds or sizes: use ``inception_extractor``
    for numbers to report.
    """

    def __init__(self, num_features: int = 64, num_classes: int = 10, seed: int = 0):
        super().__init__()
        self.name = f"standin-f{num_features}-c{num_classes}-s{seed}"
        rng = np.random.default_rng(seed)
        widths = [3, 16, 32, num_features]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1)
                                   for i, (a, b) in enumerate(itertools.pairwise(widths)))
        self.head = nn.Linear(num_features, num_classes)
        for layer in [*self.convs, self.head]:
            fan_in = layer.weight[0].numel()
            # He-scaled weights keep activations O(1) through the ReLUs; small biases break the symmetry at zero.
            layer.weight.data = torch.from_numpy(rng.normal(0, math.sqrt(2 / fan_in), layer.weight.shape)).float()
            layer.bias.data = torch.from_numpy(rng.normal(0, 0.1, layer.bias.shape)).float()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> StandInFeatures:
        return super().train(False)  # fixed features: never leave eval mode

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or min(x.shape[2:]) < 8:
            raise ValueError(f"expected uint8 images (N, 3, H, W) with H, W >= 8, got {x.dtype} {tuple(x.shape)}")
        h = (x.float() - 127.5) / 127.5
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i < len(self.convs) - 1:
                h = torch.relu(h)
        features = h.mean(dim=(2, 3))
        return features, self.head(features)


class InceptionFeatures(nn.Module):
    """InceptionV3 as in the FID / IS literature: 2048 pool features and 1008 logits of uint8 (N, 3, H, W)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.name = INCEPTION_NAME
        self.net = net.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # BatchNorm must keep the published running statistics

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net(x)
        # IS uses the logits without the fc bias, as torch-fidelity's "logits_unbiased" (and the original TF code).
        return features, features @ self.net.fc.weight.T


def _weights_help() -> str:
    return (f"FID/IS need InceptionV3's weights in a local file, the standard {INCEPTION_WEIGHTS_FILE} "
            f"(95,628,359 bytes, sha256 {INCEPTION_WEIGHTS_SHA256[:16]}...). Nothing is downloaded at run time: on a "
            f"machine with internet, fetch {INCEPTION_WEIGHTS_URLS[0]} (or {INCEPTION_WEIGHTS_URLS[1]}, the same "
            f"file), copy it here and pass its path")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inception_extractor(weights_path: str, check_hash: bool = True) -> InceptionFeatures:
    """The FID InceptionV3 (torchmetrics' ``NoTrainInceptionV3``, name ``inception-v3-compat``) from a LOCAL file.

    Never downloads: an empty or missing ``weights_path`` raises FileNotFoundError naming the expected file and
    where to get it. ``check_hash`` refuses any other file than the standard weights (their SHA-256), since FIDs
    from other weights are not comparable to published ones. Images are resized to 299 inside with
    TensorFlow 1.x's bilinear resize (``antialias=False``), exactly as the original TF FID code and torch-fidelity
    do; needs ``pip install torch-fidelity`` (and a torchvision matching the installed torch).
    """
    if not weights_path:
        raise FileNotFoundError(f"no InceptionV3 weights path given. {_weights_help()}.")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"InceptionV3 weights {weights_path!r}: no such file. {_weights_help()}.")
    if check_hash and _sha256(weights_path) != INCEPTION_WEIGHTS_SHA256:
        raise ValueError(f"InceptionV3 weights {weights_path!r} are not the standard file (sha256 differs): "
                         f"{_weights_help()}; or pass check_hash=False for weights of your own")
    try:
        import torch_fidelity  # noqa: F401  (imports torchvision: a build for another torch fails right here)
        from torchmetrics.image.fid import NoTrainInceptionV3
    except (ImportError, RuntimeError) as e:
        raise ImportError(f"the InceptionV3 extractor needs torch-fidelity (pip install torch-fidelity) and a "
                          f"torchvision built for the installed torch: {type(e).__name__}: {e}") from e
    net = NoTrainInceptionV3(name=INCEPTION_NAME, features_list=["2048"], feature_extractor_weights_path=weights_path,
                             antialias=False)
    return InceptionFeatures(net)


def _device(extractor: nn.Module) -> torch.device:
    for t in extractor.parameters():
        return t.device
    return torch.device("cpu")


def extract(images: Images | Iterable[Images], extractor: nn.Module,
            batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(features, logits)`` as float64 numpy, one pair per batch of at most batch_size images."""
    device = _device(extractor)
    with torch.inference_mode():
        for x in _batches(images, batch_size):
            features, logits = extractor(x.to(device))
            yield features.double().cpu().numpy(), logits.double().cpu().numpy()


# ------------------------------------------------------------------------------------------------ statistics


class FeatureStats:
    """Mean, covariance and count of feature vectors, accumulated batch by batch in float64.

    Batches merge with Chan et al.'s pairwise update of the mean and the centered sum of outer products, which
    stays accurate when the features' mean is large next to their spread (the naive sum of x x^T does not).
    ``cov`` is the unbiased sample covariance (ddof 1), as ``np.cov`` in the reference FID code.
    """

    def __init__(self, mean: np.ndarray | None = None, cov: np.ndarray | None = None, count: int = 0):
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.count = int(count)
        self._m2 = None if cov is None else np.asarray(cov, dtype=np.float64) * max(self.count - 1, 0)
        self._cov = None if cov is None else np.asarray(cov, dtype=np.float64)  # kept as given (count may be 0)

    @property
    def cov(self) -> np.ndarray:
        if self._cov is None:
            if self.count < 2:
                raise ValueError(f"a covariance needs at least 2 feature vectors, have {self.count}")
            self._cov = self._m2 / (self.count - 1)
        return self._cov

    def update(self, features) -> FeatureStats:
        """Add a batch (B, D) of feature vectors; returns self."""
        x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (batch, dim), got shape {x.shape}")
        if len(x) == 0:
            return self
        if self.mean is not None and self.count == 0:
            raise ValueError("these stats were loaded without a count: they cannot be accumulated further")
        b_mean = x.mean(axis=0)
        centered = x - b_mean
        b_m2 = centered.T @ centered
        if self.mean is None:
            self.mean, self._m2, self.count = b_mean, b_m2, len(x)
        else:
            if x.shape[1] != len(self.mean):
                raise ValueError(f"features of dim {x.shape[1]} added to stats of dim {len(self.mean)}")
            n = self.count + len(x)
            delta = b_mean - self.mean
            self._m2 = self._m2 + b_m2 + np.outer(delta, delta) * (self.count * len(x) / n)
            self.mean = self.mean + delta * (len(x) / n)
            self.count = n
        self._cov = None
        return self

    def save(self, url: str, **meta: str) -> None:
        """Write ``mu``, ``sigma``, ``count`` (the key names of pytorch-fid's / torch-fidelity's stats files) and
        string ``meta`` to an ``.npz`` at a local path or fsspec URL, via a temporary name and a rename so a
        reader never sees half a file (and, on a local disk, fsync'd: ``storage.atomic_write_bytes``)."""
        buf = io.BytesIO()
        np.savez(buf, mu=self.mean, sigma=self.cov, count=np.int64(self.count), **{k: np.str_(v) for k, v in
                                                                                    meta.items()})
        fs, path = fsspec.core.url_to_fs(url)
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        atomic_write_bytes(fs, path, buf.getvalue())

    @classmethod
    def load(cls, url: str) -> FeatureStats:
        """Read an ``.npz`` with ``mu`` and ``sigma`` (``count`` optional: published stats files lack it)."""
        stats, _ = cls._load(url)
        return stats

    @classmethod
    def _load(cls, url: str) -> tuple[FeatureStats, dict[str, str]]:
        with fsspec.open(url, "rb") as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
            meta = {k: str(data[k]) for k in data.files if k not in ("mu", "sigma", "count")}
            count = int(data["count"]) if "count" in data.files else 0
            return cls(data["mu"], data["sigma"], count), meta


def feature_stats(images: Images | Iterable[Images], extractor: nn.Module,
                  batch_size: int = 256) -> FeatureStats:
    """FeatureStats of the extractor's features over all images (an array or an iterable of arrays)."""
    stats = FeatureStats()
    for features, _ in extract(images, extractor, batch_size):
        stats.update(features)
    return stats


def _split_fingerprint(url: str, split: str) -> str:
    """What the prepared split is: the manifest's shard names, sizes and SHA-256s (else the listed shards' names
    and sizes), hashed. A re-prepared dataset gets a new fingerprint, so stale cached stats are not reused."""
    try:
        shards = read_manifest(url)["splits"][split]["shards"]
    except (FileNotFoundError, KeyError):
        fs, _ = fsspec.core.url_to_fs(url)
        shards = [[posixpath.basename(p), fs.size(p)] for p in list_shards(url, split)]
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:16]


def reference_stats(url: str, split: str, extractor: nn.Module, batch_size: int = 256,
                    max_images: int | None = None) -> FeatureStats:
    """FeatureStats of a prepared image split (``data_prep.images`` shards at ``url``), computed once.

    Cached as ``{url}/fid_stats_{split}_{extractor.name}.npz`` (``..._n{max_images}.npz`` for the first
    max_images images, in dataset order): a later call loads it, unless the shards changed since (fingerprint).
    Compute it on one rank before an evaluation that many ranks run at once.
    """
    suffix = "" if max_images is None else f"_n{max_images}"
    cache = f"{url.rstrip('/')}/fid_stats_{split}_{extractor.name}{suffix}.npz"
    fingerprint = _split_fingerprint(url, split)
    fs, path = fsspec.core.url_to_fs(cache)
    if fs.exists(path):
        stats, meta = FeatureStats._load(cache)
        if meta.get("fingerprint") == fingerprint:
            return stats
        log.warning("%s: the %s shards changed since these stats were computed; recomputing", cache, split)

    def pixels() -> Iterator[np.ndarray]:
        batch = []
        for i, (_, image, _) in enumerate(iter_image_samples(url, split)):
            if max_images is not None and i >= max_images:
                break
            batch.append(image)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    stats = feature_stats(pixels(), extractor, batch_size)
    if stats.count < 2:
        raise ValueError(f"split {split!r} at {url} has {stats.count} images: too few for reference stats")
    stats.save(cache, fingerprint=fingerprint, extractor=extractor.name, split=split)
    log.info("%s: reference stats of %d %s images", cache, stats.count, split)
    return stats


# ------------------------------------------------------------------------------------------------ metrics


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians N(mu_a, S_a), N(mu_b, S_b):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    As the reference FID code (pytorch-fid, torch-fidelity): scipy's sqrtm of S_a S_b; if that is not finite
    (near-singular covariances, e.g. fewer images than feature dims), retry with eps * I added to both; numerical
    imaginary parts are dropped when the diagonal's are negligible, and are an error otherwise.
    """
    from scipy import linalg

    mu1, mu2, s1, s2 = a.mean, b.mean, a.cov, b.cov
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"stats of different dims: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.warning("frechet_distance: singular product of covariances; adding %g to their diagonals", eps)
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid(images: Images | Iterable[Images], reference: FeatureStats, extractor: nn.Module,
        batch_size: int = 256) -> float:
    """FID of images (uint8, an array or an iterable of arrays) against reference stats from the same extractor.

    FID is biased upwards at small sample counts: compare numbers only at the same count (50k is the convention).
    """
    return frechet_distance(feature_stats(images, extractor, batch_size), reference)


def inception_score_from_logits(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) from class logits (N, K): the mean and std (ddof 0) over
    ``splits`` consecutive, equal-as-possible parts, p(y) being each part's mean of p(y|x) (Salimans et al.)."""
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    if x.ndim != 2 or len(x) < splits or splits < 1:
        raise ValueError(f"need logits (N, K) with N >= splits >= 1, got shape {tuple(x.shape)}, splits={splits}")
    scores = []
    for part in torch.tensor_split(x, splits):
        log_p = torch.log_softmax(part, dim=1)  # log p(y|x), in log space so confident logits do not underflow
        log_py = torch.logsumexp(log_p, dim=0) - math.log(len(part))  # log p(y), the part's marginal
        kl = (log_p.exp() * (log_p - log_py)).sum(dim=1)
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(images: Images | Iterable[Images], extractor: nn.Module, splits: int = 10,
                    batch_size: int = 256) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of uint8 images from the extractor's logits. Published IS values
    use InceptionV3's 1008 logits and 50k images in 10 splits; the stand-in's IS lies in [1, num_classes]."""
    logits = [lg for _, lg in extract(images, extractor, batch_size)]
    if not logits:
        raise ValueError("no images")
    return inception_score_from_logits(np.concatenate(logits), splits)


# ------------------------------------------------------------------------------------------------ baselines


def independent_pixel_baseline(train: np.ndarray, val: np.ndarray, levels: int) -> dict:
    """Bits per dimension on ``val`` of the best independent per-pixel categorical model fitted on ``train``:
    add-alpha smoothed counts per pixel, with alpha picked on the validation set itself (which favours the
    baseline: the comparison is as hard on the diffusion model as it can be)."""
    counts = np.stack([np.bincount(train[:, j], minlength=levels) for j in range(train.shape[1])])  # (D, levels)
    best = None
    for alpha in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0):
        probs = (counts + alpha) / (counts.sum(1, keepdims=True) + alpha * levels)
        nll = -np.log2(probs[np.arange(val.shape[1]), val]).mean()
        if best is None or nll < best["bits_per_dim"]:
            best = {"bits_per_dim": float(nll), "alpha": alpha}
    return best
