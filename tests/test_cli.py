"""The one command-line layer (prime_scale/cli.py, docs/cli.md): how key=value words are read, and that every
entry point answers --help with its keys, refuses a misspelled key with exit 2 naming the closest key, and keeps
the exit-code table."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from prime_scale.cli import EXIT_OK, EXIT_USAGE, Key, UsageError, config_help, guarded, keys_help, parse_keys
from prime_scale.config import field_types, key_help

KEYS = (
    Key("url", "where", required=True),
    Key("n", "how many", 3, int, minimum=1),
    Key("rate", "a fraction", 0.5, float, minimum=0.0),
    Key("shards", "list them", False, bool),
    Key("split", "which", "train", choices=("train", "val")),
)


def test_words_are_typed_checked_and_given_once():
    assert parse_keys(["url=s3://b/x", "n=7", "rate=1e-3", "shards=yes"], KEYS) == {
        "url": "s3://b/x", "n": 7, "rate": 0.001, "shards": True, "split": "train"}
    for argv, message in [(["n=2"], "url= is required"), (["url=a", "n=two"], "n expects int, got 'two'"),
                          (["url=a", "n=0"], "n must be at least 1, got 0"),
                          (["url=a", "shards=maybe"], "shards expects bool, got 'maybe'"),
                          (["url=a", "split=tset"], "split must be one of train, val; got 'tset'"),
                          (["url=a", "url=b"], "url= given twice"), (["url=a", "nn=2"], "did you mean 'n'?"),
                          (["url=a", "split"], "expected key=value, got 'split'"),
                          (["url=a", "zzzz=1"], "unknown key 'zzzz'; keys: url, n, rate, shards, split")]:
        with pytest.raises(UsageError) as err:
            parse_keys(argv, KEYS)
        assert message in str(err.value), (argv, str(err.value))


def test_older_flag_and_bare_word_spellings_still_work_and_say_the_new_one(capsys):
    args = parse_keys(["/data/owt", "--split", "val", "-n", "2", "--shards"], KEYS, positional=("url",))
    assert args == {"url": "/data/owt", "n": 2, "rate": 0.5, "shards": True, "split": "val"}
    err = capsys.readouterr().err
    assert "'--split val' is an older spelling of split=val" in err and "'/data/owt' is an older spelling of url=" in err
    with pytest.raises(UsageError, match="--split needs a value"):
        parse_keys(["url=a", "--split"], KEYS)


def test_extra_words_are_offered_to_the_command_first():
    taken = []
    args = parse_keys(["url=a", "sample.steps=8", "n=2"], KEYS,
                      extra=lambda k, v: k.startswith("sample.") and not taken.append((k, v)))
    assert taken == [("sample.steps", "8")] and args["n"] == 2


def test_every_config_key_has_help_from_its_comment():
    helps = key_help()
    assert set(helps) == set(field_types())
    assert helps["prep.val_select"].startswith("which documents are validation") and "val_docs=100000" in helps[
        "prep.val_select"]  # a comment continued on the next line
    assert helps["prep.tokenizer"].startswith("an existing tokenizer (path or URL)")  # a comment above the field
    assert "NOT a bound" in helps["diffusion.loss"]
    text = config_help(("prep",))
    assert "  prep.packing=str\n      concat: documents + EOS joined" in text and "train.steps" not in text


def test_keys_help_and_guarded_exit_codes(capsys):
    text = keys_help(KEYS)
    assert "  split=train|val\n      which (default train)" in text and "  url=TEXT\n      where (required)" in text

    def fails(exc):
        def run():
            raise exc
        return run

    assert guarded(lambda: EXIT_OK, "prog") == EXIT_OK
    assert guarded(fails(UsageError("bad")), "prog") == EXIT_USAGE
    assert "error: bad\n(see: prog --help)" in capsys.readouterr().err
    with pytest.raises(KeyError):  # anything else is a bug and keeps its traceback
        guarded(fails(KeyError("x")), "prog")


# Every entry point: module, a word with a misspelled key, the key it should suggest, words --help must show.
ENTRY_POINTS = [
    ("prime_scale.engine", ["config=tiny", "train.stpes=3"], "train.steps", ["prep.packing", "engine.zero_stage"]),
    ("prime_scale.sample", ["ckpt=/x", "nmu=2"], "num", ["prompt_ids", "sample.top_p"]),
    ("prime_scale.export", ["ckpt=/x", "out=/y", "wieghts=ema"], "weights", ["weights=auto|ema|trained"]),
    ("prime_scale.evaluate", ["models=/x", "zeroshot=mdlm"], "zero_shot", ["gen_samples=N", "wikitext2"]),
    ("data_prep.inspect", ["url=/x", "splt=val"], "split", ["chars=N"]),
    ("data_prep.synthetic", ["config=demo", "model.n_layers=6"], "model.n_layer", ["data.markov_concentration"]),
    ("data_prep.text", ["config=text_demo", "prep.inptu=x"], "prep.input", ["--workers", "--mem-gb", "prep.val_select"]),
    ("data_prep.images", ["config=imagenet32", "prep.image_szie=8"], "prep.image_size", ["--array-parallelism"]),
    ("data_prep.digits", ["config=digits", "data.seq_lne=8"], "data.seq_len", ["--slurm"]),
    ("prime_scale.launch.local", ["config=tiny", "train.stpes=3"], "train.steps", ["--nproc", "engine.ema_decay"]),
    ("prime_scale.launch.slurm", ["--dry-run", "config=tiny", "train.stpes=3"], "train.steps",
     ["--timeout-min", "--mem-gb", "ckpt.every_minutes"]),
    ("prime_scale.launch.sweep", ["sweep=pydocs_tiny", "--dry-run", "train.stpes=3"], "train.steps",
     ["--array-parallelism", "sweep=NAME"]),
]
SCALING = ("prime_scale.scaling", ["fit", "results=/x.csv", "bootsrap=3"], "bootstrap", ["flops_per_param_token"])


@pytest.mark.parametrize("module,typo,closest,shown", [*ENTRY_POINTS, SCALING], ids=lambda x: str(x)[:30])
def test_every_entry_point_answers_help_and_names_the_closest_key(module, typo, closest, shown, capsys):
    main = importlib.import_module(module).main
    try:
        status = main(["--help"])
    except SystemExit as e:  # the commands with flags print argparse's help, which exits
        status = e.code
    assert status == EXIT_OK
    out = capsys.readouterr().out
    assert all(word in out for word in shown), out[-2000:]
    assert main(typo) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"did you mean '{closest}'?" in err and "Traceback" not in err, err


@pytest.mark.slow  # lm_eval indexes its task files at start (about 10 s)
def test_the_harness_entry_point_refuses_a_misspelled_model_args_key(tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

    def run(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "prime_scale.harness", *words], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    assert run("--help").returncode == EXIT_OK
    done = run("--model", "prime_scale", "--model_args", "pretrained=/x,mc_nmu=2", "--tasks", "lambada_openai")
    assert done.returncode == EXIT_USAGE and "did you mean 'mc_num'?" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_data_prep_refusals_exit_2_and_failures_exit_1(monkeypatch, tmp_path, capsys):
    """A job refused before any unit ran (DataPrepError) is a usage error; one that started and did not finish
    (DataPrepFailure) failed; both in one line. The real refusals are tested in test_prep_text.py."""
    from data_prep import batch
    from data_prep.text import main

    argv = ["config=text_demo", f"data.path={tmp_path / 'out'}", "--no-progress"]
    for error, status, said in ((batch.DataPrepError("prep.input x does not exist"), EXIT_USAGE, "error: prep.input"),
                                (batch.DataPrepFailure("work unit 3 vanished"), 1, "data prep failed: work unit 3")):
        def refuse(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(batch, "run_job", refuse)
        assert main(argv) == status
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
