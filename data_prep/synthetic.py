"""Data prep for the synthetic Markov-chain source: sample sequences, write shards and a manifest.

``python -m data_prep.synthetic config=demo [data.path=...] [--overwrite]``

The manifest is written last and acts as the commit marker: a directory with a manifest whose
recorded shards all exist at their recorded sizes is complete.  Re-running with the same data
config reuses it; a different config is refused unless ``--overwrite`` is given, so a stale
dataset is never silently mixed with a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import sys
from dataclasses import asdict
from typing import Any, Optional

import fsspec
import numpy as np
from tqdm import tqdm

from prime_scale.cli import EXIT_OK, config_help, guarded, wants_help
from prime_scale.config import Config, DataConfig, load_config
from prime_scale.data.manifest import FORMAT_VERSION, DatasetManifest
from prime_scale.data.markov import CHAIN_FILENAME, DEFAULT_FLOOR, MarkovChain, load_markov_chain
from prime_scale.data.shards import (
    MANIFEST_FILENAME,
    read_manifest,
    token_dtype,
    write_manifest,
    write_token_shards,
)
from prime_scale.runlock import RunLock, RunLocked

__all__ = ["ConfigMismatchError", "load_markov_chain", "main", "prepare_markov"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Sampling happens in fixed-size chunks (for progress reporting); the chunk size is part of what
# determines the samples, so it is a constant rather than a knob.
_SAMPLE_CHUNK = 8192
# Fields of the data config that do not change the data: the manifest found at ``path`` is
# by definition at ``path``, so a copied dataset is still reusable.
_IGNORED_FIELDS = ("path",)


class ConfigMismatchError(RuntimeError):
    """An existing dataset was prepared with a different data config."""


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    # JSON round trip so ints/floats/lists compare the same as they were stored.
    return {k: v for k, v in json.loads(json.dumps(data)).items() if k not in _IGNORED_FIELDS}


def _is_complete(fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any]) -> bool:
    """Every recorded file (shards and chain) exists with its recorded size."""
    try:
        files = [shard for split in manifest["splits"].values() for shard in split["shards"]]
        files.append(manifest["chain"]["file"])
    except (KeyError, TypeError, AttributeError):
        return False
    for entry in files:
        path = posixpath.join(root, entry["name"])
        if not fs.exists(path) or fs.size(path) != entry["bytes"]:
            return False
    return True


def _sample(chain: MarkovChain, num: int, seq_len: int, rng: np.random.Generator, desc: str) -> np.ndarray:
    out = np.empty((num, seq_len), dtype=np.int64)
    with tqdm(total=num, desc=desc, unit="seq", disable=num < 4 * _SAMPLE_CHUNK) as bar:
        for start in range(0, num, _SAMPLE_CHUNK):
            stop = min(num, start + _SAMPLE_CHUNK)
            out[start:stop] = chain.sample(stop - start, seq_len, rng)
            bar.update(stop - start)
    return out


def prepare_markov(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Build the chain from ``cfg.data``, write train/val shards, chain.npy and manifest.json, or reuse them. What
    writes holds the folder's lock (prime_scale.runlock: a second job on it meanwhile is refused with RunLocked)."""
    data: DataConfig = cfg.data
    if data.source != "markov":
        raise ValueError(f"prepare_markov needs data.source='markov', got {data.source!r}")
    if data.seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {data.seq_len}")
    if data.train_sequences < 1 or data.val_sequences < 0:
        raise ValueError("data.train_sequences must be >= 1 and data.val_sequences >= 0")
    if data.shard_size_mb <= 0:
        raise ValueError(f"data.shard_size_mb must be > 0, got {data.shard_size_mb}")

    url = data.path.rstrip("/")
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    data_section = asdict(data)
    try:
        existing = read_manifest(url)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        old, new = _comparable(existing.get("config", {})), _comparable(data_section)
        if old != new and not overwrite:
            diff = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
            raise ConfigMismatchError(
                f"{url} holds a dataset prepared with a different data config (field: (existing, requested)): "
                f"{diff}. Use another data.path, or pass overwrite=True / --overwrite to replace it."
            )
        current = existing.get("format_version") == FORMAT_VERSION
        if old == new and not overwrite and current and _is_complete(fs, root, existing):
            log.info("reusing prepared Markov dataset at %s (manifest matches the config)", url)
            return existing
    with RunLock(url, purpose="data prep", stale_minutes=cfg.ckpt.lock_stale_minutes):
        return _write_markov(cfg, fs, root, existing, overwrite)


