"""Shared fixtures.

``s3_endpoint``: a live local S3 endpoint for the storage tests, moto's server mode on 127.0.0.1 (the way s3fs
tests itself), with the buckets "prime-data" and "prime-ckpt". s3fs, and every subprocess a test starts, reaches
it through AWS_ENDPOINT_URL and dummy credentials.

``one_rank_group``: a one-rank process group (gloo, CPU) in this process, for tests that build DeepSpeed engines
in-process (prime_scale.run_context.RunContext: the rendezvous variables are set for the module only, and the group
is destroyed afterwards, with DeepSpeed's cached copy of it).

``markov_shards``: the tiny config's Markov source as shards (made once per test run, in this process; small shards,
so that two ranks each get many). Tests only read it.

``text_shards``: real prose (the first 30 documents of Python's library docs) prepared by the text data prep (vocab
512, SentencePiece, seq_len 64, concat packing), once per test run. Tests only read it.

``world``: ``text_shards`` as "data" and exports of untrained (randomly perturbed) networks on its tokenizer, made
without DeepSpeed: "prime" (l = 2), "ar" and "genmd4" (l = 1, time-conditioned). For tests of what reads an export
(evaluation, zero-shot, the harness), where the weights need not be trained. Tests only read them.

``trained_text_exports``: "prime" (l = 2) and "ar" trained 6 steps on ``text_shards`` by the DeepSpeed engine (one
rank, in this process) and exported, once per test run. Tests only read them.

``imagenet32_shards``: a small ImageNet-layout folder of generated JPEGs, prepared by the image data prep into
32x32 pixel shards (40 train and 12 val images of two classes, several shards per split).
"""

from __future__ import annotations

import pytest

@pytest.fixture
def s3_endpoint(monkeypatch):
    """Start the server, point the AWS variables at it (monkeypatch restores them)."""
    from helpers import moto_endpoint

    with moto_endpoint() as (endpoint, aws):
        for key, value in aws.items():
            monkeypatch.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def one_rank_group():
    from prime_scale.run_context import RunContext

    with RunContext("cpu"):  # made for the module, then destroyed with DeepSpeed's copy of it
        yield


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


@pytest.fixture(scope="session")
def markov_shards(tmp_path_factory):
    from data_prep.synthetic import prepare_markov
    from prime_scale.config import load_config

    path = tmp_path_factory.mktemp("markov") / "data"
    prepare_markov(load_config(["config=tiny", f"data.path={path}", "data.shard_size_mb=0.01"]))
    return path


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory):
    from helpers import prepare_text
    from py_docs import py_docs

    return prepare_text(tmp_path_factory.mktemp("text"), "data", py_docs("library", 30))


@pytest.fixture(scope="session")
def world(tmp_path_factory, text_shards):
    from helpers import fake_export

    tmp = tmp_path_factory.mktemp("untrained")
    return {"data": text_shards,
            "prime": fake_export(tmp / "prime", text_shards, "prime.num_subtokens=2"),
            "ar": fake_export(tmp / "ar", text_shards, "model.objective=ar", "prime.num_subtokens=1", seed=1),
            "genmd4": fake_export(tmp / "genmd4", text_shards, "prime.num_subtokens=1", "diffusion.schedule=genmd4",
                                  "diffusion.eval_estimator=continuous", "model.time_conditioning=true", seed=2)}


@pytest.fixture(scope="session")
def trained_text_exports(tmp_path_factory, text_shards):
    from helpers import export_cli, train

    root = tmp_path_factory.mktemp("trained_text")
    text = ["data.vocab_size=512", "data.seq_len=64"]
    out = {}
    for name, extra in (("prime", []), ("ar", ["model.objective=ar", "prime.num_subtokens=1"])):
        export_cli(train(text_shards, root / name, *text, *extra), root / f"export_{name}")
        out[name] = root / f"export_{name}"
    return out
