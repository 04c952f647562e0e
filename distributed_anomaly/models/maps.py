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


def _kernel(sigma: float) -> tuple[int, np.ndarray]:
    """Radius and normalised 1-D Gaussian kernel (2 * int(4 * sigma + 0.5) + 1 taps), float64."""
    radius = int(4.0 * sigma + 0.5)
    kernel = np.exp(-(np.arange(-radius, radius + 1, dtype=np.float64) ** 2) / (2 * sigma**2))
    return radius, kernel / kernel.sum()


def _pad_mode(height: int, width: int, radius: int) -> str:
    """The blur's padding: reflect needs pad < size on both axes; tiny maps fall back to replicate (on both)."""
    return "reflect" if min(height, width) - 1 >= radius else "replicate"


def _axis_operator(n_in: int, n_out: int, mode: str, sigma: float) -> np.ndarray:
    """(n_out, n_in) float64 matrix of one axis: linear interpolation (align_corners=False) then the blur.

    Built in numpy, outside torch: a model's cost (models.cost counts torch's matrix products) must not depend on
    whether the operators' cache was warm."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)  # torch's source coordinates
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    frac = src - lo
    upsample = np.zeros((n_out, n_in))
    np.add.at(upsample, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(upsample, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), frac)
    radius, kernel = _kernel(sigma)
    taps = np.arange(n_out)[:, None] + np.arange(-radius, radius + 1)[None, :]  # (n_out, 2r + 1) sources
    if mode == "reflect":
        taps = np.abs(taps)
        taps = np.where(taps > n_out - 1, 2 * (n_out - 1) - taps, taps)
    else:
        taps = np.clip(taps, 0, n_out - 1)
    blur = np.zeros((n_out, n_out))
    np.add.at(blur, (np.repeat(np.arange(n_out), taps.shape[1]), taps.ravel()), np.tile(kernel, n_out))
    return blur @ upsample


@functools.lru_cache(maxsize=32)
def _operators(grid: tuple[int, int], size: tuple[int, int], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(A_h, A_w^T) float32 for (h, w) -> `size`, built once per shape (treated as read-only by the callers).
    Numpy arrays, not tensors: a tensor made inside torch.inference_mode could not be reused outside it."""
    (h, w), (height, width) = grid, size
    mode = _pad_mode(height, width, _kernel(sigma)[0])
    rows = _axis_operator(h, height, mode, sigma).astype(np.float32)
    cols = np.ascontiguousarray(_axis_operator(w, width, mode, sigma).T, dtype=np.float32)
    return rows, cols


def upsample_blur(maps: torch.Tensor, size: Sequence[int], sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """(B, 1, h, w) patch-grid maps -> (B, 1, H, W) at `size`: A_h @ m @ A_w^T, bilinear upsampling
    (align_corners=False) then a separable Gaussian blur (kernel 2 * int(4 * sigma + 0.5) + 1 taps; reflect
    padding, replicate for maps smaller than the kernel's radius)."""
    grid, size = tuple(int(g) for g in maps.shape[-2:]), tuple(int(n) for n in size)
    rows, cols = (torch.from_numpy(a).to(maps.dtype) for a in _operators(grid, size, float(sigma)))
    return torch.matmul(torch.matmul(rows, maps), cols)
