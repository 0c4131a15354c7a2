"""The bf16 matrix, run by tests/test_bf16.py under torchrun: every model family x ZeRO {0, 2, 3} trains 2 steps in
bf16 on CPU, saves, resumes for a third step and exports; then Prime (l = 2, time-conditioned) trains the same
steps in fp32 and in bf16 under ZeRO-2 so the test can compare them. One process per rank for all of it: DeepSpeed
is set up once per run, not once per process (engine.train can be called again in the same process group).

    torchrun --nproc_per_node 2 tests/bf16_matrix.py MARKOV32 MARKOV48 OUT RESULT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from prime_scale import engine
from prime_scale.config import load_config
from prime_scale.data.shards import read_token_shards
from prime_scale.metrics import step_records
from prime_scale.run_paths import RunPaths

FAMILIES = {
    "mdm": ["prime.num_subtokens=1"],
    "prime2": ["prime.num_subtokens=2"],
    "prime4": ["prime.num_subtokens=4"],
    "genmd4": ["prime.num_subtokens=1", "diffusion.schedule=genmd4", "diffusion.eval_estimator=continuous",
               "model.time_conditioning=true"],
    "ar": ["model.objective=ar", "prime.num_subtokens=1"],
    "pixels": ["model.tokens_per_position=3", "data.seq_len=48", "prime.num_subtokens=2"],  # P = 3 channels
}
STAGES = (0, 2, 3)
COMPARE_STEPS = 40


def overrides(data: str, out: Path, name: str, *extra: str) -> list[str]:
    return ["config=tiny", "data.source=shards", f"data.path={data}", f"run.out_dir={out}", f"run.name={name}",
            "log.wandb=disabled", "ckpt.every_minutes=0", "train.log_every=1", "train.eval_every=100000",
            "train.warmup_steps=1", "engine.ema_decay=0.9", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in step_records(run_dir).items()}


def final_val(run_dir: Path) -> tuple[float, float]:
    """(NELBO, its standard error) of the run's last evaluation."""
    last = RunPaths(run_dir).validation_records()[-1]
    return last["val/nelbo_per_token"], last["val/stderr"]


def exported(run_dir: Path) -> dict:
    """Rank 0 exports the run and scores the fp32 export with the evaluation the engine ran (same seed)."""
    from prime_scale.evaluate import evaluate_nelbo
    from prime_scale.export import export, from_pretrained

    folder = export(str(run_dir / "checkpoints"), str(run_dir / "export"))
    pre = from_pretrained(str(folder))
    val = torch.from_numpy(read_token_shards(pre.config.data.path, "val")).long()
    result = evaluate_nelbo(pre.model, val, pre.config, seed=pre.config.train.seed)
    return {"dtypes": sorted({str(v.dtype) for v in pre.model.state_dict().values() if v.is_floating_point()}),
            "weights": pre.info["weights"], "step": pre.info["step"], "val_nelbo": result.nelbo_per_token}


def main(markov32: str, markov48: str, out: str, result_path: str) -> None:
    out_dir, results = Path(out), {}
    for stage in STAGES:
        for family, extra in FAMILIES.items():
            data = markov48 if family == "pixels" else markov32
            name = f"z{stage}_{family}"
            args = overrides(data, out_dir, name, f"engine.zero_stage={stage}", "train.dtype=bfloat16", *extra)
            first = engine.train(load_config([*args, "train.steps=2"]))
            second = engine.train(load_config([*args, "train.steps=3"]))
            run_dir = out_dir / name
            record = {"exit": [first["exit_code"], second["exit_code"]], "steps": [first["step"], second["step"]]}
            if dist.get_rank() == 0:
                record |= {"losses": losses(run_dir), "engine_val": final_val(run_dir), "export": exported(run_dir)}
                if stage < 3:  # ZeRO-3 keeps no whole weights in the module states file
                    states = torch.load(run_dir / "checkpoints/step_00000003/mp_rank_00_model_states.pt",
                                        map_location="cpu", weights_only=False)["module"]
                    record["saved_dtypes"] = sorted({str(v.dtype) for v in states.values() if v.is_floating_point()})
            results[name] = record
            dist.barrier()
    for dtype in ("float32", "bfloat16"):  # the same run in both precisions
        name = f"compare_{dtype}"
        summary = engine.train(load_config(overrides(markov32, out_dir, name, "engine.zero_stage=2", f"train.dtype={dtype}",
                                                     "model.time_conditioning=true", "engine.ema_decay=0",
                                                     f"train.steps={COMPARE_STEPS}")))
        if dist.get_rank() == 0:
            results[name] = {"exit": [summary["exit_code"]], "losses": losses(out_dir / name),
                             "engine_val": final_val(out_dir / name)}
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
