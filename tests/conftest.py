"""Shared fixtures.

``s3_endpoint``: a live local S3 endpoint for the storage tests, moto's server mode on 127.0.0.1 (the way s3fs
tests itself), with the buckets "prime-data" and "prime-ckpt". s3fs, and every subprocess a test starts, reaches
it through AWS_ENDPOINT_URL and dummy credentials.

``one_rank_group``: a one-rank process group (gloo, CPU) in this process, for tests that build DeepSpeed engines
in-process: the rendezvous variables are set for the module only and the group is destroyed afterwards.

``imagenet32_shards``: a small ImageNet-layout folder of generated JPEGs, prepared by the image data prep into
32x32 pixel shards (40 train and 12 val images of two classes, several shards per split).
"""

from __future__ import annotations

import pytest

BUCKETS = ("prime-data", "prime-ckpt")


@pytest.fixture
def s3_endpoint(monkeypatch):
    """Start the server, create the buckets, point the AWS variables at it (monkeypatch restores them)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import boto3

    for bucket in BUCKETS:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def one_rank_group():
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}.items():
            mp.setenv(key, value)
        yield
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture
def imagenet32_shards(tmp_path):
    import numpy as np
    from PIL import Image

    from data_prep.batch import run_job
    from data_prep.images import ImageJob
    from prime_scale.config import load_config

    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("val", 12)):
        for c, wnid in enumerate(("n01440764", "n01443537")):
            folder = tmp_path / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(count // 2):  # smooth images of a class colour: a learnable pixel distribution
                ramp = np.linspace(0, 1, 40)[None, :, None] * np.array([60, 90, 120])[None, None]
                pixels = np.clip(ramp + np.array([[[100 + 80 * c, 60, 200 - 80 * c]]]) + rng.normal(0, 8, (36, 40, 3)),
                                 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=95)
    data = tmp_path / "shards"
    manifest = run_job(ImageJob(load_config(["config=imagenet32", f"prep.input={tmp_path / 'imagenet'}",
                                             f"data.path={data}", "prep.image_size=32", "data.shard_size_mb=0.02"])),
                       progress=False)
    assert manifest["splits"]["train"]["images"] == 40 and len(manifest["splits"]["train"]["shards"]) >= 2
    return data
