"""Text data prep as a SLURM job array gives the same shards, byte for byte, as the same job run locally.

Needs root and the Debian packages ``slurm-wlm munge`` (see launchers/slurm_cluster.sh); fails, not skips, without.
"""

from __future__ import annotations

import json
import random
import subprocess
import uuid

import pytest

from data_prep.batch import run_job
from data_prep.cli import cli_parser
from data_prep.slurm import SLURM_DEFAULTS
from data_prep.text import TextJob
from prime_scale.config import load_config
from prime_scale.launch.slurm_tools import SlurmOptions
from slurm_helpers import PARTITION, ensure_slurm_cluster


def _words(rng: random.Random, vocabulary: list[str], n: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def make_corpus(root) -> int:
    """A few small .txt and .jsonl files of generated prose (fixed seed); returns their total size in bytes."""
    rng = random.Random(1234)
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vo", "pel", "dor", "an", "is", "qu", "et", "ba", "nor"]
    vocabulary = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    root.mkdir(parents=True)
    for i in range(3):  # one document per .txt file (prep.txt_document=file)
        lines = [_words(rng, vocabulary, rng.randint(5, 20)) + "." for _ in range(rng.randint(150, 250))]
        (root / f"story{i}.txt").write_text("\n".join(lines) + "\n")
    for i in range(2):  # one document per line; files larger than prep.unit_mb are split at line boundaries
        docs = [{"text": "\n".join(_words(rng, vocabulary, rng.randint(5, 20)) + "." for _ in range(rng.randint(2, 8))),
                 "id": f"{i}-{k}"} for k in range(120)]
        (root / f"web{i}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return sum(p.stat().st_size for p in root.iterdir())


def make_config(data_path, input_dir):
    return load_config([
        "config=tiny", f"data.path={data_path}", f"prep.input={input_dir}", "data.vocab_size=300", "data.seq_len=64",
        "data.shard_size_mb=0.02", "prep.unit_mb=0.01", "prep.val_fraction=0.1", "prep.tokenizer_sentences=2000",
    ])


def test_slurm_options_are_submitit_named_and_the_old_spellings_still_work(capsys):
    parser = cli_parser("python -m data_prep.text", "")
    new = SlurmOptions.from_args(parser.parse_args(["--slurm", "--timeout-min", "5", "--mem-gb", "2",
                                                    "--array-parallelism", "3", "--partition", "p"]), SLURM_DEFAULTS)
    assert capsys.readouterr().err == ""
    old = SlurmOptions.from_args(parser.parse_args(["--slurm", "--time", "5", "--mem", "2", "--max-parallel", "3",
                                                    "--partition", "p"]), SLURM_DEFAULTS)
    assert old == new and new.logs == SLURM_DEFAULTS.logs and new.cpus_per_task == SLURM_DEFAULTS.cpus_per_task
    assert len([n for n in capsys.readouterr().err.splitlines() if "is deprecated, use" in n]) == 3
    # array tasks of a data prep do not save and requeue: no --signal, no --requeue of ours
    assert new.parameters(tasks_per_node=1, name="x", requeue=False) == {
        "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 2, "timeout_min": 5, "name": "x", "mem_gb": 2,
        "slurm_partition": "p", "slurm_array_parallelism": 3, "slurm_additional_parameters": {}}
    assert SlurmOptions.from_args(parser.parse_args([]), SLURM_DEFAULTS) == SLURM_DEFAULTS


def shard_digests(manifest: dict) -> dict:
    return {s["name"]: (s["bytes"], s["sha256"]) for split in manifest["splits"].values() for s in split["shards"]}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_job_array_gives_the_same_shards_as_a_local_run(tmp_path, capsys):
    ensure_slurm_cluster()
    total = make_corpus(tmp_path / "corpus")
    assert total > 100_000  # about ten 0.01 MB work units

    local = run_job(TextJob(make_config(tmp_path / "local", tmp_path / "corpus")), workers=1, progress=False)
    units = local["source"]["units"]
    assert units >= 6 and len(local["splits"]["train"]["shards"]) >= 2

    # A unique output name, so that a leftover of this very run can be cancelled by job name below.
    out = tmp_path / f"slurm-{uuid.uuid4().hex[:8]}"
    logs = tmp_path / "slurm_logs"
    opts = SlurmOptions(array_parallelism=2, partition=PARTITION, cpus_per_task=1, mem_gb=1, timeout_min=5,
                        logs=str(logs))
    try:
        # The tasks run as root on this machine with this Python (submitit's default), so they see tmp_path.
        # Without sacct, run_job only learns of a task's end from its result file: the test timeout bounds it.
        on_slurm = run_job(TextJob(make_config(out, tmp_path / "corpus")), slurm=opts, progress=False)
    finally:
        subprocess.run(["scancel", f"--name=data_prep:{out.name}"], capture_output=True, timeout=30)

    assert f"submitted {units} SLURM array tasks" in capsys.readouterr().out
    submissions = list(logs.glob("*_submission.sh"))
    assert len(submissions) == 1 and f"#SBATCH --array=0-{units - 1}%2" in submissions[0].read_text()
    assert len(list(logs.glob("*_result.pkl"))) == units  # every unit ran as an array task

    assert sorted(shard_digests(on_slurm)) == sorted(shard_digests(local))
    assert shard_digests(on_slurm) == shard_digests(local)  # same names, sizes and sha256
    assert on_slurm["splits"] == local["splits"]
    assert on_slurm["tokenizer"]["sha256"] == local["tokenizer"]["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
