"""The PADIM fit's hot loop: moments of patch embeddings around a fixed shift, in numpy (torch-free).

stats.GaussianStats merges batches with Chan's formula: two passes over the (P, C, C) co-moment per batch plus a
transpose of the embeddings, which on a CPU cost more than the backbone. Here the shift K (the first batch's
mean, close to the final mean) is fixed, the caller (the frozen network's graph) hands in deviations d = x - K
laid out (B, P, C), and every FOLD_IMAGES images cost one batched product into S2 += d^T d (S1 += sum(d) per
batch). Exact in exact arithmetic: mean = K + S1 / n, M2 = S2 - S1 S1^T / n. Because d is centred near zero,
float32 S2 keeps the covariance close to a float64 pass (tests/test_frozen.py bounds it by 1e-4 relative, with
means 50x the spread): half the bytes per batch of float64. Partials of different shifts combine exactly once
converted to float64 statistics (stats.gaussian_from_moments, GaussianStats.merge_).

Numpy rather than torch so that a Ray node folding its workers' deviations (distributed/node_fit.py) never loads
torch; the in-process fit uses the same class. The product runs POSITION_CHUNK positions at a time into a
small buffer that stays in cache, then adds into S2: as fast as torch's in-place baddbmm_ (measured 23 vs 24 ms
per batch of 8 at P=4096, C=100, one thread).
"""

from __future__ import annotations

import threading

import numpy as np

POSITION_CHUNK = 64  # positions per batched product: a (64, C, C) float32 buffer (2.6 MB at C = 100)
# Deviations are staged and folded this many images at a time: each fold reads and writes all of S2 (164 MB at
# P = 4096, C = 100), so folding the frozen network's 8-image chunks one by one was bound by memory. One thread,
# P = 4096, C = 100: 3.5-5.4 CPU ms per image folding 8 at a time, 1.9 at 16, 1.7-2.0 at 32 (the stage costs
# 16 x P x C float32: 26 MB here).
FOLD_IMAGES = 16
# Positions converted to float64 statistics at a time (moments_to_stats): a (16, C, C) float64 block is 1.3 MB at
# C = 100, so each block is read, corrected and written while in cache.
CONVERT_POSITIONS = 16


class MomentAccumulator:
    """count, shift K (P, C) float32, S1 = sum(d) (P, C) float64 and S2 = sum(d^T d) (P, C, C) float32.

    Deviations wait in a stage of FOLD_IMAGES images before they are folded into S2; reading `s2` (or a
    chunk) folds what is staged first, so readers always see every image counted. Staging and folding
    hold a lock: a Ray node's threaded store actor reads several chunks of one partial at once."""

    def __init__(self, n_positions: int, n_features: int) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None  # set by the first batch
        self.s1 = np.zeros((n_positions, n_features), dtype=np.float64)
        self._s2 = np.zeros((n_positions, n_features, n_features), dtype=np.float32)
        self._buffer = np.empty((min(POSITION_CHUNK, n_positions), n_features, n_features), dtype=np.float32)
        self._stage: np.ndarray | None = None  # (FOLD_IMAGES, P, C), made at the first staged batch
        self._staged = 0
        self._lock = threading.Lock()

    @property
    def s2(self) -> np.ndarray:
        self.flush()
        return self._s2

    def set_shift(self, shift) -> None:
        """Fix the shift (P, C) before the first fold; any value is exact, one near the mean is accurate."""
        if self.count:
            raise ValueError("the shift is fixed once batches have been folded")
        self.shift = np.ascontiguousarray(np.asarray(shift, dtype=np.float32))

    def add_patches(self, patches) -> None:
        """Fold raw embeddings (B, P, C) (numpy, or anything np.asarray takes); the first call sets the shift to
        their mean."""
        patches = np.asarray(patches, dtype=np.float32)
        if self.shift is None:
            self.set_shift(patches.mean(0, dtype=np.float32))
        dev = patches - self.shift
        self.add_deviations(dev, dev.sum(0))

    def add_deviations(self, dev, dev_sum) -> None:
        """Fold deviations from `shift` (B, P, C) and their sum over the batch (P, C). `dev` may be a buffer the
        caller reuses: what is kept for later is a copy."""
        if self.shift is None:
            raise ValueError("the first batch must go through add_patches (it fixes the shift)")
        dev = np.asarray(dev, dtype=np.float32)
        if dev.ndim != 3 or dev.shape[1:] != self.s1.shape:
            p, c = self.s1.shape
            raise ValueError(f"deviations must be (batch, {p}, {c}), got {tuple(dev.shape)}")
        n = int(dev.shape[0])
        with self._lock:
            if self._staged + n > FOLD_IMAGES:
                self._fold_stage()
            if n >= FOLD_IMAGES:
                self._fold(dev)
            else:
                if self._stage is None:
                    self._stage = np.empty((FOLD_IMAGES, *self.s1.shape), dtype=np.float32)
                self._stage[self._staged : self._staged + n] = dev
                self._staged += n
            self.s1 += np.asarray(dev_sum, dtype=np.float64)
            self.count += n

    def flush(self) -> None:
        """Fold the staged deviations into S2."""
        with self._lock:
            self._fold_stage()

    def _fold_stage(self) -> None:
        if self._staged:
            self._fold(self._stage[: self._staged])
            self._staged = 0

    def _fold(self, dev: np.ndarray) -> None:
        # (P, C, B) @ (P, B, C) over strided views of (B, P, C): BLAS reads them in place, no transpose copy.
        left, right = dev.transpose(1, 2, 0), dev.transpose(1, 0, 2)
        for p0 in range(0, self._s2.shape[0], POSITION_CHUNK):
            p1 = min(p0 + POSITION_CHUNK, self._s2.shape[0])
            buf = self._buffer[: p1 - p0]
            np.matmul(left[p0:p1], right[p0:p1], out=buf)
            self._s2[p0:p1] += buf

    def raw_chunk(self, p0: int, p1: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(count, shift, S1, S2) of positions [p0, p1) as accumulated (float32, float64, float32): what a Ray node
        ships, half the bytes of float64 statistics; moments_to_stats turns them into statistics where they land."""
        s2 = self.s2  # folds what is staged
        shift = self.shift if self.shift is not None else np.zeros(self.s1.shape, np.float32)
        return self.count, shift[p0:p1], self.s1[p0:p1], s2[p0:p1]


def moments_to_stats(
    count: int,
    shift: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    dtype=np.float64,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, M2) in `dtype` from moments around `shift`, computed in float64: mean = K + S1 / n,
    M2 = S2 - n (S1 / n)(S1 / n)^T; zeros for an empty partial. `out`: arrays (of `dtype`) to write them into,
    e.g. the caller's accumulator, rather than new ones (fresh memory is paid again at every first touch)."""
    mean, m2 = out if out is not None else (np.empty(s1.shape, dtype), np.empty(s2.shape, dtype))
    if count == 0:
        mean.fill(0)
        m2.fill(0)
        return mean, m2
    offset = np.asarray(s1, dtype=np.float64) / count  # mean - shift
    mean[...] = np.asarray(shift).astype(np.float64) + offset
    block = np.empty((min(CONVERT_POSITIONS, len(offset)), *s2.shape[1:]), np.float64)
    for p0 in range(0, len(offset), CONVERT_POSITIONS):  # a block at a time, in cache: one pass over memory
        p1 = min(p0 + CONVERT_POSITIONS, len(offset))
        part, o = block[: p1 - p0], offset[p0:p1]
        np.multiply(o[:, :, None], o[:, None, :] * -count, out=part)
        part += s2[p0:p1]
        m2[p0:p1] = part
    return mean, m2
