"""runner: the torch-free map resize against torch's bilinear interpolate (the reference it replaced)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed_anomaly.runner import resize_map


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((64, 64), (128, 128)),  # enlarged: Pillow's resampler
        ((64, 128), (100, 333)),  # enlarged by uneven factors
        ((256, 256), (1200, 1600)),  # a photo
        ((256, 256), (128, 128)),  # shrunk: torch's formula in numpy (Pillow would antialias)
        ((64, 64), (40, 200)),  # shrunk on one axis, enlarged on the other
        ((7, 5), (3, 2)),
    ],
)
def test_resize_map_is_torch_bilinear(src: tuple[int, int], dst: tuple[int, int]) -> None:
    raw = np.random.default_rng(0).gamma(2.0, 3.0, size=src).astype(np.float32)
    want = F.interpolate(torch.from_numpy(raw)[None, None], size=dst, mode="bilinear", align_corners=False)[0, 0]
    got = resize_map(raw, dst)
    assert got.shape == dst and got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=2e-5 * float(raw.max()))


def test_resize_map_keeps_a_map_of_the_right_size() -> None:
    raw = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert resize_map(raw, (3, 4)) is raw
