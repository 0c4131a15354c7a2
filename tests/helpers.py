"""Plain helpers that several test modules share (fixtures live in tests/conftest.py). Imported as ``from helpers
import ...``, the way tests/slurm_helpers.py is: pytest puts the tests folder on sys.path.

- ``fresh_env``: the environment of a child process that must make a process group of its own.
- ``train`` (``train_args``) / ``export_cli``: a tiny model trained for a few steps through the DeepSpeed engine (one
  rank, in this process), and ``python -m prime_scale.export``'s main on its checkpoints.
- ``torchrun``: the command line of a torchrun launch on a random port.
- ``prepare_text`` / ``fake_export``: text shards made by the text data prep, and what the export writes for an
  untrained network (no DeepSpeed).
- ``moto_endpoint``: a live local S3 endpoint with the buckets the tests use.
- ``oracle_denoiser`` / ``mean_and_se``: the exact denoiser of an i.i.d. source, and a sample's mean and its
  standard error (the NELBO tests).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import torch

from prime_scale.run_context import RENDEZVOUS_VARIABLES

REPO = Path(__file__).resolve().parent.parent


def fresh_env(**extra: str) -> dict[str, str]:
    """This process's environment without rendezvous variables (a launched run makes a process group of its own),
    with ``extra`` set (e.g. OMP_NUM_THREADS="1")."""
    return {**{k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}, **extra}


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """``train``'s arguments of ``python -m prime_scale.engine``."""
    return ["config=tiny", "data.source=shards", f"data.path={data}", f"run.out_dir={out}", "train.steps=6",
            "train.warmup_steps=2", "train.eval_every=1000", "ckpt.every_minutes=0", "log.wandb=disabled", *extra]


def train(data: Path, out: Path, *extra: str) -> Path:
    """The tiny config trained for 6 steps on the shards at ``data`` by one rank in this process (``engine.main``
    leaves it as it found it); returns its run folder."""
    from prime_scale import engine

    assert engine.main(train_args(data, out, *extra)) == 0
    return out / "tiny"


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command line of ``torchrun --nproc_per_node NPROC ARGS`` on a random port (ARGS: a script and its
    arguments, or ``-m MODULE ...``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(random.randint(20000, 40000)), *args]


def export_cli(run_dir: Path, out: Path) -> dict:
    """``python -m prime_scale.export ckpt=RUN/checkpoints out=OUT``'s main, in this process; returns the export's
    info (export.json, which the command prints)."""
    from prime_scale.export import main

    assert main([f"ckpt={run_dir / 'checkpoints'}", f"out={out}"]) == 0
    return json.loads((out / "export.json").read_text())


def prepare_text(tmp: Path, name: str, files: list[Path], *overrides: str) -> Path:
    """Prepared text shards (vocab 512, seq_len 64, SentencePiece trained on ``files``) at ``tmp/name``."""
    from data_prep.batch import run_job
    from data_prep.text import TextJob
    from prime_scale.config import load_config

    docs = tmp / f"{name}_docs"
    docs.mkdir()
    for f in files:
        shutil.copy(f, docs / f.name)
    data = tmp / name
    run_job(TextJob(load_config([
        "config=tiny", f"data.path={data}", f"prep.input={docs}", "data.vocab_size=512", "data.seq_len=64",
        "data.shard_size_mb=0.05", "prep.unit_mb=0.05", "prep.val_fraction=0.1", "prep.tokenizer_sentences=4000",
        *overrides])), progress=False)
    return data


def fake_export(folder: Path, data: Path, *overrides: str, seed: int = 0) -> Path:
    """What python -m prime_scale.export writes, for an untrained (randomly perturbed) network: no DeepSpeed."""
    from safetensors.torch import save_file

    from prime_scale.config import load_config, save_config
    from prime_scale.model import PrimeTransformer

    cfg = load_config(["config=tiny", "data.source=shards", f"data.path={data}", "data.vocab_size=512",
                       "data.seq_len=64", *overrides])
    torch.manual_seed(seed)
    model = PrimeTransformer.from_config(cfg)
    with torch.no_grad():  # the zero-initialised output layers would make every prediction uniform
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    save_config(cfg, folder / "config.yaml")
    shutil.copy(data / "manifest.json", folder / "dataset.json")
    shutil.copy(data / "tokenizer.model", folder / "tokenizer.model")
    (folder / "export.json").write_text(json.dumps({"step": 0, "weights": "trained"}))
    return folder


BUCKETS = ("prime-data", "prime-ckpt")


@contextlib.contextmanager
def moto_endpoint():
    """moto's S3 server mode on 127.0.0.1 (the way s3fs tests itself) with the buckets "prime-data" and
    "prime-ckpt", for the life of the block: yields (endpoint URL, the AWS_* variables that point s3fs and every
    child process at it, with dummy credentials)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="us-east-1")
        for bucket in BUCKETS:
            client.create_bucket(Bucket=bucket)
        yield endpoint, aws
    finally:
        server.stop()


def oracle_denoiser(pi, N):
    """The exact posterior of an i.i.d. source: pi at every position; carry-over restricts it to the values
    consistent with the observed digits."""
    logits = pi.log().float()

    def denoise(noisy, mask_rate):
        B = noisy.shape[0]
        return logits.expand(B, N, -1)

    return denoise


def mean_and_se(x):
    return x.mean().item(), x.std().item() / math.sqrt(len(x))
