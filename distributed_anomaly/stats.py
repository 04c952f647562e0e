"""Mergeable sufficient statistics of one multivariate Gaussian per patch position.

PADIM needs, for each of P patch positions, the mean and covariance of a C-dimensional embedding over all
normal images. Instead of holding every embedding (anomalib's approach, linear in the dataset), we keep
(count, mean, M2) per position, where M2 is the sum of outer products of deviations from the running mean.
Batches are folded in, and partial results merged, with the parallel update of Chan, Golub & LeVeque (1979):

    n = n_a + n_b,   d = mean_b - mean_a,
    mean = mean_a + d * n_b / n,
    M2 = M2_a + M2_b + (d d^T) * n_a n_b / n.

The update is exact in exact arithmetic and associative, so any sharding of the images across workers, in
any merge order, gives the same Gaussian as one pass. Accumulating around the running mean (not raw sums of
squares) keeps float32 usable where float64 would not fit (wide_resnet50_2/550 at 256 px: P=4096, C=550).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Regularisation added to every covariance (PADIM paper, Sec. 3: Sigma + eps I with eps = 0.01).
COVARIANCE_EPS = 0.01


@dataclass
class GaussianStats:
    """count, mean (P, C) and co-moment M2 (P, C, C) of embeddings seen so far."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, n_positions: int, n_features: int, dtype: torch.dtype = torch.float64) -> GaussianStats:
        return cls(
            0,
            torch.zeros(n_positions, n_features, dtype=dtype),
            torch.zeros(n_positions, n_features, n_features, dtype=dtype),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    @classmethod
    def from_batch(cls, embeddings: torch.Tensor, dtype: torch.dtype = torch.float64) -> GaussianStats:
        """Statistics of a batch of embeddings shaped (B, C, P)."""
        if embeddings.ndim != 3:
            raise ValueError(f"embeddings must be (batch, channels, positions), got {tuple(embeddings.shape)}")
        x = embeddings.to(dtype).permute(2, 0, 1)  # (P, B, C)
        mean = x.mean(dim=1)
        dev = x - mean[:, None, :]
        m2 = torch.bmm(dev.transpose(1, 2), dev)  # (P, C, C)
        return cls(int(embeddings.shape[0]), mean, m2)

    def update(self, embeddings: torch.Tensor) -> GaussianStats:
        """Fold a batch (B, C, P) into these statistics in place; returns self."""
        return self.merge_(GaussianStats.from_batch(embeddings, self.dtype))

    def merge_(self, other: GaussianStats) -> GaussianStats:
        """In-place Chan merge of `other` into self (other is left unchanged)."""
        if other.count == 0:
            return self
        if self.mean.shape != other.mean.shape:
            raise ValueError(
                f"cannot merge statistics of shapes {tuple(self.mean.shape)} and {tuple(other.mean.shape)}"
            )
        if self.count == 0:  # in place, so a view of a larger accumulator (padim_fit's chunked merge) stays one
            self.count = other.count
            self.mean.copy_(other.mean)
            self.m2.copy_(other.m2)
            return self
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other.mean.to(self.dtype) - self.mean  # (P, C)
        self.mean.add_(delta, alpha=n_b / n)
        self.m2.add_(other.m2.to(self.dtype))
        self.m2.baddbmm_(delta[:, :, None], delta[:, None, :], alpha=n_a * n_b / n)
        self.count = n
        return self

    def merge(self, other: GaussianStats) -> GaussianStats:
        """A new object holding the merge of self and other; neither input changes."""
        out = GaussianStats(self.count, self.mean.clone(), self.m2.clone())
        return out.merge_(other)

    def covariance(self) -> torch.Tensor:
        """Unbiased sample covariance (P, C, C), as numpy.cov/anomalib compute it."""
        if self.count < 2:
            raise ValueError(f"need at least 2 images to estimate a covariance, got {self.count}")
        return self.m2 / (self.count - 1)

    def finalize(self, eps: float = COVARIANCE_EPS, chunk_positions: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (P, C) and inverse regularised covariance (P, C, C), both float32, for scoring."""
        mean, inv, _ = self.finalize_whitened(eps, chunk_positions)
        return mean, inv

    def finalize_whitened(
        self, eps: float = COVARIANCE_EPS, chunk_positions: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean (P, C), Sigma^-1 (P, C, C) and W = L^-1 (P, C, C, lower triangular, Sigma = L L^T, so that
        Sigma^-1 = W^T W: the factor PADIM's head scores with), all float32, from one Cholesky per position.

        Done `chunk_positions` patch positions at a time: the float64 temporaries (covariance, Cholesky
        factor, inverse) then cost a chunk each instead of several full (P, C, C) tensors, so the peak is
        the accumulator plus the float32 results (resnet18/100 at 256 px: 0.33 GB float64 per full tensor).
        """
        if self.count < 2:
            raise ValueError(f"need at least 2 images to estimate a covariance, got {self.count}")
        n_pos, c = self.mean.shape
        inv = torch.empty(n_pos, c, c, dtype=torch.float32)
        white = torch.empty(n_pos, c, c, dtype=torch.float32)
        eye = torch.eye(c, dtype=torch.float64)
        for i in range(0, n_pos, chunk_positions):
            cov = self.m2[i : i + chunk_positions].to(torch.float64) / (self.count - 1) + eps * eye
            # Cholesky, then a triangular inverse: faster and more stable than a general inverse.
            w = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), eye, upper=False)
            white[i : i + chunk_positions] = w
            inv[i : i + chunk_positions] = w.transpose(1, 2) @ w
        return self.mean.to(torch.float32), inv, white

    def to_state(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor(self.count, dtype=torch.int64), "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> GaussianStats:
        return cls(int(state["count"]), state["mean"], state["m2"])


class MomentAccumulator:
    """The fit's hot loop: moments of patch embeddings around a fixed shift, one in-place product per batch.

    GaussianStats.update merges every batch with Chan's formula: two passes over the (P, C, C) co-moment per
    batch plus a transpose of the embeddings, which on a CPU cost more than the backbone. Here the shift K (the
    first batch's mean, close to the final mean) is fixed, the caller (the frozen network's graph) hands in
    deviations d = x - K laid out (B, P, C), and each batch costs one batched product into
    S2 += d^T d and a sum S1 += sum(d). Exact in exact arithmetic: mean = K + S1 / n, M2 = S2 - S1 S1^T / n.
    Because d is centred near zero, float32 S2 keeps the covariance close to a float64 pass (tests/test_frozen.py
    bounds it by 1e-4 relative, with means 50x the spread): half the bytes per batch of float64. Partials of different
    shifts combine exactly through `to_stats` and GaussianStats.merge_.
    """

    def __init__(self, n_positions: int, n_features: int, dtype: torch.dtype = torch.float32) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None  # (P, C) float32, set by the first batch
        self.s1 = torch.zeros(n_positions, n_features, dtype=torch.float64)
        self.s2 = torch.zeros(n_positions, n_features, n_features, dtype=dtype)

    def set_shift(self, shift: torch.Tensor) -> None:
        """Fix the shift (P, C) before the first fold; any value is exact, one near the mean is accurate."""
        if self.count:
            raise ValueError("the shift is fixed once batches have been folded")
        self.shift = shift.to(torch.float32).contiguous()

    def add_patches(self, patches: torch.Tensor) -> None:
        """Fold raw embeddings (B, P, C); the first call sets the shift to their mean."""
        if self.shift is None:
            self.set_shift(patches.mean(0, dtype=torch.float32))
        dev = patches.float() - self.shift
        self.add_deviations(dev, dev.sum(0))

    def add_deviations(self, dev: torch.Tensor, dev_sum: torch.Tensor) -> None:
        """Fold deviations from `shift` (B, P, C) and their sum over the batch (P, C)."""
        if self.shift is None:
            raise ValueError("the first batch must go through add_patches (it fixes the shift)")
        if dev.ndim != 3 or dev.shape[1:] != self.s1.shape:
            p, c = self.s1.shape
            raise ValueError(f"deviations must be (batch, {p}, {c}), got {tuple(dev.shape)}")
        dev = dev.to(self.s2.dtype)
        # (P, C, B) @ (P, B, C) over strided views of (B, P, C): BLAS reads them in place, no transpose copy.
        self.s2.baddbmm_(dev.permute(1, 2, 0), dev.permute(1, 0, 2))
        self.s1.add_(dev_sum.to(torch.float64))
        self.count += int(dev.shape[0])

    def stats_chunk(self, p0: int, p1: int, dtype: torch.dtype = torch.float64) -> GaussianStats:
        """GaussianStats of positions [p0, p1) (the Ray fit ships a partial in such chunks)."""
        if self.count == 0 or self.shift is None:
            return GaussianStats.empty(p1 - p0, self.s1.shape[1], dtype)
        offset = self.s1[p0:p1] / self.count  # mean - shift, float64
        m2 = self.s2[p0:p1].to(torch.float64)
        m2.baddbmm_(offset[:, :, None], offset[:, None, :], alpha=-self.count)
        mean = self.shift[p0:p1].to(torch.float64) + offset
        return GaussianStats(self.count, mean.to(dtype), m2.to(dtype))

    def to_stats(self, dtype: torch.dtype = torch.float64, chunk_positions: int = 512) -> GaussianStats:
        """All positions as GaussianStats in `dtype`, converted a chunk at a time (no second float64 copy)."""
        n_pos, c = self.s1.shape
        out = GaussianStats.empty(n_pos, c, dtype)
        for p0 in range(0, n_pos, chunk_positions):
            part = self.stats_chunk(p0, min(p0 + chunk_positions, n_pos), dtype)
            out.mean[p0 : p0 + chunk_positions] = part.mean
            out.m2[p0 : p0 + chunk_positions] = part.m2
        out.count = self.count
        return out


def accumulation_dtype(n_positions: int, n_features: int, budget_bytes: int = 4 << 30) -> torch.dtype:
    """float64 unless the co-moment tensor would exceed the budget; then float32 (safe around the running mean)."""
    return torch.float64 if n_positions * n_features * n_features * 8 <= budget_bytes else torch.float32
