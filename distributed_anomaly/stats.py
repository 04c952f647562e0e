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

from distributed_anomaly.moments import MomentAccumulator, moments_to_stats

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


def gaussian_from_moments(acc: MomentAccumulator, dtype: torch.dtype = torch.float64) -> GaussianStats:
    """All positions of a moments.MomentAccumulator as GaussianStats in `dtype`, converted in place into the
    result's own memory (moments_to_stats works a cache-sized block at a time: no second copy of the co-moment)."""
    n_pos, c = acc.s1.shape
    out = GaussianStats.empty(n_pos, c, dtype)
    moments_to_stats(*acc.raw_chunk(0, n_pos), out=(out.mean.numpy(), out.m2.numpy()))
    out.count = acc.count
    return out


def accumulation_dtype(n_positions: int, n_features: int, budget_bytes: int = 4 << 30) -> torch.dtype:
    """float64 unless the co-moment tensor would exceed the budget; then float32 (safe around the running mean)."""
    return torch.float64 if n_positions * n_features * n_features * 8 <= budget_bytes else torch.float32
