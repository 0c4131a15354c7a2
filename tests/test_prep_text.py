"""Text data prep end to end: sources, bad input, tokenizer, packing, determinism, resume, S3, training."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
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
import zstandard

from data_prep.batch import run_job
from data_prep.inspect import main as inspect_main
from data_prep.split import content_hash, fraction_threshold
from data_prep.text import TextJob
from prime_scale.config import load_config
from prime_scale.data.errors import DataPrepError
from prime_scale.data.shards import read_manifest, read_token_shards
from prime_scale.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


def make_config(data_path, input, *extra):
    return load_config([
        "config=tiny", f"data.path={data_path}", f"prep.input={input}", "data.vocab_size=512", "data.seq_len=64",
        "data.shard_size_mb=0.05", "prep.unit_mb=0.05", "prep.val_fraction=0.1", "prep.tokenizer_sentences=4000",
        *extra,
    ])


def shard_digests(manifest: dict) -> dict:
    return {s["name"]: (s["bytes"], s["sha256"]) for split in manifest["splits"].values() for s in split["shards"]}


def decoded_documents(url: str, split: str, manifest: dict, stream: np.ndarray | None = None) -> list[str]:
    """Every document of a concat-packed split (or of ``stream``), recovered by cutting the tokens at EOS and
    decoding each piece with the dataset's own tokenizer."""
    tok = Tokenizer.from_dataset(url, manifest["tokenizer"])
    stream = read_token_shards(url, split).reshape(-1) if stream is None else stream
    cuts = np.flatnonzero(stream == tok.eos_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(stream[a:b].tolist()) for a, b in zip(starts, cuts)]


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
    assert cli.returncode == 2 and "does not exist" in cli.stderr and "Traceback" not in cli.stderr  # refused
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
    with pytest.raises(DataPrepError, match="512 tokens but data.vocab_size=1000; set data.vocab_size=512"):
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
        assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr  # refused before any unit ran
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


# ------------------------------------------------------------------------------------------------ tokenizers.json


