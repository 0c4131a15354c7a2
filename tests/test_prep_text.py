"""Text data prep end to end: sources, bad input, tokenizer, packing, determinism, resume, S3, training."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from py_docs import docs_subset
import sentencepiece as spm
import zstandard

from data_prep.batch import DataPrepError, run_job
from data_prep.inspect import main as inspect_main
from data_prep.split import content_hash, fraction_threshold
from data_prep.text import TextJob
from prime_scale.config import load_config
from prime_scale.data.shards import read_manifest, read_padded_token_shards, read_token_shards

REPO = Path(__file__).resolve().parent.parent


def make_config(data_path, input, *extra):
    return load_config([
        "config=tiny", f"data.path={data_path}", f"prep.input={input}", "data.vocab_size=512", "data.seq_len=64",
        "data.shard_size_mb=0.05", "prep.unit_mb=0.05", "prep.val_fraction=0.1", "prep.tokenizer_sentences=4000",
        *extra,
    ])


def shard_digests(manifest: dict) -> dict:
    return {s["name"]: (s["bytes"], s["sha256"]) for split in manifest["splits"].values() for s in split["shards"]}


def decoded_documents(url: str, split: str, manifest: dict) -> list[str]:
    """Every document of a concat-packed split, recovered from the token stream by cutting at EOS."""
    sp = spm.SentencePieceProcessor(model_file=f"{url}/tokenizer.model")
    stream = read_token_shards(url, split).reshape(-1)
    eos = manifest["tokenizer"]["eos_id"]
    cuts = np.flatnonzero(stream == eos)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [sp.decode(stream[a:b].tolist()) for a, b in zip(starts, cuts)]


@pytest.fixture
def mixed_corpus(tmp_path) -> tuple[Path, dict]:
    """Real prose plus every supported format, with bad inputs mixed in. Returns (folder, expected skip counts)."""
    root = tmp_path / "corpus"
    docs = docs_subset(root / "rst", 12)
    texts = [p.read_text() for p in docs]
    # .jsonl with one good document per line and bad lines between them
    lines = [json.dumps({"text": t}) for t in texts[:4]]
    lines.insert(1, "{not json")
    lines.insert(2, json.dumps({"body": "no text field"}))
    lines.insert(3, json.dumps({"text": ""}))
    lines.insert(4, json.dumps({"text": 42}))
    lines.insert(5, json.dumps({"text": "x" * 300_001}))  # giant with prep.max_doc_chars=300000
    raw = "\n".join(lines).encode() + b"\n" + b'{"text": "bad \xff\xfe utf-8"}\n' + b"\n"
    (root / "a.jsonl").write_bytes(raw)
    (root / "b.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps({"text": t}) for t in texts[4:6]).encode()))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "\n".join(json.dumps({"text": t}) for t in texts[6:8]).encode()))
    (root / "d.json").write_text(json.dumps([{"text": texts[8]}, {"text": texts[9]}]))
    pq.write_table(pa.table({"text": texts[10:12]}), root / "e.parquet")
    (root / "f.txt").write_bytes(b"\xff\xfe not utf-8 at all \xc3")
    (root / "g.txt.gz").write_bytes(b"\x1f\x8b this is not really gzip")
    (root / "h.txt").write_text("   \n\n  ")
    (root / "notes.md").write_text("ignored: not a text input format")
    expected = {"bad_json": 1, "missing_text_field": 1, "empty": 2, "not_text": 1, "giant": 1, "invalid_utf8": 2,
                "unreadable_file": 1}
    return root, expected


def test_every_format_and_bad_input_end_to_end(tmp_path, mixed_corpus, capsys):
    root, expected = mixed_corpus
    # one work unit, so that the token stream is the documents in reading order (with several units, each unit's
    # last partial block moves to the end of the split and a document there is no longer contiguous)
    cfg = make_config(tmp_path / "out", root, "prep.max_doc_chars=300000", "prep.val_fraction=0.2",
                      "prep.unit_mb=100")
    manifest = run_job(TextJob(cfg), progress=False)
    good = [p.read_text() for p in sorted((root / "rst").glob("*.rst.txt"))]
    assert manifest["skipped"]["counts"] == expected
    assert all(len(v) >= 1 for v in manifest["skipped"]["examples"].values())
    splits = manifest["splits"]
    # 12 rst files + 4 + 2 + 2 + 2 + 2 documents from the other formats, each read once
    assert splits["train"]["documents"] + splits["val"]["documents"] == 12 + 12
    for split in ("train", "val"):
        s = splits[split]
        assert s["sequences"] * 64 + s["dropped_tail_tokens"] == s["tokens"]
        assert sum(sh["samples"] for sh in s["shards"]) == s["sequences"]
        assert 0 <= s["dropped_tail_tokens"] < 64
    # exact text round trip: every complete document in the shards is one of the inputs, in its split
    val_docs = {t for t in good if content_hash(t.encode(), 0) < fraction_threshold(0.2)}
    for split in ("train", "val"):
        decoded = decoded_documents(str(tmp_path / "out"), split, manifest)
        assert len(decoded) >= splits[split]["documents"] - 1  # the last may be cut by the dropped tail
        assert set(decoded) <= set(good)
        assert all((d in val_docs) == (split == "val") for d in decoded)
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((tmp_path / "out/tokenizer.model").read_bytes()).hexdigest()
    assert (manifest["tokenizer"]["eos_id"], manifest["tokenizer"]["pad_id"]) == (2, 3)
    assert not (tmp_path / "out/_work").exists()
    # the inspect CLI decodes the first sample through the stored tokenizer
    assert inspect_main([str(tmp_path / "out"), "-n", "1", "--chars", "60"]) == 0
    printed = capsys.readouterr().out
    first = decoded_documents(str(tmp_path / "out"), "train", manifest)[0]
    assert '"kind": "text"' in printed and first[:60] in printed


def test_identical_bytes_for_one_and_two_workers_and_rerun_is_a_no_op(tmp_path):
    docs = docs_subset(tmp_path / "docs", 40)
    a = run_job(TextJob(make_config(tmp_path / "a", tmp_path / "docs")), workers=1, progress=False)
    b = run_job(TextJob(make_config(tmp_path / "b", tmp_path / "docs")), workers=2, progress=False)
    assert a["source"]["units"] > 4 and len(a["splits"]["train"]["shards"]) > 2
    assert shard_digests(a) == shard_digests(b)
    for name, (size, sha) in shard_digests(a).items():
        assert hashlib.sha256((tmp_path / "b" / name).read_bytes()).hexdigest() == sha
    assert sum(p.stat().st_size for p in docs) > 400_000
    again = run_job(TextJob(make_config(tmp_path / "a", tmp_path / "docs")), workers=2, progress=False)
    assert again == a


def test_killed_run_resumes_only_unfinished_units_and_ends_with_the_same_bytes(tmp_path):
    docs_subset(tmp_path / "docs", 60)
    reference = run_job(TextJob(make_config(tmp_path / "ref", tmp_path / "docs", "prep.unit_mb=0.02")),
                        progress=False)
    units = reference["source"]["units"]
    args = [sys.executable, "-m", "data_prep.text", "config=tiny", f"data.path={tmp_path / 'out'}",
            f"prep.input={tmp_path / 'docs'}", "data.vocab_size=512", "data.seq_len=64", "data.shard_size_mb=0.05",
            "prep.unit_mb=0.02", "prep.val_fraction=0.1", "prep.tokenizer_sentences=4000", "--no-progress"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    markers = tmp_path / "out/_work/units"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(markers.glob("*.json")))
    assert 3 <= done < units, f"the kill should land mid-job ({done} of {units} units done)"
    assert not (tmp_path / "out/manifest.json").exists()

    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    done_now = len(list(markers.glob("*.json"))) if markers.exists() else None
    assert done_now is None  # finished: the work area is gone
    assert f"resuming: {done} of {units} work units already done, {units - done} to run" in rerun.stderr
    resumed = read_manifest(str(tmp_path / "out"))
    assert shard_digests(resumed) == shard_digests(reference)
    assert {k: v for k, v in resumed.items() if k != "config"} == {k: v for k, v in reference.items() if k != "config"}


def test_foreign_output_and_bad_paths_fail_before_any_work(tmp_path):
    docs_subset(tmp_path / "docs", 5)
    run_job(TextJob(make_config(tmp_path / "out", tmp_path / "docs")), progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    with pytest.raises(DataPrepError, match="other settings.*vocab_size.*--overwrite"):
        run_job(TextJob(make_config(tmp_path / "out", tmp_path / "docs", "data.vocab_size=600")), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    replaced = run_job(TextJob(make_config(tmp_path / "out", tmp_path / "docs", "data.vocab_size=600")),
                       overwrite=True, progress=False)
    assert replaced["vocab_size"] == 600

    with pytest.raises(DataPrepError, match="does not exist"):
        run_job(TextJob(make_config(tmp_path / "new", tmp_path / "nowhere")), progress=False)
    assert not (tmp_path / "new").exists()
    cli = subprocess.run([sys.executable, "-m", "data_prep.text", "config=tiny", f"data.path={tmp_path / 'x'}",
                          f"prep.input={tmp_path / 'nowhere'}"], cwd=REPO, capture_output=True, text=True)
    assert cli.returncode == 1 and "does not exist" in cli.stderr and "Traceback" not in cli.stderr
    typo = subprocess.run([sys.executable, "-m", "data_prep.text", "config=tiny", "prep.imput=x"],
                          cwd=REPO, capture_output=True, text=True)
    assert typo.returncode == 2 and "did you mean 'prep.input'" in typo.stderr


def test_too_small_vocabulary_and_foreign_tokenizer_are_clear_errors(tmp_path):
    docs_subset(tmp_path / "docs", 5)
    with pytest.raises(DataPrepError, match="raise data.vocab_size"):
        run_job(TextJob(make_config(tmp_path / "a", tmp_path / "docs", "data.vocab_size=100")), progress=False)
    made = run_job(TextJob(make_config(tmp_path / "b", tmp_path / "docs")), progress=False)
    # an existing model is taken as is, stored with the dataset and recorded by hash
    reuse = run_job(TextJob(make_config(tmp_path / "c", tmp_path / "docs",
                                        f"prep.tokenizer={tmp_path / 'b/tokenizer.model'}")), progress=False)
    assert reuse["tokenizer"]["sha256"] == made["tokenizer"]["sha256"]
    assert shard_digests(reuse) == shard_digests(made)
    with pytest.raises(DataPrepError, match="512 pieces but data.vocab_size=1000"):
        run_job(TextJob(make_config(tmp_path / "d", tmp_path / "docs", "data.vocab_size=1000",
                                    f"prep.tokenizer={tmp_path / 'b/tokenizer.model'}")), progress=False)


def test_exact_validation_count_takes_the_smallest_content_hashes(tmp_path):
    texts = [p.read_text() for p in docs_subset(tmp_path / "docs", 40)]
    manifest = run_job(TextJob(make_config(tmp_path / "out", tmp_path / "docs", "prep.val_docs=5",
                                           "prep.split_seed=7", "prep.unit_mb=100")), progress=False)
    assert manifest["splits"]["val"]["documents"] == 5 and manifest["splits"]["train"]["documents"] == 35
    expected = sorted(texts, key=lambda t: content_hash(t.encode(), 7))[:5]
    decoded = decoded_documents(str(tmp_path / "out"), "val", manifest)
    assert set(decoded) <= set(expected) and len(decoded) >= 4  # the last may be cut by the dropped tail


def test_pad_packing_keeps_each_document_chunk_with_a_mask(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    texts = [f"document {i}: " + "word " * (5 + 40 * i) for i in range(6)]
    (root / "docs.txt").write_text("\n".join(texts) + "\n")
    cfg = make_config(tmp_path / "out", root, "prep.packing=pad", "prep.txt_document=line", "prep.val_fraction=0",
                      "data.vocab_size=300")
    manifest = run_job(TextJob(cfg), progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out/tokenizer.model"))
    tokens, mask = read_padded_token_shards(str(tmp_path / "out"), "train", 64, pad_id=3)
    expected = [ids + [2] for ids in sp.encode(texts)]
    chunks = [e[s : s + 64] for e in expected for s in range(0, len(e), 64)]
    assert manifest["splits"]["train"]["sequences"] == len(chunks) == len(tokens)
    for row, m, chunk in zip(tokens, mask, chunks):
        assert row[m].tolist() == chunk and (row[~m] == 3).all()
    assert manifest["splits"]["train"]["dropped_tail_tokens"] == 0


def test_datasets_inputs_local_and_hub_offline(tmp_path):
    import datasets

    texts = [p.read_text() for p in docs_subset(tmp_path / "docs", 8)]
    datasets.Dataset.from_dict({"text": texts, "id": list(range(8))}).save_to_disk(str(tmp_path / "ds"))
    from_ds = run_job(TextJob(make_config(tmp_path / "a", tmp_path / "ds", "prep.unit_docs=3")), progress=False)
    assert from_ds["source"]["units"] == 3
    assert from_ds["splits"]["train"]["documents"] + from_ds["splits"]["val"]["documents"] == 8
    with pytest.raises(DataPrepError, match="no column prep.text_field='body'"):
        run_job(TextJob(make_config(tmp_path / "b", tmp_path / "ds", "prep.text_field=body")), progress=False)
    # offline (the env is read when `datasets` is imported, so in a fresh process, as a user would run it)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    for name, out, expected in [("hf:no-such-org/no-such-dataset", "c", "'hf:no-such-org/no-such-dataset'"),
                                ("openwebtext", "d", "'hf:Skylion007/openwebtext'")]:  # the preset names the hub dataset
        cli = subprocess.run([sys.executable, "-m", "data_prep.text", "config=tiny", f"prep.input={name}",
                              f"data.path={tmp_path / out}"], cwd=REPO, capture_output=True, text=True, env=env,
                             timeout=120)
        assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
        assert f"cannot load dataset {expected}" in cli.stderr and "HF_HUB_OFFLINE" in cli.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_output_to_s3_gives_the_same_bytes_as_local_disk(tmp_path, s3_endpoint):
    docs_subset(tmp_path / "docs", 20)
    local = run_job(TextJob(make_config(tmp_path / "local", tmp_path / "docs")), progress=False)
    remote = run_job(TextJob(make_config("s3://prime-data/owt-mini", tmp_path / "docs")), workers=2, progress=False)
    assert shard_digests(remote) == shard_digests(local)
    np.testing.assert_array_equal(read_token_shards("s3://prime-data/owt-mini", "train"),
                                  read_token_shards(str(tmp_path / "local"), "train"))
    import s3fs

    listing = sorted(p.rsplit("/", 1)[-1] for p in s3fs.S3FileSystem().ls("prime-data/owt-mini"))
    assert listing == sorted(["manifest.json", "tokenizer.model", *shard_digests(local)])


@pytest.mark.slow
def test_training_reads_the_prepared_text_shards(tmp_path):
    docs_subset(tmp_path / "docs", 30)
    cfg = make_config(tmp_path / "data", tmp_path / "docs")
    run_job(TextJob(cfg), progress=False)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "launchers/local.py", "config=tiny", "data.source=shards", f"data.path={tmp_path / 'data'}",
         "data.vocab_size=512", "data.seq_len=64", f"run.out_dir={tmp_path / 'runs'}", "train.steps=30",
         "train.eval_every=30", "eval.max_sequences=32", "sample.steps=32"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/tiny/summary.json").read_text())
    # an untrained model scores log(512) = 6.24 nats/token; 30 steps on real text must already beat it
    assert summary["val"]["nelbo_per_token"] < np.log(512)
    assert summary["val"]["tokens"] == summary["val"]["sequences"] * 64
