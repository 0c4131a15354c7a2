"""The dataset manifest: one schema every data-prep job writes, checked against the run's config before anything
starts; a disagreement exits with status 2 naming both values (and never trains on cut or reinterpreted data)."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.synthetic import prepare_markov
from prime_scale.config import ConfigError, load_config
from prime_scale.data.manifest import (FORMAT_VERSION, DatasetManifest, ManifestError, check_dataset,
                                       checked_dataset, dataset_problems)
from prime_scale.data.shards import read_manifest, write_manifest

REPO = Path(__file__).resolve().parent.parent
SHARD = {"name": "train-000000.tar", "samples": 4, "bytes": 10240, "sha256": "0" * 64}


def manifest(kind: str, **typed) -> DatasetManifest:
    base = {"text": dict(vocab_size=512, seq_len=64, dtype="uint16", packing="wrap",
                         tokenizer={"library": "tokenizers", "file": "tokenizer.json", "sha256": "a" * 64,
                                    "source": "trained", "trained": {"type": "byte_bpe"}}),
            "image": dict(vocab_size=256, seq_len=3 * 64 * 64, dtype="uint8", image_size=64, channels=3),
            "markov": dict(vocab_size=64, seq_len=32, dtype="uint16")}[kind]
    splits = {s: {"shards": [dict(SHARD, name=f"{s}-000000.tar")]} for s in ("train", "val")}
    return DatasetManifest(kind=kind, splits=splits, **{**base, **typed})


def problems(m: DatasetManifest, *overrides: str) -> list[str]:
    return dataset_problems(m, load_config(["config=tiny", "data.source=shards", *overrides]), "/data/x")


@pytest.fixture(scope="module")
def markov(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "markov"
    prepare_markov(load_config(["config=tiny", f"data.path={path}"]))
    return path


def test_every_disagreement_is_named_with_both_values_and_the_fix():
    image = manifest("image")
    (seq,) = problems(image, "data.vocab_size=256", "data.seq_len=3072", "prep.image_size=64")
    assert "data.seq_len=3072" in seq and "12288 tokens" in seq and "set data.seq_len=12288" in seq
    (size,) = problems(image, "data.vocab_size=256", "data.seq_len=12288", "prep.image_size=32")
    assert "prep.image_size=32" in size and "64 px" in size
    (pos,) = problems(image, "data.vocab_size=256", "data.seq_len=12288", "prep.image_size=64",
                      "model.tokens_per_position=2")
    assert "model.tokens_per_position=2" in pos and "3 channel" in pos
    assert problems(image, "data.vocab_size=256", "data.seq_len=12288", "prep.image_size=64",
                    "model.tokens_per_position=3") == []

    text = manifest("text")
    ok = ["data.vocab_size=512", "data.seq_len=64", "prep.packing=wrap", "prep.tokenizer_type=byte_bpe"]
    assert problems(text, *ok) == []
    (vocab,) = problems(text, *ok, "data.vocab_size=50257")
    assert "data.vocab_size=50257" in vocab and "vocabulary 512" in vocab
    (packing,) = problems(text, *ok, "prep.packing=concat")
    assert "prep.packing=concat" in packing and "packed with wrap" in packing
    (kind,) = problems(text, *ok, "prep.tokenizer_type=bpe")
    assert "prep.tokenizer_type=bpe" in kind and "byte_bpe" in kind
    three = problems(text, "data.seq_len=128", "data.vocab_size=512", "prep.packing=concat",
                     "prep.tokenizer_type=byte_bpe")
    assert len(three) == 2  # seq_len and packing, each on its own line of the error
    with pytest.raises(ConfigError, match=r"\(2 problems\):\n- data.seq_len=128.*\n- prep.packing=concat"):
        check_dataset(text, load_config(["config=tiny", "data.source=shards", "data.seq_len=128", "data.vocab_size=512",
                                         "prep.packing=concat", "prep.tokenizer_type=byte_bpe"]), "/data/x")

    (source,) = problems(manifest("markov"), "data.source=digits")
    assert "data.source=digits reads digits data" in source and "markov data" in source


def test_a_given_tokenizer_must_be_the_one_that_made_the_data(tmp_path):
    from tokenizers import Tokenizer, models

    def word_level(path: Path, words: list[str]) -> str:
        Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])).save(str(path))
        return hashlib.sha256(path.read_bytes()).hexdigest()

    real = word_level(tmp_path / "real.json", ["<unk>", "a", "b"])
    (tmp_path / "other").mkdir()
    word_level(tmp_path / "other" / "tokenizer.json", ["<unk>", "c", "d"])
    m = manifest("text", tokenizer={"library": "tokenizers", "file": "tokenizer.json", "source": "/x/gpt2",
                                     "sha256": real, "trained": None})
    base = ["data.vocab_size=512", "data.seq_len=64", "prep.packing=wrap"]
    (wrong,) = problems(m, *base, f"prep.tokenizer={tmp_path / 'other'}")  # a folder holding tokenizer.json
    assert f"prep.tokenizer={tmp_path / 'other'}" in wrong and "sha256" in wrong
    assert problems(m, *base, f"prep.tokenizer={tmp_path / 'real.json'}") == []
    assert problems(m, *base, "prep.tokenizer=/not/on/this/machine") == []  # cannot be read here: not judged
    (empty,) = problems(m, *base)
    assert "prep.tokenizer is empty" in empty and "prep.tokenizer=/x/gpt2" in empty


def test_the_schema_refuses_what_is_not_a_dataset_of_this_format(markov):
    doc = read_manifest(str(markov))
    assert doc["format_version"] == FORMAT_VERSION and doc["kind"] == "markov"
    assert DatasetManifest.from_json(doc).samples("train") == 512  # the synthetic source writes the schema too
    old = {**doc, "format_version": 1}
    with pytest.raises(ManifestError, match="format 1.*prepare the data again"):
        DatasetManifest.from_json(old)
    for broken, match in ((dict(doc, seq_len=0), "seq_len must be a positive integer"),
                          (dict(doc, kind="audio"), "kind 'audio'"),
                          (dict(doc, packing="concat"), "packing 'concat'"),
                          (dict(doc, splits={"train": {"shards": [{"name": "a.tar"}]}}), "name, samples, bytes")):
        with pytest.raises(ManifestError, match=match):
            DatasetManifest.from_json(broken)
    assert DatasetManifest.from_json(doc).to_json() == doc  # facts round-trip beside the typed keys


def test_an_older_manifest_is_prepared_again_by_the_synthetic_source(markov, tmp_path):
    doc = read_manifest(str(markov))
    old = copy.deepcopy(doc)
    old["format_version"] = 1
    write_manifest(str(markov), old)
    again = prepare_markov(load_config(["config=tiny", f"data.path={markov}"]))
    assert again == doc  # the same shards, under the current format


@pytest.mark.parametrize("cmd", [["-m", "prime_scale.engine"], ["launchers/local.py"]])
def test_a_disagreement_exits_2_before_deepspeed_starts(markov, tmp_path, cmd, monkeypatch, capfd):
    """The launcher as the real command (its exit status, and no line of DeepSpeed's start-up); the engine as
    ``python -m prime_scale.engine``'s main in this process, where DeepSpeed cannot even be imported."""
    start = time.monotonic()
    args = ["config=tiny", f"data.path={markov}", "data.source=shards", "data.seq_len=48", f"run.out_dir={tmp_path}",
            "log.wandb=disabled"]
    if cmd == ["-m", "prime_scale.engine"]:
        from prime_scale import engine

        monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` -> ImportError
        capfd.readouterr()
        status = engine.main(args)
        out, err = capfd.readouterr()
    else:
        done = subprocess.run([sys.executable, *cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        status, out, err = done.returncode, done.stdout, done.stderr
    assert status == 2, out[-2000:] + err[-2000:]
    assert "data.seq_len=48" in err and "samples of 32 tokens" in err
    assert "DeepSpeed" not in out + err and "real_accelerator" not in err
    assert not (tmp_path / "tiny").exists()  # nothing of a run was written
    assert time.monotonic() - start < 30


def test_no_data_is_a_config_error_with_the_command_to_make_it(tmp_path):
    with pytest.raises(ConfigError, match="no prepared data at data.path=.*run data prep first"):
        checked_dataset(load_config(["config=tiny", f"data.path={tmp_path / 'nothing'}"]))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "kind": "text"}))
    with pytest.raises(ConfigError, match="lacks vocab_size, seq_len, dtype, splits"):
        checked_dataset(load_config(["config=tiny", f"data.path={tmp_path / 'broken'}"]))
