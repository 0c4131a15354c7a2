"""Commit points survive a power loss: on a local disk every writer fsyncs a file before the rename that gives it
its final name and fsyncs the folder after it (prime_scale.storage), and CheckpointStore.save fsyncs every
file it wrote before its manifest and latest.json are written that way. os.fsync and os.replace are wrapped to
record what they are called on (the path of an fsync'd descriptor from /proc/self/fd), so the order is checked on
the real calls."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest
import torch

from prime_scale import storage
from prime_scale.data import shards
from prime_scale.data.shards import write_manifest
from prime_scale.storage import (
    atomic_upload,
    durable_replace,
    fsync_tree,
    move_into_place,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]
LOCAL = fsspec.filesystem("file")


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """("fsync", path) and ("replace", src, dst), in call order, for every os.fsync and os.replace of the test."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def fsyncs(events: list[tuple]) -> list[str]:
    return [e[1] for e in events if e[0] == "fsync"]


def assert_durable_rename(events: list[tuple], dst: str) -> tuple[int, str]:
    """The rename onto ``dst`` happened once, its source was fsync'd before it and dst's folder after it; returns
    (index of the rename, the temporary name)."""
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == dst]
    assert len(renames) == 1, events
    i = renames[0]
    tmp = events[i][1]
    assert os.path.dirname(tmp) == os.path.dirname(dst) and tmp != dst
    assert ("fsync", tmp) in events[:i], f"{tmp} not fsync'd before its rename: {events}"
    assert ("fsync", os.path.dirname(dst)) in events[i + 1:], f"folder of {dst} not fsync'd after the rename: {events}"
    return i, tmp


def test_write_json_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, calls):
    path = str(tmp_path / "sub" / "latest.json")
    write_json(LOCAL, path, {"tag": "step_00000001"})
    _, tmp = assert_durable_rename(calls, path)
    assert calls == [("fsync", tmp), ("replace", tmp, path), ("fsync", str(tmp_path / "sub"))]
    assert json.loads(Path(path).read_text()) == {"tag": "step_00000001"}
    assert os.listdir(tmp_path / "sub") == ["latest.json"]  # no temporary file left


def test_write_manifest_is_durable(tmp_path, calls):
    write_manifest(str(tmp_path), {"splits": {}})
    assert_durable_rename(calls, str(tmp_path / "manifest.json"))


def test_atomic_upload_fsyncs_the_file_under_its_temporary_name_then_renames_then_fsyncs_the_folder(tmp_path, calls):
    src = tmp_path / "staging" / "part.tar"
    src.parent.mkdir()
    src.write_bytes(b"x" * 1000)
    dst = str(tmp_path / "data" / "train-000000.tar")
    atomic_upload(str(src), LOCAL, dst)
    i, tmp = assert_durable_rename(calls, dst)
    assert calls[0] == ("replace", str(src), tmp)  # into the target folder under a temporary name first
    assert calls[1:] == [("fsync", tmp), ("replace", tmp, dst), ("fsync", str(tmp_path / "data"))]
    assert Path(dst).read_bytes() == b"x" * 1000 and not src.exists()
    assert oct(os.stat(dst).st_mode & 0o777) == oct(0o644)


def test_atomic_upload_from_another_disk_copies_then_commits_durably(tmp_path, calls, monkeypatch):
    """os.replace across devices fails (EXDEV): the file is copied under the temporary name, then committed."""
    src = tmp_path / "part.tar"
    src.write_bytes(b"y" * 10)
    recording = os.replace

    def no_cross_device(a, b, **kw):
        if os.fspath(a) == str(src):
            raise OSError(18, "Invalid cross-device link")
        return recording(a, b, **kw)

    monkeypatch.setattr(os, "replace", no_cross_device)
    dst = str(tmp_path / "out" / "val-000000.tar")
    atomic_upload(str(src), LOCAL, dst)
    _, tmp = assert_durable_rename(calls, dst)
    assert calls == [("fsync", tmp), ("replace", tmp, dst), ("fsync", str(tmp_path / "out"))]
    assert Path(dst).read_bytes() == b"y" * 10 and not src.exists()


def test_a_shard_writer_commits_each_shard_durably(tmp_path, calls):
    infos = shards.write_token_shards(torch.arange(64).reshape(8, 8).numpy(), str(tmp_path / "d"), "train", 2048)
    assert len(infos) > 1
    for info in infos:
        assert_durable_rename(calls, str(tmp_path / "d" / info["name"]))


def test_move_into_place_across_folders_fsyncs_the_file_then_both_folders(tmp_path, calls):
    (tmp_path / "_work").mkdir()
    src, dst = tmp_path / "_work" / "tokenizer.model", tmp_path / "tokenizer.model"
    src.write_bytes(b"spm")
    move_into_place(LOCAL, str(src), str(dst))
    assert calls == [("fsync", str(src)), ("replace", str(src), str(dst)), ("fsync", str(tmp_path)),
                     ("fsync", str(tmp_path / "_work"))]
    assert dst.read_bytes() == b"spm"