def test_byte_bpe_trained_or_given_as_a_file_or_a_folder_gives_the_same_shards(tmp_path):
    docs_subset(tmp_path / "docs", 12)
    made = run_job(TextJob(make_config(tmp_path / "a", tmp_path / "docs", "prep.tokenizer_type=byte_bpe")),
                   progress=False)
    tok = made["tokenizer"]
    data = (tmp_path / "a/tokenizer.json").read_bytes()
    assert (tok["library"], tok["file"], tok["vocab_size"], tok["bos_id"], tok["eos_id"]) == \
        ("tokenizers", "tokenizer.json", 512, 0, 0)
    assert tok["sha256"] == hashlib.sha256(data).hexdigest() and not (tmp_path / "a/tokenizer.model").exists()
    assert tok["trained"]["type"] == "byte_bpe" and tok["trained"]["sample_documents"] >= 5
    assert tok["trained"]["sample_lines"] <= 4000  # prep.tokenizer_sentences bounds the sample
    # the same tokenizer given as a file (2 workers) and as a folder holding it: the same bytes
    (tmp_path / "gpt2_like").mkdir()
    shutil.copy(tmp_path / "a/tokenizer.json", tmp_path / "gpt2_like/tokenizer.json")
    for name, given, workers in (("b", tmp_path / "a/tokenizer.json", 2), ("c", tmp_path / "gpt2_like", 1)):
        reuse = run_job(TextJob(make_config(tmp_path / name, tmp_path / "docs", f"prep.tokenizer={given}")),
                        workers=workers, progress=False)
        assert shard_digests(reuse) == shard_digests(made)
        assert (tmp_path / name / "tokenizer.json").read_bytes() == data
        assert reuse["tokenizer"]["source"] == str(given) and reuse["tokenizer"]["trained"] is None
    with pytest.raises(DataPrepError, match="512 tokens but data.vocab_size=600; set data.vocab_size=512"):
        run_job(TextJob(make_config(tmp_path / "d", tmp_path / "docs", "data.vocab_size=600",
                                    f"prep.tokenizer={tmp_path / 'gpt2_like'}")), progress=False)
    cli = subprocess.run([sys.executable, "-m", "data_prep.text", "config=owt_small", f"data.path={tmp_path / 'e'}",
                          f"prep.input={tmp_path / 'docs'}"], cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr  # refused before any unit ran
    assert "prep.tokenizer=gpt2: no tokenizer at" in cli.stderr and "hf_hub_download" in cli.stderr


@pytest.mark.parametrize("tokenizer_type,bos,eos", [("byte_bpe", 0, 0), ("bpe", 1, 2)])
def test_wrap_packing_frames_every_block_with_bos_and_eos(tmp_path, tokenizer_type, bos, eos):
    texts = [p.read_text() for p in docs_subset(tmp_path / "docs", 10)]
    # one work unit: the token stream is the documents in reading order (the tail blocks are made at finalize)
    manifest = run_job(TextJob(make_config(tmp_path / "out", tmp_path / "docs", "prep.packing=wrap",
                                           f"prep.tokenizer_type={tokenizer_type}", "prep.unit_mb=100",
                                           "prep.val_fraction=0")), progress=False)
    assert (manifest["packing"], manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["eos_id"]) == ("wrap", bos, eos)
    split = manifest["splits"]["train"]
    blocks = read_token_shards(str(tmp_path / "out"), "train")
    assert blocks.shape == (split["sequences"], 64)
    assert (blocks[:, 0] == bos).all() and (blocks[:, -1] == eos).all()
    body = blocks[:, 1:-1].reshape(-1)
    if bos != eos:
        assert bos not in body  # BOS only frames blocks; documents are separated by EOS alone
    assert split["sequences"] * 62 + split["dropped_tail_tokens"] == split["tokens"]
    assert 0 <= split["dropped_tail_tokens"] < 62 and split["documents"] == len(texts)
    decoded = decoded_documents(str(tmp_path / "out"), "train", manifest, body)
    assert decoded == texts[: len(decoded)] and len(decoded) >= len(texts) - 1  # every document ended by EOS


def test_val_select_last_takes_the_last_documents_of_files_and_of_dataset_rows(tmp_path):
    import datasets

    import re

    def marked(url: Path, split: str, manifest: dict) -> list[int]:
        """The marks of the documents in a split: each document begins with DOCMARK<i>, and the units' carried
        tails are packed at the split's end, so documents are found by their mark, not by their order."""
        text = Tokenizer.from_dataset(str(url), manifest["tokenizer"]).decode(read_token_shards(str(url), split).reshape(-1))
        return sorted(int(m) for m in re.findall(r"DOCMARK(\d{3})", text))

    files = docs_subset(tmp_path / "docs", 12)
    for i, f in enumerate(files):
        f.write_text(f"DOCMARK{i:03d} " + f.read_text())
    texts = [f.read_text() for f in files]
    # files: the last K usable documents in the planned (sorted) order, across several work units
    manifest = run_job(TextJob(make_config(tmp_path / "a", tmp_path / "docs", "prep.val_select=last",
                                           "prep.val_docs=5", "prep.unit_mb=0.02")), progress=False)
    assert manifest["source"]["units"] > 3
    assert manifest["val_select"] == {"method": "last", "val_docs": 5, "skipped_count": False}
    assert marked(tmp_path / "a", "val", manifest) == list(range(7, 12))
    assert marked(tmp_path / "a", "train", manifest) == list(range(7))
    assert (manifest["splits"]["val"]["documents"], manifest["splits"]["train"]["documents"]) == (5, 7)
    # datasets: rows >= num_rows - K, whatever they hold (MDLM: OWT's train[-100000:]); an empty row among them
    # is skipped and leaves K - 1 documents
    rows = texts[:10]
    rows[8] = "   "
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "ds"))
    manifest = run_job(TextJob(make_config(tmp_path / "b", tmp_path / "ds", "prep.val_select=last", "prep.val_docs=5",
                                           "prep.unit_docs=3")), progress=False)
    assert manifest["val_select"]["skipped_count"] and manifest["skipped"]["counts"] == {"empty": 1}
    assert manifest["source"]["units"] == 5  # rows 0-3, 3-5 | 5-6, 6-9, 9-10: cut at row 5
    assert (manifest["splits"]["val"]["documents"], manifest["splits"]["train"]["documents"]) == (4, 5)
    assert marked(tmp_path / "b", "val", manifest) == [5, 6, 7, 9]
    with pytest.raises(DataPrepError, match="prep.val_docs=10, but .* has 10 rows: nothing would be left"):
        run_job(TextJob(make_config(tmp_path / "c", tmp_path / "ds", "prep.val_select=last", "prep.val_docs=10")),
                progress=False)
    with pytest.raises(DataPrepError, match="prep.val_docs=12, but .* holds 12 usable documents"):
        run_job(TextJob(make_config(tmp_path / "d", tmp_path / "docs", "prep.val_select=last", "prep.val_docs=12")),
                progress=False)


@pytest.mark.slow
def test_training_reads_the_prepared_text_shards(text_shards, tmp_path):
    """conftest's ``text_shards`` (this prep's output for 30 documents, with make_config's settings) trained on by the
    local launcher: ``python launchers/local.py``'s main, one rank, in this process, without wandb (tests/test_faults.py
    runs the launcher script itself)."""
    from prime_scale.launch.local import main as launch_local

    status = launch_local(["config=tiny", "data.source=shards", f"data.path={text_shards}", "data.vocab_size=512",
                           "data.seq_len=64", f"run.out_dir={tmp_path / 'runs'}", "train.steps=30",
                           "train.eval_every=30", "eval.max_sequences=32", "sample.steps=32", "log.wandb=disabled"])
    assert status == 0
    summary = json.loads((tmp_path / "runs/tiny/summary.json").read_text())
    # an untrained model scores log(512) = 6.24 nats/token; 30 steps on real text must already beat it
    assert summary["val"]["nelbo_per_token"] < np.log(512)
    assert summary["val"]["tokens"] == summary["val"]["sequences"] * 64
