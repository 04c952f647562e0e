"""Helpers of the PADIM fit tests (test_distributed_padim.py, test_cluster_fits.py): the tiny model every fit
there uses, and the relative error its statistics are held to."""

from __future__ import annotations

import numpy as np
import torch

from distributed_anomaly.models.padim import Padim

RTOL = 1e-6  # float64 statistics: Ray fits equal the in-process fit to rounding


def tiny_padim() -> Padim:
    return Padim("resnet18", ["layer1", "layer2"], n_features=20, image_size=64, pretrained=False, seed=0)


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
