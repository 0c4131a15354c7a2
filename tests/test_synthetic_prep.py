"""Token shards (fsspec + webdataset) and the synthetic Markov data-prep job."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import uuid
from dataclasses import replace

import fsspec
import numpy as np
import pytest

from data_prep.synthetic import ConfigMismatchError, load_markov_chain, prepare_markov
from prime_scale.config import Config, DataConfig
from prime_scale.data.markov import MarkovChain
from prime_scale.data.shards import (
    list_shards,
    read_manifest,
    read_token_shards,
    write_manifest,
    write_token_shards,
)


def _memory_url() -> str:
    return f"memory://shards-{uuid.uuid4().hex}"


@pytest.fixture(params=["local", "memory"])
def root_url(request, tmp_path) -> str:
    return str(tmp_path / "data") if request.param == "local" else _memory_url()


def _sha256(url: str) -> str:
    with fsspec.open(url, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------- shards


def test_round_trip(root_url: str) -> None:
    seqs = np.random.default_rng(0).integers(0, 1000, size=(37, 19))
    infos = write_token_shards(seqs, root_url, "train", shard_size_bytes=1 << 20)
    assert [i["name"] for i in infos] == ["train-000000.tar"]
    assert infos[0]["samples"] == 37
    back = read_token_shards(root_url, "train")
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, seqs)
    # The recorded size and digest describe the file that landed.
    fs, path = fsspec.core.url_to_fs(root_url)
    assert fs.size(f"{path}/train-000000.tar") == infos[0]["bytes"]
    assert _sha256(f"{root_url}/train-000000.tar") == infos[0]["sha256"]
    # No temporary files are left behind.
    assert sorted(os.path.basename(p) for p in fs.ls(path, detail=False)) == ["train-000000.tar"]


@pytest.mark.parametrize("max_token,ext,itemsize", [(65535, "tokens.u16", 2), (65536, "tokens.u32", 4)])
def test_dtype_choice(tmp_path, max_token: int, ext: str, itemsize: int) -> None:
    seqs = np.array([[0, 1, max_token], [max_token, 7, 3]])
    write_token_shards(seqs, str(tmp_path), "val", shard_size_bytes=1 << 20)
    with tarfile.open(tmp_path / "val-000000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"000000000.{ext}", f"000000001.{ext}"]
        assert all(m.size == 3 * itemsize and m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
        raw = tar.extractfile(members[0]).read()
    np.testing.assert_array_equal(np.frombuffer(raw, dtype=f"<u{itemsize}"), [0, 1, max_token])
    np.testing.assert_array_equal(read_token_shards(str(tmp_path), "val"), seqs)


def test_forced_dtype(tmp_path) -> None:
    seqs = np.array([[1, 2], [3, 4]])
    write_token_shards(seqs, str(tmp_path), "train", 1 << 20, dtype=np.uint32)
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        assert tar.getnames()[0].endswith(".tokens.u32")
    with pytest.raises(ValueError, match="does not fit"):
        write_token_shards(np.array([[70000]]), str(tmp_path), "train", 1 << 20, dtype=np.uint16)


def test_shards_are_byte_identical_across_runs(tmp_path) -> None:
    seqs = np.random.default_rng(3).integers(0, 300, size=(100, 64))
    a = write_token_shards(seqs, str(tmp_path / "a"), "train", shard_size_bytes=20_000)
    b = write_token_shards(seqs, _memory_url(), "train", shard_size_bytes=20_000)
    assert len(a) > 1
    assert [(i["name"], i["bytes"], i["sha256"]) for i in a] == [(i["name"], i["bytes"], i["sha256"]) for i in b]
    for info in a:
        assert _sha256(str(tmp_path / "a" / info["name"])) == info["sha256"]


def test_multiple_shards_respect_target_size(tmp_path) -> None:
    seqs = np.random.default_rng(4).integers(0, 50000, size=(103, 300))  # 600 B payload -> 1536 B/sample
    infos = write_token_shards(seqs, str(tmp_path), "train", shard_size_bytes=16 * 1024)
    # (16384 - 1024) // 1536 = 10 samples per shard.
    assert [i["samples"] for i in infos] == [10] * 10 + [3]
    assert [i["name"] for i in infos] == [f"train-{k:06d}.tar" for k in range(11)]
    assert all(i["bytes"] <= 16 * 1024 + tarfile.RECORDSIZE for i in infos)
    assert [os.path.basename(p) for p in list_shards(str(tmp_path), "train")] == [i["name"] for i in infos]
    np.testing.assert_array_equal(read_token_shards(str(tmp_path), "train"), seqs)
    # Keys continue across shards.
    with tarfile.open(tmp_path / "train-000001.tar") as tar:
        assert tar.getnames()[0] == "000000010.tokens.u16"
    # A tiny target still writes one sample per shard rather than failing.
    assert len(write_token_shards(seqs[:3], str(tmp_path / "tiny"), "train", shard_size_bytes=1)) == 3


def test_rewrite_with_fewer_shards_removes_stale_ones(root_url: str) -> None:
    seqs = np.arange(40 * 8).reshape(40, 8)
    assert len(write_token_shards(seqs, root_url, "train", shard_size_bytes=5 * 1024)) > 2
    write_token_shards(seqs[:4], root_url, "train", shard_size_bytes=1 << 20)
    write_token_shards(seqs[:2] + 1, root_url, "val", shard_size_bytes=1 << 20)
    assert [os.path.basename(p) for p in list_shards(root_url, "train")] == ["train-000000.tar"]
    np.testing.assert_array_equal(read_token_shards(root_url, "train"), seqs[:4])
    np.testing.assert_array_equal(read_token_shards(root_url, "val"), seqs[:2] + 1)


def test_read_missing_split_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        read_token_shards(str(tmp_path), "train")


def test_write_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError):
        write_token_shards(np.zeros(5, dtype=np.int64), str(tmp_path), "train", 1024)
    with pytest.raises(ValueError):
        write_token_shards(np.full((2, 2), -1), str(tmp_path), "train", 1024)
    with pytest.raises(ValueError):
        write_token_shards(np.zeros((2, 2), dtype=np.int64), str(tmp_path), "../x", 1024)


def test_manifest_round_trip(root_url: str) -> None:
    manifest = {"source": "markov", "entropy": 1.2345678901234567, "splits": {"train": {"sequences": 3}}}
    write_manifest(root_url, manifest)
    assert read_manifest(root_url) == manifest
    write_manifest(root_url, {"replaced": True})
    assert read_manifest(root_url) == {"replaced": True}
    fs, path = fsspec.core.url_to_fs(root_url)
    assert [os.path.basename(p) for p in fs.ls(path, detail=False)] == ["manifest.json"]


def test_read_manifest_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        read_manifest(str(tmp_path))


# ----------------------------------------------------------------------------- prepare_markov


def _cfg(path: str, **overrides) -> Config:
    data = DataConfig(
        source="markov",
        path=path,
        vocab_size=16,
        seq_len=24,
        markov_concentration=0.3,
        markov_seed=7,
        train_sequences=300,
        val_sequences=50,
        shard_size_mb=0.01,  # ~10 KiB -> several train shards
    )
    return Config(data=replace(data, **overrides))


def _mtimes(path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(path.iterdir())}


def test_prepare_writes_manifest_and_data(tmp_path) -> None:
    cfg = _cfg(str(tmp_path / "markov"))
    manifest = prepare_markov(cfg)
    assert manifest == read_manifest(cfg.data.path)
    chain = MarkovChain.from_seed(16, 0.3, 7)
    assert manifest["source"] == "markov"
    assert manifest["vocab_size"] == 16 and manifest["seq_len"] == 24 and manifest["dtype"] == "uint16"
    assert manifest["entropy_rate_nats"] == pytest.approx(chain.entropy_rate(), abs=1e-15)
    assert manifest["sequence_entropy_per_token_nats"] == pytest.approx(chain.sequence_entropy_per_token(24), abs=1e-15)
    assert manifest["stationary_entropy_nats"] == pytest.approx(chain.stationary_entropy(), abs=1e-15)
    assert manifest["chain"]["num_states"] == 16 and manifest["chain"]["seed"] == 7
    assert manifest["config"]["train_sequences"] == 300 and manifest["config"]["path"] == cfg.data.path
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["sequences"], train["tokens"]) == (300, 300 * 24)
    assert (val["sequences"], val["tokens"]) == (50, 50 * 24)
    assert len(train["shards"]) > 1
    assert sum(s["samples"] for s in train["shards"]) == 300
    for shard in train["shards"] + val["shards"]:
        f = tmp_path / "markov" / shard["name"]
        assert f.stat().st_size == shard["bytes"]
        assert hashlib.sha256(f.read_bytes()).hexdigest() == shard["sha256"]

    train_seqs = read_token_shards(cfg.data.path, "train")
    val_seqs = read_token_shards(cfg.data.path, "val")
    assert train_seqs.shape == (300, 24) and val_seqs.shape == (50, 24)
    assert train_seqs.max() < 16
    # Train and val come from different streams.
    assert not np.array_equal(train_seqs[:50], val_seqs)
    # The stored chain reproduces the likelihoods, and the data's NLL is near the exact entropy.
    loaded = load_markov_chain(cfg.data.path)
    np.testing.assert_array_equal(loaded.transition, chain.transition)
    nll = -loaded.log_prob(train_seqs) / 24
    se = nll.std(ddof=1) / np.sqrt(len(nll))
    assert abs(nll.mean() - manifest["sequence_entropy_per_token_nats"]) < 4 * se


def test_prepare_is_deterministic(tmp_path) -> None:
    a = prepare_markov(_cfg(str(tmp_path / "a")))
    b = prepare_markov(_cfg(_memory_url()))
    assert a["splits"] == b["splits"]
    assert a["chain"]["file"] == b["chain"]["file"]


def test_prepare_reuses_matching_dataset(tmp_path, caplog) -> None:
    cfg = _cfg(str(tmp_path / "markov"))
    first = prepare_markov(cfg)
    before = _mtimes(tmp_path / "markov")
    with caplog.at_level("INFO", logger="data_prep.synthetic"):
        second = prepare_markov(cfg)
    assert second == first
    assert _mtimes(tmp_path / "markov") == before
    assert "reusing" in caplog.text


def test_prepare_regenerates_incomplete_dataset(tmp_path) -> None:
    cfg = _cfg(str(tmp_path / "markov"))
    first = prepare_markov(cfg)
    victim = tmp_path / "markov" / first["splits"]["train"]["shards"][1]["name"]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated shard
    again = prepare_markov(cfg)
    assert again["splits"] == first["splits"]
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == first["splits"]["train"]["shards"][1]["sha256"]


def test_prepare_refuses_changed_config(tmp_path) -> None:
    path = str(tmp_path / "markov")
    prepare_markov(_cfg(path))
    before = _mtimes(tmp_path / "markov")
    with pytest.raises(ConfigMismatchError, match="markov_seed"):
        prepare_markov(_cfg(path, markov_seed=8))
    assert _mtimes(tmp_path / "markov") == before


def test_prepare_overwrite_rewrites(tmp_path) -> None:
    path = str(tmp_path / "markov")
    first = prepare_markov(_cfg(path))
    cfg2 = _cfg(path, markov_seed=8, train_sequences=40, shard_size_mb=1.0)
    second = prepare_markov(cfg2, overwrite=True)
    assert second["config"]["markov_seed"] == 8
    assert second["entropy_rate_nats"] != first["entropy_rate_nats"]
    assert second["entropy_rate_nats"] == pytest.approx(MarkovChain.from_seed(16, 0.3, 8).entropy_rate(), abs=1e-15)
    assert read_manifest(path) == second
    # Old train shards beyond the new count are gone; the data is the new data.
    assert [s["name"] for s in second["splits"]["train"]["shards"]] == ["train-000000.tar"]
    assert sorted(p.name for p in (tmp_path / "markov").glob("train-*")) == ["train-000000.tar"]
    assert read_token_shards(path, "train").shape == (40, 24)
    np.testing.assert_array_equal(load_markov_chain(path).transition, MarkovChain.from_seed(16, 0.3, 8).transition)
    # Same config plus overwrite=True rewrites too (fresh mtimes) with identical bytes.
    before = _mtimes(tmp_path / "markov")
    third = prepare_markov(cfg2, overwrite=True)
    assert third == second
    assert _mtimes(tmp_path / "markov")["manifest.json"] != before["manifest.json"]


def test_prepare_memory_url() -> None:
    url = _memory_url()
    manifest = prepare_markov(_cfg(url, train_sequences=20, val_sequences=5))
    assert read_token_shards(url, "val").shape == (5, 24)
    assert prepare_markov(_cfg(url, train_sequences=20, val_sequences=5)) == manifest


def test_prepare_rejects_other_sources(tmp_path) -> None:
    with pytest.raises(ValueError, match="markov"):
        prepare_markov(_cfg(str(tmp_path), source="shards"))


def test_manifest_is_plain_json(tmp_path) -> None:
    prepare_markov(_cfg(str(tmp_path / "m"), train_sequences=10, val_sequences=2))
    text = (tmp_path / "m" / "manifest.json").read_text()
    assert json.loads(text)["splits"]["val"]["sequences"] == 2


def test_cli_prepares_reuses_and_overwrites(tmp_path, capsys) -> None:
    from data_prep import synthetic

    args = ["config=tiny", f"data.path={tmp_path / 'cli'}", "data.train_sequences=10", "data.val_sequences=2"]
    assert synthetic.main(args) == 0
    assert json.loads(capsys.readouterr().out)["train_sequences"] == 10
    manifest = tmp_path / "cli" / "manifest.json"
    first = manifest.stat().st_mtime_ns
    assert synthetic.main(args) == 0  # reused: nothing rewritten
    assert manifest.stat().st_mtime_ns == first
    assert synthetic.main(args[:-2] + ["data.train_sequences=12", "data.val_sequences=2"]) == 2  # mismatch: a config error
    assert synthetic.main(args[:-2] + ["data.train_sequences=12", "data.val_sequences=2", "--overwrite"]) == 0
    assert json.loads(manifest.read_text())["splits"]["train"]["sequences"] == 12
