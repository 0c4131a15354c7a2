"""Shared fixtures. ``s3_endpoint``: a live local S3 endpoint for the storage tests, moto's server mode on
127.0.0.1 (the way s3fs tests itself), with the buckets "prime-data" and "prime-ckpt". s3fs, and every
subprocess a test starts, reaches it through AWS_ENDPOINT_URL and dummy credentials.
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
