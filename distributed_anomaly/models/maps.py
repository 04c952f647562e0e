"""Patch-grid scores to pixel maps: bilinear upsampling then a Gaussian blur (PADIM and PatchCore, sigma = 4).

Both steps are linear and separable, so together they are one matrix per axis: out = A_h @ m @ A_w^T with
A_h (H, h) and A_w (W, w). Two small dense matmuls replace an interpolation and two 33-tap single-channel
convolutions, which vectorise poorly: 8 maps of 64 x 64 to 256 x 256 took 28.6 ms in torch and 5.8 ms in
OpenVINO as interpolate + blur, 0.46 ms and 1.1 ms as the two matmuls (2 threads, one run), equal to 5e-7
relative (tests/test_models.py compares the two paths, reflect and replicate padding, square or not).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

BLUR_SIGMA = 4.0


def _kernel(sigma: float, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """Radius and normalised 1-D Gaussian kernel (2 * int(4 * sigma + 0.5) + 1 taps)."""
    radius = int(4.0 * sigma + 0.5)
    coords = torch.arange(-radius, radius + 1, dtype=dtype)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return radius, kernel / kernel.sum()


def _pad_mode(height: int, width: int, radius: int) -> str:
    """The blur's padding: reflect needs pad < size on both axes; tiny maps fall back to replicate (on both)."""
    return "reflect" if min(height, width) - 1 >= radius else "replicate"


@functools.lru_cache(maxsize=32)
def _axis_operator(n_in: int, n_out: int, mode: str, sigma: float) -> np.ndarray:
    """(n_out, n_in) float64 matrix of one axis: linear interpolation (align_corners=False) then the blur.

    Built in numpy, outside torch: a model's cost (models.cost counts torch's operations) must not depend on
    whether this cache was warm."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)  # torch's source coordinates
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    frac = src - lo
    upsample = np.zeros((n_out, n_in))
    np.add.at(upsample, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(upsample, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), frac)
    radius, kernel = _kernel(sigma, torch.float64)
    taps = np.arange(n_out)[:, None] + np.arange(-radius, radius + 1)[None, :]  # (n_out, 2r + 1) sources
    if mode == "reflect":
        taps = np.abs(taps)
        taps = np.where(taps > n_out - 1, 2 * (n_out - 1) - taps, taps)
    else:
        taps = np.clip(taps, 0, n_out - 1)
    blur = np.zeros((n_out, n_out))
    np.add.at(blur, (np.repeat(np.arange(n_out), taps.shape[1]), taps.ravel()), np.tile(kernel.numpy(), n_out))
    return blur @ upsample


def upsample_blur_operators(
    grid: Sequence[int], size: Sequence[int], sigma: float = BLUR_SIGMA
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_h, A_w^T) float32: A_h @ m @ A_w^T is the blurred bilinear upsampling of an (h, w) map m to `size`."""
    (h, w), (height, width) = (int(g) for g in grid), (int(s) for s in size)
    radius, _ = _kernel(sigma, torch.float64)
    mode = _pad_mode(height, width, radius)
    rows = torch.from_numpy(_axis_operator(h, height, mode, sigma).astype(np.float32))
    cols = torch.from_numpy(np.ascontiguousarray(_axis_operator(w, width, mode, sigma).T, dtype=np.float32))
    return rows, cols


def upsample_blur(maps: torch.Tensor, size: Sequence[int], sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """(B, 1, h, w) patch-grid maps -> (B, 1, H, W) at `size`: bilinear upsampling (align_corners=False), then
    a separable Gaussian blur (kernel 2 * int(4 * sigma + 0.5) + 1 taps; reflect padding, replicate for maps
    smaller than the kernel's radius)."""
    rows, cols = upsample_blur_operators(maps.shape[-2:], size, sigma)
    rows, cols = rows.to(maps.dtype), cols.to(maps.dtype)
    return torch.matmul(torch.matmul(rows, maps), cols)