def test_durable_replace_in_one_folder_fsyncs_that_folder_once(tmp_path, calls):
    (tmp_path / "a").write_bytes(b"1")
    durable_replace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert calls == [("fsync", str(tmp_path / "a")), ("replace", str(tmp_path / "a"), str(tmp_path / "b")),
                     ("fsync", str(tmp_path))]


def test_fsync_tree_flushes_every_file_then_the_folders_deepest_first(tmp_path, calls):
    root = tmp_path / "step"
    (root / "x" / "y").mkdir(parents=True)
    for name in ("a.pt", "x/b.pt", "x/y/c.pt"):
        (root / name).write_bytes(b"0")
    fsync_tree(str(root))
    synced = fsyncs(calls)
    files = {str(root / n) for n in ("a.pt", "x/b.pt", "x/y/c.pt")}
    assert set(synced[:3]) == files
    assert synced[3:] == [str(root / "x" / "y"), str(root / "x"), str(root)]
    calls.clear()
    fsync_tree(str(root), files=[str(root / "x" / "b.pt")])  # only these files, and the folders up to root
    assert fsyncs(calls) == [str(root / "x" / "b.pt"), str(root / "x"), str(root)]


def test_object_stores_get_no_fsync(calls):
    """memory:// stands in for an object store: a PUT is durable, the helpers do nothing."""
    fs = fsspec.filesystem("memory")
    write_json(fs, "/durable-test/latest.json", {"tag": "t"})
    storage.fsync_tree("/durable-test", fs)
    storage.fsync_dir("/durable-test", fs)
    storage.fsync_file("/durable-test/latest.json", fs)
    assert json.loads(fs.cat_file("/durable-test/latest.json")) == {"tag": "t"}
    assert calls == []
    fs.rm("/durable-test", recursive=True)


def test_markov_chain_and_feature_stats_are_written_durably(tmp_path, calls):
    import numpy as np

    from prime_scale.data.markov import MarkovChain
    from prime_scale.image_metrics import FeatureStats

    MarkovChain(np.full((3, 3), 1 / 3)).save(str(tmp_path / "chain.npy"))
    assert_durable_rename(calls, str(tmp_path / "chain.npy"))
    calls.clear()
    rng = np.random.default_rng(0)
    FeatureStats().update(rng.normal(size=(16, 4))).save(str(tmp_path / "stats.npz"))
    assert_durable_rename(calls, str(tmp_path / "stats.npz"))


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def engine(one_rank_group):
    """A one-rank DeepSpeed engine (gloo, CPU, ZeRO-1) of the tiny config, in this process."""
    from bench.common import bench_config, make_trainer

    torch.manual_seed(0)
    cfg = bench_config("tiny", ("engine.zero_stage=1", "train.device=cpu"))
    trainer = make_trainer(cfg, "deepspeed", seed=0)
    trainer.step(0)  # an optimizer step, so that the optimizer state exists
    return trainer.engine


def test_checkpoint_save_fsyncs_every_file_before_the_manifest_then_commits_durably(engine, tmp_path, calls):
    from prime_scale.checkpoint import LATEST, MANIFEST, CheckpointStore

    store = CheckpointStore(str(tmp_path / "ckpt"))
    tag = store.save(engine, 7, {"step": 7}, {"rng": torch.zeros(3)})
    root, folder = tmp_path / "ckpt", tmp_path / "ckpt" / tag
    manifest_at, _ = assert_durable_rename(calls, str(folder / MANIFEST))
    latest_at, _ = assert_durable_rename(calls, str(root / LATEST))
    assert manifest_at < latest_at  # the manifest is on the disk before the pointer is even written
    shard_files = sorted(str(p) for p in folder.iterdir() if p.name != MANIFEST)
    assert any(p.endswith("rank_00000.pt") for p in shard_files)
    assert any("optim_states" in p for p in shard_files)  # ZeRO-1: DeepSpeed's optimizer shard too
    before = fsyncs(calls[:manifest_at])
    for path in shard_files:  # every file of the checkpoint, fsync'd before the manifest's commit
        assert path in before, (path, before)
    last_file = max(before.index(p) for p in shard_files)
    assert str(folder) in before[last_file:] and str(root) in before[last_file:]  # then its folder and the store's
    assert store.latest() == tag
    assert "save" not in vars(engine.checkpoint_engine)  # the noting wrapper is gone


def test_a_failed_fsync_of_a_shard_leaves_no_manifest_and_no_pointer(engine, tmp_path, monkeypatch):
    from prime_scale.checkpoint import LATEST, MANIFEST, CheckpointStore

    store = CheckpointStore(str(tmp_path / "ckpt"))
    real = os.fsync

    def failing(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".pt"):
            raise OSError(5, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        store.save(engine, 3, {"step": 3}, {"rng": torch.zeros(3)})
    assert not (tmp_path / "ckpt" / "step_00000003" / MANIFEST).exists()
    assert not (tmp_path / "ckpt" / LATEST).exists() and store.latest() is None
    assert "save" not in vars(engine.checkpoint_engine)
