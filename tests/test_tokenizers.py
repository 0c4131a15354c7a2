"""The tokenizer class over SentencePiece and HuggingFace tokenizers, GPT-2-style byte-level BPE training, the
packing arithmetic (concat, wrap), the prep config rules, and an export of a byte-BPE, wrap-packed model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from py_docs import docs_subset, py_docs
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

from data_prep import tokenizer as prep_tokenizer
from prime_scale.config import ConfigError, load_config
from prime_scale.data.errors import DataPrepError
from prime_scale.data.packing import eos_stream, pack, pack_documents
from prime_scale.data.tokenizer import Tokenizer, TokenizerError

TRICKY = ["", " leading space", "tabs\t\tand\r\nCRLF\n\n\n", "emoji 😀, ünïcödé, 中文", "a NUL \x00 byte",
          "a literal <|endoftext|> inside a document", "   \n  indented\n\tcode()"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [p.read_text() for p in py_docs("library", 12)]


@pytest.fixture(scope="module")
def bpe(texts) -> Tokenizer:
    return prep_tokenizer.train_byte_bpe(texts, 512, num_threads=1)


@pytest.fixture(scope="module")
def spm_tok(texts) -> Tokenizer:
    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    return prep_tokenizer.train_sentencepiece(lines, 400, "bpe", num_threads=1)


def test_byte_bpe_is_gpt2_style_lossless_and_deterministic(texts, bpe, monkeypatch):
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    again = prep_tokenizer.train_byte_bpe(texts, 512, num_threads=2)
    assert again.data == bpe.data and again.sha256 == bpe.sha256  # the same file for any thread count
    assert "RAYON_NUM_THREADS" not in os.environ  # set only in the training process
    assert (bpe.library, bpe.file, bpe.vocab_size) == ("tokenizers", "tokenizer.json", 512)
    assert bpe.bos_id == bpe.eos_id == 0 and bpe.pad_id is None and bpe.unk_id is None
    assert bpe.special_tokens() == ["<|endoftext|>"]
    spec = json.loads(bpe.data)
    assert spec["pre_tokenizer"]["type"] == spec["decoder"]["type"] == "ByteLevel"
    assert spec["model"]["type"] == "BPE" and len(spec["model"]["merges"]) == 512 - 256 - 1
    assert bpe.describe() == {"library": "tokenizers", "file": "tokenizer.json",
                              "sha256": hashlib.sha256(bpe.data).hexdigest(), "vocab_size": 512,
                              "bos_id": 0, "eos_id": 0, "pad_id": None, "unk_id": None}
    # lossless on real prose and on anything else; a literal end-of-text string is text, not the special token
    for s in texts + TRICKY:
        assert bpe.decode(bpe.encode(s)) == s
    assert 0 not in bpe.encode(TRICKY[5])
    ids = bpe.encode(texts)
    assert ids == bpe.encode(texts, parallel=False) == [bpe.encode(t) for t in texts]
    assert bpe.decode(ids[0] + [0] + ids[1]) == texts[0] + texts[1]  # special tokens decode to nothing
    # merges learned from whole documents: a blank line between paragraphs is one token
    assert len(bpe.encode("\n\n")) == 1
    n_tokens, n_bytes = sum(map(len, ids)), sum(len(t.encode()) for t in texts)
    assert 0.3 < n_tokens / n_bytes < 0.6  # 512 tokens compress far less than GPT-2's 50k (~0.23 tokens/byte)


def test_byte_bpe_training_errors_say_what_to_do(monkeypatch):
    with pytest.raises(prep_tokenizer.TokenizerError, match=r"reached only \d+ of data.vocab_size=512 tokens.*"
                       r"raise prep.tokenizer_sentences.*or set data.vocab_size=\d+") as e:
        prep_tokenizer.train_byte_bpe(["a short sample, far too short for 512 tokens"], 512, num_threads=1)
    assert isinstance(e.value, DataPrepError) and isinstance(e.value, TokenizerError)
    with pytest.raises(prep_tokenizer.TokenizerError, match="at least 257 tokens, but data.vocab_size=200"):
        prep_tokenizer.train_byte_bpe(["text"], 200)


def test_loading_from_a_file_a_folder_a_url_or_a_dataset_entry(tmp_path, bpe, spm_tok):
    folder = tmp_path / "gpt2_like"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(bpe.data)
    (folder / "vocab.txt").write_text("other files of a HuggingFace folder are ignored")
    for where in (folder / "tokenizer.json", folder, f"file://{folder}"):
        got = Tokenizer.load(str(where))
        assert got.describe() == bpe.describe() and got.encode("x = 1") == bpe.encode("x = 1")
    assert Tokenizer(bpe.data, "tokenizers").describe() == bpe.describe()
    # SentencePiece: the same class, its fixed special ids
    (tmp_path / "sp.model").write_bytes(spm_tok.data)
    sp = Tokenizer.load(str(tmp_path / "sp.model"))
    assert (sp.library, sp.file, sp.vocab_size) == ("sentencepiece", "tokenizer.model", 400)
    assert (sp.unk_id, sp.bos_id, sp.eos_id, sp.pad_id) == (0, 1, 2, 3)
    assert all(sp.decode(sp.encode(s)) == s for s in TRICKY)
    # a folder with both: tokenizer.json, as HuggingFace loads it
    (folder / "tokenizer.model").write_bytes(spm_tok.data)
    assert Tokenizer.load(str(folder)).library == "tokenizers"

    # a dataset's entry names the file, pins its sha256 and the ids its shards were packed with
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "tokenizer.json").write_bytes(bpe.data)
    entry = {**bpe.describe(), "source": "trained"}
    assert Tokenizer.from_dataset(str(data), entry).describe() == bpe.describe()
    assert Tokenizer.from_dataset(str(data), {**entry, "eos_id": 7}).eos_id == 7
    with pytest.raises(TokenizerError, match="sha256 .* but the manifest records 00.*not the tokenizer"):
        Tokenizer.from_dataset(str(data), {**entry, "sha256": "00" * 32})
    with pytest.raises(TokenizerError, match="tokenizer.model is missing"):
        Tokenizer.from_dataset(str(data), {"sha256": sp.sha256})  # an entry of before tokenizer.json
    (data / "tokenizer.model").write_bytes(spm_tok.data)
    assert Tokenizer.from_dataset(str(data), {"sha256": sp.sha256, "eos_id": 2}).library == "sentencepiece"

    # what is not a tokenizer says so
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="holds no tokenizer.json or tokenizer.model"):
        Tokenizer.load(str(empty))
    (empty / "vocab.json").write_text("{}")
    (empty / "merges.txt").write_text("")
    with pytest.raises(TokenizerError, match="older HuggingFace layout.*backend_tokenizer.save"):
        Tokenizer.load(str(empty))
    with pytest.raises(TokenizerError, match="no tokenizer at .*nothing is downloaded"):
        Tokenizer.load(str(tmp_path / "gpt2"))
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="bad.json: not a HuggingFace tokenizer.json"):
        Tokenizer.load(str(tmp_path / "bad.json"))
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="bad.model: not a SentencePiece model"):
        Tokenizer.load(str(tmp_path / "bad.model"))
    # prep.tokenizer names the setting and where GPT-2's comes from
    with pytest.raises(prep_tokenizer.TokenizerError, match=r"prep.tokenizer=\S*gpt2: no tokenizer at .*hf_hub_download"):
        prep_tokenizer.load(str(tmp_path / "gpt2"))


def hf_word_level(vocab: dict[str, int], special: list[str]) -> Tokenizer:
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>" if "<unk>" in vocab else None))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    return Tokenizer(tok.to_str().encode(), "tokenizers")


def test_special_ids_of_other_hf_tokenizers_and_what_data_prep_refuses(bpe):
    t5_like = hf_word_level({"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4}, ["<s>", "</s>", "<pad>", "<unk>"])
    assert (t5_like.bos_id, t5_like.eos_id, t5_like.pad_id, t5_like.unk_id) == (1, 2, 3, 0)
    assert t5_like.encode("hello hello") == [4, 4]
    plain = hf_word_level({"<unk>": 0, "hello": 1}, [])
    assert plain.eos_id is None and plain.bos_id is None and plain.unk_id == 0  # the model's own unknown token
    with pytest.raises(prep_tokenizer.TokenizerError, match=r"has no EOS token \(its special tokens: none\); "
                                                            "documents could not be separated"):
        prep_tokenizer.dataset_facts(plain, 2, "concat")
    eos_only = hf_word_level({"</s>": 0, "hello": 1}, ["</s>"])
    assert prep_tokenizer.dataset_facts(eos_only, 2, "concat")["eos_id"] == 0
    with pytest.raises(prep_tokenizer.TokenizerError, match="prep.packing=wrap starts every block with BOS.*</s>"):
        prep_tokenizer.dataset_facts(eos_only, 2, "wrap")
    with pytest.raises(prep_tokenizer.TokenizerError, match="512 tokens but data.vocab_size=600; set data.vocab_size=512"):
        prep_tokenizer.dataset_facts(bpe, 600, "wrap")
    with pytest.raises(TokenizerError, match=r"ids run up to 9, but its vocabulary holds 2 tokens \(no id 1\)"):
        hf_word_level({"a": 0, "b": 9}, [])


def test_concat_and_wrap_packing_arithmetic():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    stream = [5, 6, 7, 2, 8, 2, 9, 10, 11, 12, 13, 2]
    assert eos_stream(docs, 2).tolist() == stream
    blocks, used = pack(np.asarray(stream), "concat", 5)
    assert blocks.tolist() == [stream[0:5], stream[5:10]] and used == 10
    # wrap: pieces of seq_len - 2 framed by BOS (1) and EOS (2); the remainder is what is left of the stream
    blocks, used = pack(np.asarray(stream), "wrap", 5, bos=1, eos=2)
    assert blocks.tolist() == [[1, 5, 6, 7, 2], [1, 2, 8, 2, 2], [1, 9, 10, 11, 2], [1, 12, 13, 2, 2]] and used == 12
    # GPT-2: BOS and EOS are one token
    blocks, dropped = pack_documents(docs, "wrap", 6, bos=0, eos=0)
    assert blocks.tolist() == [[0, 5, 6, 7, 0, 0], [0, 8, 0, 9, 10, 0], [0, 11, 12, 13, 0, 0]] and dropped == 0
    blocks, dropped = pack_documents(docs, "wrap", 7, bos=0, eos=0)
    assert len(blocks) == 2 and dropped == 2 and blocks.dtype == np.int64
    with pytest.raises(ValueError, match="seq_len must be at least 3"):
        pack(np.asarray(stream), "wrap", 2, bos=1, eos=2)
    with pytest.raises(ValueError, match="needs a BOS and an EOS"):
        pack(np.asarray(stream), "wrap", 5, eos=2)
    with pytest.raises(ValueError, match="one of concat, wrap"):
        pack(np.asarray(stream), "pad", 5)


@pytest.mark.parametrize("overrides,expected", [
    (["prep.val_select=last"], "prep.val_select=last needs prep.val_docs=K > 0.*100000"),
    (["prep.packing=wrap", "data.seq_len=2"], "prep.packing=wrap .* data.seq_len must be at least 3, got 2"),
    (["prep.tokenizer_type=byte_bpe", "data.vocab_size=200"], "byte_bpe .* data.vocab_size must be at least 257, "
                                                               "got 200"),
    (["prep.val_select=first"], "prep.val_select must be one of hash, last; got 'first'"),
])
def test_prep_config_rules(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(["config=tiny", *overrides])


def test_prep_config_rules_accept_the_valid_cases():
    load_config(["config=tiny", "prep.val_select=last", "prep.val_docs=5", "prep.packing=wrap", "data.seq_len=3"])
    # a given tokenizer brings its own vocabulary: byte_bpe's minimum does not apply
    load_config(["config=tiny", "prep.tokenizer_type=byte_bpe", "prep.tokenizer=/x/tokenizer.json"])
    owt = load_config(["config=owt_small"]).prep
    assert (owt.input, owt.packing, owt.val_select, owt.val_docs) == ("openwebtext", "wrap", "last", 100_000)


@pytest.mark.slow
def test_export_of_a_byte_bpe_wrap_model_decodes_with_its_tokenizer(tmp_path):
    """byte_bpe + wrap + the last documents as val, trained a few steps by the engine, exported: the export
    carries tokenizer.json and decodes, prompts, packs zero-shot text and checks data through it."""
    from helpers import export_cli, train

    from data_prep.batch import run_job
    from data_prep.inspect import main as inspect_main
    from data_prep.text import TextJob
    from prime_scale import from_pretrained
    from prime_scale.data.shards import read_token_shards
    from prime_scale.evaluate import main as evaluate_main
    from prime_scale.text_metrics import zero_shot_blocks

    docs = docs_subset(tmp_path / "docs", 20)
    text = ["data.vocab_size=512", "data.seq_len=64"]
    data = tmp_path / "data"
    manifest = run_job(TextJob(load_config([
        "config=tiny", f"data.path={data}", f"prep.input={tmp_path / 'docs'}", *text, "data.shard_size_mb=0.05",
        "prep.unit_mb=0.05", "prep.tokenizer_type=byte_bpe", "prep.packing=wrap", "prep.val_select=last",
        "prep.val_docs=3", "prep.tokenizer_sentences=4000"])), progress=False)
    assert manifest["packing"] == "wrap" and manifest["tokenizer"]["library"] == "tokenizers"
    run_dir = train(data, tmp_path, *text, "prep.packing=wrap", "prep.tokenizer_type=byte_bpe")
    export_cli(run_dir, tmp_path / "export")
    export = tmp_path / "export"
    assert (export / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    assert not (export / "tokenizer.model").exists()
    pre = from_pretrained(str(export))
    tok = pre.tokenizer
    assert tok.describe() == {k: manifest["tokenizer"][k] for k in tok.describe()}
    val = read_token_shards(str(data), "val")
    assert (val[:, 0] == 0).all() and (val[:, -1] == 0).all()
    assert pre.detokenize(val[:4]) == [tok.decode(row) for row in val[:4]]
    assert pre.detokenize([tok.encode("The json module")]) == ["The json module"]
    # zero-shot text is packed as the model's data were: wrap blocks
    texts = [p.read_text() for p in docs[:2]]
    blocks, facts = zero_shot_blocks(pre, texts)
    expected, dropped = pack_documents(tok.encode(texts), "wrap", 64, bos=0, eos=0)
    assert torch.equal(blocks, torch.from_numpy(expected)) and facts["packing"] == "wrap"
    assert facts["dropped_tail_tokens"] == dropped
    # the evaluation CLI accepts the model's own data (same tokenizer sha256) and refuses another tokenizer's
    assert evaluate_main([f"models={export}", f"data={data}", "max_sequences=4", "repeats=1"]) == 0
    other = tmp_path / "other"
    shutil.copytree(data, other)
    mf = json.loads((other / "manifest.json").read_text())
    mf["tokenizer"]["sha256"] = "ab" * 32
    (other / "manifest.json").write_text(json.dumps(mf))
    assert evaluate_main([f"models={export}", f"data={other}"]) == 2
    assert inspect_main([str(data), "--split", "val", "-n", "1"]) == 0
