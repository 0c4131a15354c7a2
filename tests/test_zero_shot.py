"""Zero-shot sets by name (prime_scale/zero_shot.py, docs/evaluation.md "Zero-shot sets"): MDLM's detokenisers,
the name-vs-path rule of zero_shot=, local save_to_disk stand-ins of the seven sets in their hub format, the suite
scored end to end by the CLI (checked against evaluate_nelbo on blocks packed by hand), offline refusal of missing
sets, and a set too short for the model's seq_len."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
from pathlib import Path

import datasets
import pytest
import torch
from py_docs import py_docs

from prime_scale.evaluate import evaluate_nelbo, main
from prime_scale.export import from_pretrained
from prime_scale.text_metrics import EvalError
from prime_scale.zero_shot import (SETS, LoadedSet, MissingSets, detokenize_lambada, detokenize_lm1b,
                                   detokenize_ptb, detokenize_scientific_papers, detokenize_wikitext, from_hf_cache,
                                   load_sets, parse_zero_shot, set_blocks)

MDLM_ORDER = ["ptb", "wikitext2", "lm1b", "lambada", "ag_news", "pubmed", "arxiv"]


# ------------------------------------------------------------------------------------------------ detokenisers


def test_detokenisers_on_known_strings():
    # the outputs of MDLM's dataloader.py functions on the same strings (checked once against them)
    assert detokenize_wikitext(
        'The game \'s sales were 1 @,@ 000 @-@ strong ( in Japan ) , and " very good " . \n = = Reception = = \n'
    ) == 'The game\'s sales were 1,000-strong (in Japan), and "very good".\n== Reception ==\n'
    assert detokenize_wikitext(" = = = Plot = = = \n 20 \u00b0 C , 3 @.@ 5 N ; ok : [ a ] { b } ") == \
        " === Plot ===\n20\u00b0C, 3.5 N; ok: [a] {b} "  # " ; " is joined before " N " could match
    assert detokenize_ptb("the company 's shares rose N N N to $ N a share but they do n't know <unk> \\/ more") \
        == "the company's shares rose 1 1 1 to $1 a share but they don't know ? / more"
    assert detokenize_ptb("the firms ' # N bonds") == "the firms' #1 bonds"
    assert detokenize_lm1b('He said , " we will go to http : / / example.com ( today ) . " It \'s ok !') == \
        'He said, "we will go to http://example.com (today) ." It\'s ok!'
    assert detokenize_lm1b("It costs \u00a3 5 or $ 6 ; see [ this ] : and / or he is done .") == \
        "It costs \u00a35 or $6; see [this]: and/or he is done."
    assert detokenize_lambada("  \u201cHello,\u201d she said.  ") == '\n"Hello," she said.'
    assert detokenize_scientific_papers("results ( see fig . 1 ) are good , e.g. 1 @.@ 5 times , \" ok \" ?") == \
        'results (see fig. 1) are good, e.g. 1.5 times, "ok"?'
    assert detokenize_wikitext("") == "" and detokenize_ptb("plain text") == "plain text"


# ------------------------------------------------------------------------------------------------ names vs paths


def test_names_and_paths_are_told_apart(tmp_path):
    r = parse_zero_shot("mdlm")
    assert [s.name for s, _ in r.sets] == MDLM_ORDER and r.root is None and r.local == ""
    r = parse_zero_shot("WikiText2, ptb")
    assert [s.name for s, _ in r.sets] == ["wikitext2", "ptb"] and r.local == ""
    # SET=DIR, a root for the suite, and local text (./ptb is a file named like a set) in one value
    r = parse_zero_shot(f"mdlm={tmp_path},ptb=/data/ptb_copy,./ptb,/docs/*.txt")
    assert r.root == str(tmp_path) and r.local == "./ptb,/docs/*.txt"
    assert dict((s.name, w) for s, w in r.sets) == {**dict.fromkeys(MDLM_ORDER), "ptb": "/data/ptb_copy"}
    assert parse_zero_shot("/data/wiki/*.txt").sets == [] and parse_zero_shot("notes").local == "notes"
    with pytest.raises(EvalError, match="two folders"):
        parse_zero_shot("ptb=/a,ptb=/b")
    with pytest.raises(EvalError, match="names no folder"):
        parse_zero_shot("ptb=")
    # each set's hub source as MDLM reads it, and the one-liner that saves it
    assert SETS["wikitext2"].fetch_command("/z/wikitext2") == (
        "python -c \"import datasets; datasets.load_dataset('Salesforce/wikitext', 'wikitext-2-raw-v1', "
        "split='validation').save_to_disk('/z/wikitext2')\"")
    assert (SETS["ptb"].field, SETS["pubmed"].field, SETS["arxiv"].field) == ("sentence", "article", "article")
    assert {s.name: s.split for s in SETS.values()} == {"ptb": "validation", "wikitext2": "validation",
                                                        "lm1b": "test", "lambada": "test", "ag_news": "test",
                                                        "pubmed": "validation", "arxiv": "validation"}


# ------------------------------------------------------------------------------------------------ stand-ins


def _paragraphs() -> list[str]:
    """Real prose, one paragraph per item (Debian's Python tutorial)."""
    out = []
    for f in py_docs("tutorial", 17):
        for p in re.split(r"\n\s*\n", f.read_text()):
            p = " ".join(p.split())
            if sum(c.isalpha() for c in p) > 80:
                out.append(p)
    return out


def _spaced(p: str) -> str:
    """Prose tokenised the way WikiText/LM1B/PTB store it: punctuation set off by spaces."""
    return re.sub(r"\s*([,.;:!?()])\s*", r" \1 ", p).strip()


def make_standins(root: Path, size: int = 8) -> dict[str, int]:
    """A save_to_disk copy of each of the seven sets under root/NAME, in the format of its hub source (splits,
    columns, tokenisation), ``size`` paragraphs in the scored split; returns each set's number of scored rows."""
    paras = iter(_paragraphs())
    take = lambda n: [next(paras) for _ in range(n)]  # noqa: E731
    rows = {}

    def save(name, data):
        data.save_to_disk(str(root / name))
        scored = data[SETS[name].split] if isinstance(data, datasets.DatasetDict) else data
        rows[name] = len(scored)

    def dd(**splits):
        return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()})

    wiki = [x for p in take(size) for x in (" = Section = \n", "", f" {_spaced(p)} \n")]
    save("wikitext2", dd(train={"text": [" = A = \n"]}, validation={"text": wiki}, test={"text": [" b \n"]}))
    ptb = [re.sub(r"\d+", "N", _spaced(p).lower()) for p in take(size)]
    save("ptb", dd(train={"sentence": ["a b"]}, validation={"sentence": ptb}, test={"sentence": ["c d"]}))
    save("lm1b", dd(train={"text": ["x ."]}, test={"text": [_spaced(p) for p in take(size)]}))
    save("lambada", datasets.Dataset.from_dict({"text": [f"\u201c{p}\u201d" for p in take(size)]}))
    save("ag_news", dd(train={"text": ["t"], "label": [0]},
                       test={"text": take(size), "label": [i % 4 for i in range(size)]}))
    for name in ("pubmed", "arxiv"):
        arts = [_spaced(" ".join(take(2))) for _ in range(size // 2)]
        cols = lambda a: {"article": a, "abstract": [x[:80] for x in a], "section_names": ["intro"] * len(a)}  # noqa: E731
        save(name, dd(train=cols(["t"]), validation=cols(arts), test=cols(["u"])))
    return rows


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("zero_shot_sets")
    return root, make_standins(root)


@pytest.fixture(scope="module")
def wrap_export(world, tmp_path_factory) -> Path:
    """The Prime export of ``world`` with its dataset.json saying wrap: zero-shot text is then packed as
    [BOS] piece [EOS] (the tokenizer's ids 1 and 2)."""
    folder = tmp_path_factory.mktemp("wrap") / "prime_wrap"
    shutil.copytree(world["prime"], folder)
    info = json.loads((folder / "dataset.json").read_text())
    info["packing"] = "wrap"
    (folder / "dataset.json").write_text(json.dumps(info))
    return folder


def _by_hand(pretrained, name: str, folder: Path) -> tuple[torch.Tensor, int]:
    """The set's blocks packed independently of the code under test: rows of the scored split, detokenised,
    tokenized, each followed by EOS, the stream cut into blocks (concat) or framed pieces (wrap)."""
    spec = SETS[name]
    data = datasets.load_from_disk(str(folder))
    if isinstance(data, datasets.DatasetDict):
        data = data[spec.split]
    texts = [spec.detokenize(t) if spec.detokenize else t for t in data[spec.field]]
    tok = pretrained.tokenizer
    stream = [t for ids in tok.encode(texts) for t in ids + [tok.eos_id]]
    seq_len = pretrained.config.data.seq_len
    if pretrained.dataset["packing"] == "wrap":
        piece = seq_len - 2
        n = len(stream) // piece
        rows = [[tok.bos_id] + stream[i * piece : (i + 1) * piece] + [tok.eos_id] for i in range(n)]
    else:
        n = len(stream) // seq_len
        rows = [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long), len(texts)


# ------------------------------------------------------------------------------------------------ the suite


def test_mdlm_suite_end_to_end_agrees_with_evaluate_nelbo(world, wrap_export, standins, tmp_path,
                                                          capsys):
    root, rows = standins
    out = tmp_path / "report.json"
    rc = main([f"models=concat={world['prime']},wrap={wrap_export}", f"zero_shot=mdlm={root}", "max_sequences=6",
               "repeats=2", "seed=3", f"out={out}"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out.read_text())
    for row, folder in zip(report["models"], (world["prime"], wrap_export)):
        got = row["zero_shot_sets"]
        assert list(got) == MDLM_ORDER and "zero_shot" not in row  # one result per set, no local-text result
        pretrained = from_pretrained(str(folder))
        cfg = pretrained.config
        cfg.eval.max_sequences, cfg.eval.repeats = 6, 2
        for name in MDLM_ORDER:
            z = got[name]
            blocks, documents = _by_hand(pretrained, name, root / name)
            assert len(blocks) >= 6, (name, len(blocks))  # the stand-ins are large enough to score
            expected = evaluate_nelbo(pretrained.model, blocks, cfg, seed=3)
            assert z["status"] == "scored" and z["source"] == str(root / name)
            assert (z["documents"], z["blocks"], z["sequences"], z["tokens"]) == (documents, len(blocks), 6, 6 * 64)
            assert documents == rows[name] and z["packing"] == pretrained.dataset["packing"]
            assert z["nelbo_per_token"] == pytest.approx(expected.nelbo_per_token, rel=1e-9)
            assert z["stderr"] == pytest.approx(expected.stderr, rel=1e-9)
            assert z["ppl"] == pytest.approx(math.exp(expected.nelbo_per_token), rel=1e-9)
            # the valid NELBO, never the withdrawn token_joint objective, is the number
            assert z["nelbo_per_token"] != pytest.approx(z["token_joint_not_a_bound"], rel=1e-6)
    # the table: one line per model and set, the numbers of the JSON, the protocol said
    table = captured.out.split("zero-shot sets:\n", 1)[1].split("\nval NELBO:", 1)[0].splitlines()
    assert table[0].split()[:3] == ["model", "set", "split"] and len(table) == 2 + 2 * 7
    concat_ptb, wrap_ptb = table[2], table[2 + 7]
    ptb = report["models"][1]["zero_shot_sets"]["ptb"]
    assert concat_ptb.split()[:2] == ["concat", "ptb"] and "not MDLM's protocol" in concat_ptb
    assert wrap_ptb.split()[:3] == ["wrap", "ptb", "validation"] and "not MDLM" not in wrap_ptb
    assert f"{ptb['nelbo_per_token']:.4f} ± {ptb['stderr']:.4f}" in wrap_ptb


def test_missing_sets_are_named_offline_before_any_model_loads(monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    def no_network(*_):
        raise AssertionError("a zero-shot lookup tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    monkeypatch.setenv("PRIME_ZERO_SHOT_DIR", str(tmp_path / "copies"))
    offline = datasets.config.HF_HUB_OFFLINE
    # the models do not exist: the zero-shot check comes first, so its error is the one reported
    assert main([f"models={tmp_path / 'no_model'}", "zero_shot=mdlm"]) == 2
    err = capsys.readouterr().err
    assert "7 zero-shot set(s) not found locally" in err and "Traceback" not in err
    assert "neither an export folder" not in err
    for name in MDLM_ORDER:
        target = tmp_path / "copies" / name
        assert SETS[name].fetch_command(str(target)) in err
    assert datasets.config.HF_HUB_OFFLINE == offline  # offline mode was only for the lookup
    # a local copy present: only the others are named; an explicit folder that is not there is named too
    make_standins_one = tmp_path / "copies"
    datasets.Dataset.from_dict({"text": ["a b c"]}).save_to_disk(str(make_standins_one / "lambada"))
    with pytest.raises(MissingSets) as e:
        load_sets(parse_zero_shot(f"lambada,ptb,wikitext2={tmp_path / 'wt2'}"))
    message = str(e.value)
    assert "2 zero-shot set(s)" in message and "lambada" not in message.split("\n")[0]
    assert f"no folder {tmp_path / 'wt2'}" in message


def _fake_hub_cache(cache: Path, repo: str, config: str, split: str, data: datasets.Dataset) -> None:
    """What load_dataset(repo, config) leaves in the HF datasets cache once online (datasets 5.x layout:
    Namespace___name/CONFIG/VERSION/HASH/{name-SPLIT.arrow, dataset_info.json}), made offline: prepared by the
    packaged parquet builder, then moved under the repo's name."""
    src = cache.parent / "src.parquet"
    data.to_parquet(str(src))
    builder = datasets.load_dataset_builder("parquet", data_files={split: str(src)}, cache_dir=str(cache / "tmp"))
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    namespace, name = repo.split("/")
    dest = cache / f"{namespace}___{name}" / config / "0.0.0" / "0123abcd"
    dest.mkdir(parents=True)
    shutil.copy(built / f"parquet-{split}.arrow", dest / f"{name}-{split}.arrow")
    info = json.loads((built / "dataset_info.json").read_text())
    (dest / "dataset_info.json").write_text(json.dumps({**info, "config_name": config, "dataset_name": name}))


def test_a_set_in_the_hf_cache_is_read_offline(monkeypatch, tmp_path):
    monkeypatch.setattr(socket.socket, "connect", lambda *_: pytest.fail("network connection attempted"))
    monkeypatch.setenv("PRIME_ZERO_SHOT_DIR", str(tmp_path / "none"))
    cache, offline = tmp_path / "hf_datasets", datasets.config.HF_HUB_OFFLINE
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    rows = [" = Title = \n", "", " a 1 @,@ 000 @-@ strong ( b ) . \n"]
    _fake_hub_cache(cache, "Salesforce/wikitext", "wikitext-2-raw-v1", "validation",
                    datasets.Dataset.from_dict({"text": rows}))
    (loaded,) = load_sets(parse_zero_shot("wikitext2"))
    assert loaded.source == "hf-cache:Salesforce/wikitext/wikitext-2-raw-v1" and loaded.split == "validation"
    assert loaded.documents == [" = Title =\n", "", " a 1,000-strong (b).\n"]
    assert datasets.config.HF_HUB_OFFLINE == offline  # offline mode was only for the lookup
    # a script-only hub dataset is asked for at its Parquet conversion, in offline mode
    calls = []

    def cached(repo, config, **kwargs):
        calls.append((repo, config, kwargs, datasets.config.HF_HUB_OFFLINE))
        return datasets.Dataset.from_dict({"sentence": ["the firm 's N shares", "they do n't"]})

    monkeypatch.setattr(datasets, "load_dataset", cached)
    (loaded,) = load_sets(parse_zero_shot("ptb"))
    assert calls == [("ptb-text-only/ptb_text_only", "penn_treebank",
                      {"split": "validation", "revision": "refs/convert/parquet"}, True)]
    assert loaded.documents == ["the firm's 1 shares", "they don't"]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("off")))
    assert from_hf_cache(SETS["ptb"]) is None


def test_a_set_too_short_for_seq_len_is_reported_not_scored(world, standins, tmp_path, capsys):
    root, _ = standins
    short = tmp_path / "ptb_short"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a"]}),
        "validation": datasets.Dataset.from_dict({"sentence": ["the company 's shares rose N", "they do n't"]}),
    }).save_to_disk(str(short))
    out = tmp_path / "r.json"
    assert main([f"models={world['prime']}", f"zero_shot=ptb={short},wikitext2={root / 'wikitext2'}",
                 "max_sequences=4", "repeats=1", f"out={out}"]) == 0
    captured = capsys.readouterr()
    sets = json.loads(out.read_text())["models"][0]["zero_shot_sets"]
    ptb, wiki = sets["ptb"], sets["wikitext2"]
    assert ptb["status"] == "too_short" and ptb["nelbo_per_token"] is None and ptb["blocks"] == 0
    assert ptb["documents"] == 2 and "give 0 whole block(s) of 64" in ptb["reason"]
    assert wiki["status"] == "scored" and math.isfinite(wiki["nelbo_per_token"])
    assert list(sets) == ["ptb", "wikitext2"]  # the order asked, the empty one kept
    # a split without rows (from the HF cache: datasets cannot read a saved 0-row split back) is too short as well
    blocks, facts = set_blocks(from_pretrained(str(world["prime"])), LoadedSet(SETS["lambada"], [], "x", "test"), {})
    assert blocks is None and facts["status"] == "too_short" and facts["reason"] == "the split has no rows"
    line = next(x for x in captured.out.splitlines() if x.split()[1:2] == ["ptb"])
    assert "empty:" in line and "give 0 whole block(s)" in line
    assert "too short, not scored" in captured.err


def test_bad_local_copies_are_clear_errors(world, tmp_path, capsys):
    wrong_split = tmp_path / "ag"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"], "label": [0]})}).save_to_disk(
        str(wrong_split))
    wrong_field = tmp_path / "wt"
    datasets.Dataset.from_dict({"page": ["a"]}).save_to_disk(str(wrong_field))
    not_saved = tmp_path / "plain"
    not_saved.mkdir()
    no_rows = tmp_path / "no_rows"
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})
                               ).save_to_disk(str(no_rows))
    for value, expected in ((f"ag_news={wrong_split}", "has the splits train, not 'test'"),
                            (f"wikitext2={wrong_field}", "has the columns page, not 'text'"),
                            (f"lm1b={not_saved}", "is not a readable datasets.save_to_disk folder"),
                            (f"lambada={no_rows}", "is not a readable datasets.save_to_disk folder")):
        assert main([f"models={world['prime']}", f"zero_shot={value}"]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