def _write_markov(cfg: Config, fs, root: str, existing: Optional[dict], overwrite: bool) -> dict[str, Any]:
    """The writing part of prepare_markov, under the folder's lock."""
    data, url, data_section = cfg.data, cfg.data.path.rstrip("/"), asdict(cfg.data)
    if existing is not None:
        old, new = _comparable(existing.get("config", {})), _comparable(data_section)
        # Drop the commit marker first: a crash mid-rewrite must not leave an old manifest
        # describing new shards.
        log.info("%s dataset at %s", "overwriting" if old != new or overwrite else "completing incomplete", url)
        fs.rm(posixpath.join(root, MANIFEST_FILENAME))

    chain = MarkovChain.from_seed(data.vocab_size, data.markov_concentration, data.markov_seed)
    # Separate, independent streams per split: changing val_sequences never changes train data.
    train_seq, val_seq = np.random.SeedSequence(data.markov_seed).spawn(2)
    rngs = {"train": np.random.default_rng(train_seq), "val": np.random.default_rng(val_seq)}
    counts = {"train": data.train_sequences, "val": data.val_sequences}
    store = token_dtype(data.vocab_size - 1)
    shard_bytes = max(1, int(data.shard_size_mb * 2**20))

    splits: dict[str, Any] = {}
    for split in SPLITS:
        seqs = _sample(chain, counts[split], data.seq_len, rngs[split], desc=f"sampling {split}")
        shards = write_token_shards(seqs, url, split, shard_bytes, dtype=store)
        splits[split] = {"sequences": int(seqs.shape[0]), "tokens": int(seqs.size), "shards": shards}
        log.info("wrote %d %s sequences in %d shard(s)", seqs.shape[0], split, len(shards))

    chain_path = posixpath.join(root, CHAIN_FILENAME)
    chain.save(fs.unstrip_protocol(chain_path))
    with fs.open(chain_path, "rb") as f:
        chain_bytes = f.read()

    n = data.seq_len
    manifest = DatasetManifest(kind="markov", vocab_size=data.vocab_size, seq_len=n, dtype=store.name, splits=splits,
                               facts=_markov_facts(chain, data, chain_bytes)).to_json()
    write_manifest(url, manifest)
    log.info(
        "Markov dataset at %s: entropy rate %.6f nats, %.6f nats/token at seq_len %d",
        url,
        manifest["entropy_rate_nats"],
        manifest["sequence_entropy_per_token_nats"],
        n,
    )
    return manifest


def _markov_facts(chain: MarkovChain, data: DataConfig, chain_bytes: bytes) -> dict[str, Any]:
    """The Markov source's own manifest entries: the chain file and its exact entropies."""
    n = data.seq_len
    return {
        "source": "markov",
        "chain": {
            "num_states": chain.num_states,
            "concentration": data.markov_concentration,
            "seed": data.markov_seed,
            "floor": DEFAULT_FLOOR,
            "file": {
                "name": CHAIN_FILENAME,
                "bytes": len(chain_bytes),
                "sha256": hashlib.sha256(chain_bytes).hexdigest(),
            },
        },
        "entropy_rate_nats": chain.entropy_rate(),
        "stationary_entropy_nats": chain.stationary_entropy(),
        "sequence_entropy_nats": chain.sequence_entropy(n),
        "sequence_entropy_per_token_nats": chain.sequence_entropy_per_token(n),
        "config": asdict(data),
    }


PROG = "python -m data_prep.synthetic"


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.synthetic config=NAME [key=value ...] [--overwrite]``. Exit status 0: prepared (or
    already there); 2: a config error, data of another config at data.path (--overwrite replaces it), or a folder
    another job is writing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(f"{__doc__}\n{main.__doc__}\n\nKeys (config=NAME, then any of these as key=value):\n"
              f"{config_help(('data', 'run'))}")
        return EXIT_OK
    overwrite = "--overwrite" in argv
    argv = [a for a in argv if a != "--overwrite"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def prepare() -> int:
        cfg = load_config(argv, check_schedule=False)  # the training schedule is the training's to check
        manifest = prepare_markov(cfg, overwrite=overwrite)
        print(json.dumps({"path": cfg.data.path, "entropy_rate_nats": manifest["entropy_rate_nats"],
                          "sequence_entropy_per_token_nats": manifest["sequence_entropy_per_token_nats"],
                          "train_sequences": manifest["splits"]["train"]["sequences"],
                          "val_sequences": manifest["splits"]["val"]["sequences"]}, indent=2))
        return EXIT_OK

    return guarded(prepare, PROG, usage=(ConfigMismatchError, RunLocked))


if __name__ == "__main__":
    sys.exit(main())
