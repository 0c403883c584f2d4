"""Shared fixtures: quiet Ray/DeepSpeed, a real S3 API (moto server on 127.0.0.1), bundled real photos."""

from __future__ import annotations

import os
import uuid

import pytest

from jpeglm.devtools.processes import free_port

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread per process: tests run several processes (torchrun ranks, Ray workers) on 2 shared cores, where
# 2 threads each oversubscribe the CPU and stall steps by up to 50x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "torch_extensions"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 for the whole session; AWS_* env points every client (s3fs, boto3,
    subprocesses, Ray workers started afterwards) at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket; yields its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture
def s3_proxy(s3_endpoint, monkeypatch):
    """The loopback delay/fault proxy (jpeglm/devtools/s3proxy.py) in front of the moto server, with this process's
    S3 client pointed at it; no delay and no faults until a test sets `delay_s` / `fault_fraction`."""
    from jpeglm.devtools.s3proxy import S3Proxy
    from pipeline import storage

    with S3Proxy(s3_endpoint, seed=1234) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        storage.reset_s3()
        try:
            yield proxy
        finally:
            storage.reset_s3()  # back to the plain endpoint once monkeypatch restores it


@pytest.fixture(scope="session")
def photo_names():
    from pipeline.sample_images import photo_names as names

    return names()


@pytest.fixture(scope="session")
def sample_image_dir(tmp_path_factory):
    """60 derived web-like real photos (JPEG/PNG, 0.1-1 MP), shared read-only by the session."""
    from pipeline.sample_images import write_sample_images

    d = tmp_path_factory.mktemp("sample-images")
    write_sample_images(str(d), 60)
    return d


@pytest.fixture(scope="session")
def two_node_ray(s3_endpoint, tmp_path_factory):
    """A real Ray cluster of two nodes on 127.0.0.1 for the session (jpeglm/devtools/local_cluster.py), 1 CPU each.
    `two_node_ray.hidden[0]` is a folder the worker node sees empty (a tmpfs over it in its own mount namespace):
    put a path there to make it local to the head node. Connect with ray.init(address=two_node_ray.address) (and
    ray.shutdown() after) or run a command with env=two_node_ray.env(). The nodes inherit this process's
    environment (PYTHONPATH, the moto AWS_* settings). Skipped where no mount namespace can be made."""
    from jpeglm.devtools.local_cluster import can_hide_paths, two_node_cluster

    why = can_hide_paths()
    if why:
        pytest.skip(f"two-node Ray cluster: {why}")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the nodes run without token auth; the driver must agree
    try:
        with two_node_cluster(hidden=[tmp_path_factory.mktemp("node-local")]) as cluster:
            yield cluster
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (sampling tests use it): small models gain nothing from a second thread, and
    on a busy 2-core machine OpenMP barriers between two threads stalled decoding steps by up to 50x
    (bench/bench_sample.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
