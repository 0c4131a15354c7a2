"""Sweeps: spec expansion (families x grid x seeds, ids, overrides, errors), the isoFLOP arithmetic, and the
launcher end to end here (resume, skip, rerun of a forgotten or killed point) and as one SLURM job array."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from prime_scale import sweep as sw
from prime_scale.config import load_config
from prime_scale.launch import sweep as launch_sweep
from prime_scale.metrics import flops_per_token
from prime_scale.model import PrimeTransformer
from slurm_helpers import PARTITION, ensure_slurm_cluster

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def write_spec(folder: Path, name: str, body: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def spec_of(tmp_path: Path, body: dict, name: str = "s") -> sw.SweepSpec:
    return sw.load_spec(str(write_spec(tmp_path, name, body)))


def run_side_by_side(*cmds: list[str], timeout: float) -> list[subprocess.CompletedProcess]:
    """``subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)`` of each command, all at
    once (one thread waits on each), in their order: for commands that neither write what another reads nor read
    what another writes, so that each result is the one it would have alone."""
    with ThreadPoolExecutor(len(cmds)) as pool:
        return list(pool.map(lambda cmd: subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                                        timeout=timeout), cmds))


BASIC = {
    "base": "tiny",
    "overrides": ["log.wandb=disabled", "train.warmup_steps=50"],
    "families": {"mdm": ["prime.num_subtokens=1"], "prime_l2": {"prime.num_subtokens": 2},
                 "ar": ["model.objective=ar", "prime.num_subtokens=1"]},
    "grid": {"model.d_model": [16, 32], "train.steps": [10, 40]},
    "seeds": [0, 1],
}


# ------------------------------------------------------------------------------------------------ expansion


def test_grid_expands_families_times_product_times_seeds_with_stable_unique_ids(tmp_path):
    spec = spec_of(tmp_path, BASIC)
    points = sw.expand(spec, tmp_path / "out")
    assert len(points) == 3 * 2 * 2 * 2
    ids = [p.id for p in points]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "mdm-d16_s10-seed0" and "prime_l2-d32_s40-seed1" in ids and "ar-d16_s40-seed1" in ids
    assert ids == [p.id for p in sw.expand(sw.load_spec(spec.path), tmp_path / "out")]  # stable
    # the order of the grid's keys in the file does not change the ids
    swapped = {**BASIC, "grid": {"train.steps": [10, 40], "model.d_model": [16, 32]}}
    assert sorted(ids) == sorted(p.id for p in sw.expand(spec_of(tmp_path, swapped, "t"), tmp_path / "out"))

    p = next(q for q in points if q.id == "prime_l2-d32_s40-seed1")
    cfg = p.config()
    assert (cfg.prime.num_subtokens, cfg.model.d_model, cfg.train.steps, cfg.train.seed) == (2, 32, 40, 1)
    assert cfg.run.name == "s/prime_l2-d32_s40-seed1" and cfg.run.out_dir == str((tmp_path / "out").resolve())
    assert Path(p.run_dir) == (tmp_path / "out" / "s" / p.id).resolve()
    assert cfg.ckpt.resume == "auto" and cfg.log.wandb == "disabled"
    assert cfg.train.eval_every == 40  # validation only at the end
    assert cfg.train.warmup_steps == 4  # 50 clamped to 10% of 40 steps
    ar = next(q for q in points if q.family == "ar").config()
    assert ar.model.objective == "ar" and ar.prime.num_subtokens == 1

    # N, D, C
    model = PrimeTransformer.from_config(cfg)
    assert p.N == model.num_params(include_embedding=False) < p.N_total == model.num_params()
    assert p.flops_per_token == flops_per_token(model, cfg.data.seq_len)  # the meta-device build counts the same
    assert p.D == 40 * cfg.train.batch_size * cfg.data.seq_len and p.C == p.flops_per_token * p.D
    assert p.C != 6 * p.N * p.D  # attention is counted, so it is not exactly 6 N D


def test_command_line_overrides_points_mode_and_only(tmp_path):
    spec = spec_of(tmp_path, {"base": "tiny", "families": {"a": [], "b": ["model.n_layer=1"]},
                              "points": [{"model.d_model": 16}, {"model.d_model": 32, "train.lr": 0.002}]})
    points = sw.expand(spec, tmp_path, ["train.batch_size=8"], only=["b"])
    assert [p.id for p in points] == ["b-d16-seed0", "b-d32_lr0.002-seed0"]
    cfg = points[1].config()
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.train.lr, cfg.train.batch_size) == (1, 32, 0.002, 8)
    assert points[1].D == cfg.train.steps * 8 * cfg.data.seq_len


def test_prime_merge_mlp_is_counted_in_N_and_C(tmp_path):
    spec = spec_of(tmp_path, {"base": "tiny", "families": {"sum": ["prime.num_subtokens=2"],
                                                           "mlp": ["prime.num_subtokens=2", "model.merge=mlp"]}})
    plain, merged = sw.expand(spec, tmp_path)
    d = plain.config().model.d_model
    assert merged.N - plain.N == 8 * d * d + 4 * d + d + 2 * d  # two Linear layers (+ biases) and a LayerNorm
    assert merged.flops_per_token - plain.flops_per_token == 6 * 8 * d * d


@pytest.mark.parametrize("body, message", [
    ({**BASIC, "famlies": {}}, "unknown sweep key 'famlies'; did you mean 'families'?"),
    ({**BASIC, "families": {"mdm": ["prime.num_subtoken=1"]}},
     "families.mdm: unknown config key 'prime.num_subtoken'; did you mean 'prime.num_subtokens'?"),
    ({**BASIC, "grid": {"model.d_modle": [16]}}, "grid: unknown config key 'model.d_modle'; did you mean 'model.d_model'?"),
    ({**BASIC, "overrides": ["run.name=x"]}, "overrides: run.name is set by the sweep"),
    ({**BASIC, "overrides": ["train.seed=3"]}, "overrides: train.seed is set by seeds:"),
    ({**BASIC, "points": [{"model.d_model": 16}]}, "give one of grid:, points: and isoflop:"),
    ({**BASIC, "grid": {"model.d_model": [16, 16]}}, "grid.model.d_model: repeated values"),
    ({**BASIC, "grid": {"model.d_model": [15]}}, "model.d_model (15) must be a positive multiple of model.n_head"),
    ({**BASIC, "grid": {"train.steps": ["ten"]}}, "train.steps expects int, got 'ten'"),
    ({**BASIC, "families": {"my-family": []}}, "family name 'my-family'"),
    ({"base": "tnyi", "families": {"a": []}}, "unknown config 'tnyi' (did you mean 'tiny'?)"),
    ({"base": "tiny", "families": {"a": []}, "points": [{"model.d_model": 16}, {"model.d_model": 16}]},
     "two points have the id 'a-d16-seed0'"),
    ({"base": "tiny", "families": {"a": []}, "isoflop": {"budgets": [-1], "sizes": [{"model.d_model": 16}]}},
     "isoflop.budgets[0]: expected a positive number, got -1"),
    ({"base": "tiny", "families": {"a": []}, "isoflop": {"budgets": [1e9], "sizes": [{"train.steps": 5}]}},
     "train.steps is computed from the budget"),
])
def test_spec_errors_name_the_key(tmp_path, body, message):
    with pytest.raises(sw.SweepError) as e:
        sw.expand(spec_of(tmp_path, body), tmp_path)
    assert message in str(e.value)


def test_command_line_errors(tmp_path):
    spec = spec_of(tmp_path, BASIC)
    for cli, only, message in [(["model.d_model=64"], [], "model.d_model is varied by the sweep's points"),
                               (["train.seed=1"], [], "train.seed is set by the spec's seeds"),
                               (["train.stpes=1"], [], "did you mean 'train.steps'"),
                               ([], ["prime"], "unknown family 'prime' (did you mean 'prime_l2'?)")]:
        with pytest.raises(sw.SweepError, match=re.escape(message)):
            sw.expand(spec, tmp_path, cli, only)
    with pytest.raises(sw.SweepError, match="unknown sweep 'pydocs_tyni' \\(did you mean 'pydocs_tiny'\\?\\)"):
        sw.load_spec("pydocs_tyni")


# ------------------------------------------------------------------------------------------------ isoFLOP


def test_isoflop_points_spend_their_budget_and_trade_N_for_D(tmp_path):
    budgets = [3e10, 1e11, 3e11]
    spec = spec_of(tmp_path, {"base": "text_demo", "overrides": ["data.seq_len=64", "train.batch_size=16",
                                                                "model.n_layer=2", "model.n_head=2"],
                              "families": {"mdm": ["prime.num_subtokens=1"], "prime_l2": ["prime.num_subtokens=2"]},
                              "isoflop": {"budgets": budgets, "sizes": [{"model.d_model": d} for d in (32, 64, 96, 128)]}})
    points = sw.expand(spec, tmp_path)
    assert len(points) == 2 * 3 * 4 and len({p.id for p in points}) == len(points)
    for p in points:
        assert abs(p.C / p.budget - 1) <= 0.10, p
        assert p.C == pytest.approx(p.flops_per_token * p.D) and p.D == p.steps * 16 * 64
        assert p.steps == max(1, round(p.budget / p.flops_per_token / (16 * 64)))
        assert not p.warnings
        cfg = p.config()
        assert cfg.train.steps == p.steps and cfg.train.eval_every == p.steps
    for family in ("mdm", "prime_l2"):
        for b in budgets:
            row = sorted((p for p in points if p.family == family and p.budget == b), key=lambda p: p.N)
            assert [p.N for p in row] == sorted({p.N for p in row})  # four distinct sizes
            assert all(x.D > y.D for x, y in zip(row, row[1:]))  # a larger model sees fewer tokens
    assert points[0].id == "mdm-d32_C3e10-seed0"
    # the shipped isoFLOP sweeps keep every point within 10% of its budget
    for name in ("pydocs_isoflop", "owt_chinchilla"):
        shipped = sw.expand(sw.load_spec(name), tmp_path)
        assert shipped and all(abs(p.C / p.budget - 1) <= 0.10 and not p.warnings for p in shipped)


def test_isoflop_rounding_far_off_the_budget_warns(tmp_path):
    spec = spec_of(tmp_path, {"base": "tiny", "families": {"a": []},
                              "isoflop": {"budgets": ["1e6", 3e9], "sizes": [{"model.d_model": 64}]}})
    tiny, ok = sw.expand(spec, tmp_path)
    assert tiny.steps == 1 and tiny.warnings and "off the budget" in tiny.warnings[0]
    assert not ok.warnings and ok.id == "a-d64_C3e9-seed0"


def test_shipped_acceptance_sweep_is_3_sizes_x_3_budgets_x_2_families(tmp_path):
    points = sw.expand(sw.load_spec("pydocs_tiny"), tmp_path)
    assert len(points) == 18 and {p.family for p in points} == {"mdm", "prime_l2"}
    assert len({p.N for p in points}) == 3 and len({p.D for p in points}) == 3
    cfg = points[0].config()
    assert cfg.data.path == "data/pydocs" and cfg.log.wandb == "disabled"


def test_results_table_lists_unfinished_points_without_loss(tmp_path):
    spec = spec_of(tmp_path, BASIC)
    points = sw.expand(spec, tmp_path / "out")[:2]
    run = Path(points[0].run_dir)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": points[0].steps, "val/nelbo_per_token": 3.5,
                                                   "val/stderr": 0.1, "val/ppl": math.exp(3.5)}) + "\n")
    sw.record_attempt(run, 12.5, 0, "local")
    assert sw.mark_finished(points[0], "local").status == "done"
    states = [sw.read_state(p) for p in points]
    assert [s.status for s in states] == ["done", "pending"]
    rows = sw.results_rows(points, states)
    paths = sw.write_results(rows, tmp_path / "out" / "s")
    import pandas as pd

    df = pd.read_csv(paths[0])
    assert list(df.columns) == list(sw.RESULT_COLUMNS)
    assert df.loc[0, "loss"] == 3.5 and df.loc[0, "wall_s"] == 12.5 and df.loc[0, "status"] == "done"
    assert math.isnan(df.loc[1, "loss"]) and df.loc[1, "status"] == "pending" and df.loc[1, "N"] == points[1].N


def test_dry_run_prints_the_points_and_writes_nothing(tmp_path):
    # three independent launcher processes (nothing written, the dry run's folder checked after all ended), at once
    out, usage, typo = run_side_by_side(
        [PY, "launchers/sweep.py", "sweep=owt_chinchilla", "--dry-run", "--out", str(tmp_path / "o")],
        [PY, "launchers/sweep.py", "--dry-run"],
        [PY, "launchers/sweep.py", "sweep=pydocs_tiny", "--dry-run", "model.n_layers=3"], timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"id\s+family\s+seed\s+N\s+D\s+C\s+steps", out.stdout)
    assert "54 points (isoFLOP" in out.stdout and "ar-d512_h8_L6_C1e18-seed0" in out.stdout
    assert not (tmp_path / "o").exists()
    assert usage.returncode == 2 and "give sweep=NAME" in usage.stderr and "pydocs_tiny" in usage.stderr
    assert typo.returncode == 2 and "did you mean 'model.n_layer'" in typo.stderr


def test_slurm_options_are_submitit_named_and_the_old_spellings_still_work(capsys):
    cfg = load_config(["config=tiny"])
    new = launch_sweep.parse_args(["sweep=pydocs_tiny", "--array-parallelism", "2", "--timeout-min", "10",
                                   "--signal-delay-s", "30", "--mem-gb", "3", "--partition", "p"])
    assert capsys.readouterr().err == ""
    old = launch_sweep.parse_args(["sweep=pydocs_tiny", "--max-parallel", "2", "--time", "10", "--signal-delay", "30",
                                   "--mem", "3", "--partition", "p"])
    params = launch_sweep.executor_parameters(new, cfg)
    assert launch_sweep.executor_parameters(old, cfg) == params
    assert params == {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": 8, "timeout_min": 10, "mem_gb": 3,
                      "slurm_partition": "p", "slurm_array_parallelism": 2, "slurm_signal_delay_s": 30,
                      "slurm_additional_parameters": {"requeue": True}}
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 4 and all("is deprecated, use" in n for n in notes), notes
    assert "--max-parallel is deprecated, use --array-parallelism" in notes[0]


# ------------------------------------------------------------------------------------------------ end to end

TINY = {
    "base": "tiny",
    "overrides": ["log.wandb=disabled", "train.num_threads=1", "ckpt.every_steps=10", "ckpt.every_minutes=0"],
    "families": {"mdm": ["prime.num_subtokens=1"], "prime_l2": ["prime.num_subtokens=2"]},
    "grid": {"model.d_model": [16, 32], "train.steps": [20]},
    "seeds": [0],
}
TINY_IDS = ["mdm-d16_s20-seed0", "mdm-d32_s20-seed0", "prime_l2-d16_s20-seed0", "prime_l2-d32_s20-seed0"]


def sweep_cmd(spec: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [PY, "launchers/sweep.py", f"sweep={spec}", "--out", str(out), f"data.path={data}", *extra]


def ran(stdout: str) -> list[str]:
    return re.findall(r"^\[sweep\] \d+/\d+ (\S+) ", stdout, flags=re.M)


def table(path: Path) -> dict[str, dict]:
    import pandas as pd

    return {r["id"]: r for r in pd.read_csv(path).to_dict("records")}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """The tiny sweep (2 families x 2 sizes x 1 budget) run here once: (spec, data, out folder, first stdout)."""
    root = tmp_path_factory.mktemp("sweep")
    spec = write_spec(root, "tiny_sweep", TINY)
    data = root / "data"
    prep = subprocess.run([PY, "-m", "data_prep.synthetic", "config=tiny", f"data.path={data}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr
    first = subprocess.run(sweep_cmd(spec, data, root / "local"), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return spec, data, root / "local", first.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_sweep_runs_skips_and_reruns_only_a_forgotten_or_killed_point(local_sweep):
    spec, data, out, stdout = local_sweep
    folder = out / "tiny_sweep"
    assert ran(stdout) == TINY_IDS and "4 points" in stdout and "4 done" in stdout
    planned = {p.id: p for p in sw.expand(sw.load_spec(str(spec)), out, [f"data.path={data}"])}
    rows = table(folder / "results.csv")
    assert sorted(rows) == TINY_IDS and (folder / "results.parquet").is_file()
    for pid, r in rows.items():
        p = planned[pid]
        assert r["status"] == "done" and math.isfinite(r["loss"]) and 0 < r["loss"] < math.log(64) + 0.5
        assert (r["family"], r["N"], r["D"], r["steps"], r["seed"]) == (p.family, p.N, p.D, 20, 0)
        assert r["C"] == pytest.approx(p.C) and r["wall_s"] > 0 and r["run_url"] == p.run_dir
        assert r["loss"] == json.loads((Path(p.run_dir) / "done.json").read_text())["loss"]
    assert rows["mdm-d16_s20-seed0"]["N"] < rows["mdm-d32_s20-seed0"]["N"]

    # everything finished: a rerun runs nothing
    again = subprocess.run(sweep_cmd(spec, data, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and ran(again.stdout) == [] and "4 already done, 0 to run" in again.stdout

    # forget one point's marker; "kill" another one after its step-10 checkpoint (pointer back, later work gone)
    forgotten, killed = Path(planned[TINY_IDS[1]].run_dir), Path(planned[TINY_IDS[2]].run_dir)
    (forgotten / "done.json").unlink()
    (killed / "done.json").unlink()
    shutil.rmtree(killed / "checkpoints" / "step_00000020")
    (killed / "checkpoints" / "latest.json").write_text(json.dumps({"tag": "step_00000010"}))
    kept = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 10]
    (killed / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    attempts = {pid: len((Path(p.run_dir) / "attempts.jsonl").read_text().splitlines()) for pid, p in planned.items()}

    rerun = subprocess.run(sweep_cmd(spec, data, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert ran(rerun.stdout) == [TINY_IDS[1], TINY_IDS[2]] and "2 already done, 2 to run" in rerun.stdout
    after = {pid: len((Path(p.run_dir) / "attempts.jsonl").read_text().splitlines()) for pid, p in planned.items()}
    assert {pid: after[pid] - attempts[pid] for pid in TINY_IDS} == {TINY_IDS[0]: 0, TINY_IDS[1]: 1,
                                                                    TINY_IDS[2]: 1, TINY_IDS[3]: 0}
    assert "resumed from" in (killed / "train.log").read_text().split("# ")[-1]
    assert "at step 10" in (killed / "train.log").read_text().split("# ")[-1]
    new = table(folder / "results.csv")
    assert all(new[pid]["status"] == "done" for pid in TINY_IDS)
    # an exact resume: the killed point ends with the loss of its uninterrupted run
    assert new[TINY_IDS[2]]["loss"] == pytest.approx(rows[TINY_IDS[2]]["loss"], rel=1e-6)
    assert new[TINY_IDS[1]]["loss"] == rows[TINY_IDS[1]]["loss"]

    # --collect (writes only the results table) and, at the same time, the same folder with another recipe, which
    # is refused before anything runs (it only reads the run folders): results must not mix
    collect, other = run_side_by_side(sweep_cmd(spec, data, out, "--collect"),
                                      sweep_cmd(spec, data, out, "train.lr=0.01"), timeout=300)
    assert collect.returncode == 0 and "4 done" in collect.stdout
    assert other.returncode == 2 and "was run with another config (train.lr: run 0.001, spec 0.01)" in other.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failing_point_is_reported_and_the_others_still_run(local_sweep, tmp_path):
    _, data, _, _ = local_sweep
    spec = write_spec(tmp_path, "mixed", {"base": "tiny", "overrides": ["log.wandb=disabled", "train.num_threads=1",
                                                                       "train.steps=5"],
                                          "families": {"bad": ["engine.micro_batch_size=5"], "ok": []}})
    proc = subprocess.run(sweep_cmd(spec, data, tmp_path / "out"), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bad-seed0" in proc.stdout and "FAILED (exit status 2)" in proc.stdout
    assert "not a multiple of engine.micro_batch_size=5" in proc.stdout  # the log's last lines
    rows = table(tmp_path / "out" / "mixed" / "results.csv")
    assert rows["bad-seed0"]["status"] == "failed" and math.isnan(rows["bad-seed0"]["loss"])
    assert rows["ok-seed0"]["status"] == "done" and math.isfinite(rows["ok-seed0"]["loss"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_sweep_is_one_job_array_and_matches_the_local_results(local_sweep, tmp_path):
    ensure_slurm_cluster()
    spec, data, local_out, _ = local_sweep
    out = tmp_path / "slurm"
    name = f"sweep-test-{uuid.uuid4().hex[:8]}"
    try:
        proc = subprocess.run(sweep_cmd(spec, data, out, "--slurm", "--wait", "--partition", PARTITION,
                                        "--cpus-per-task", "1", "--timeout-min", "10", "--array-parallelism", "2", "--poll", "0.5",
                                        "--name", name), cwd=REPO, capture_output=True, text=True, timeout=540)
    finally:
        subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    array_id = re.search(r"submitted job array (\d+) with 4 tasks, at most 2 at once", proc.stdout).group(1)

    logs = out / "tiny_sweep" / "slurm"
    submissions = list(logs.glob("*_submission.sh"))
    assert len(submissions) == 1 and "#SBATCH --array=0-3%2" in submissions[0].read_text()
    assert sorted(p.name for p in logs.glob("*_result.pkl")) == [f"{array_id}_{i}_0_result.pkl" for i in range(4)]
    state = json.loads((out / "tiny_sweep" / "slurm.json").read_text())
    tasks = state["submissions"][0]["tasks"]
    assert state["submissions"][0]["array_job_id"] == array_id
    assert sorted(tasks) == TINY_IDS and sorted(tasks.values()) == [f"{array_id}_{i}" for i in range(4)]
    for pid, job in tasks.items():
        run = out / "tiny_sweep" / pid
        starts = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
        assert [s["job_id"] for s in starts] == [job]  # TrainJob ran it, once
        assert json.loads((run / "attempts.jsonl").read_text().splitlines()[-1])["where"] == f"slurm:{job}"

    got, want = table(out / "tiny_sweep" / "results.csv"), table(local_out / "tiny_sweep" / "results.csv")
    assert sorted(got) == TINY_IDS
    for pid in TINY_IDS:
        assert got[pid]["status"] == "done"
        assert (got[pid]["N"], got[pid]["D"], got[pid]["C"]) == (want[pid]["N"], want[pid]["D"], want[pid]["C"])
        assert got[pid]["loss"] == pytest.approx(want[pid]["loss"], rel=1e-6)  # same seed, data and threads
