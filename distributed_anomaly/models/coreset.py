"""PatchCore's memory bank: greedy k-center coreset selection, exact and streaming, pure torch.

Greedy k-center (Gonzalez 1985; PatchCore Alg. 1): start from one point, repeatedly add the point farthest
from the points chosen so far. Each step is one matrix-vector product over the candidates' running minimum
distances (`greedy_coreset`), so the loop's cost is N x d memory traffic per step and nothing else. As in the
paper, distances are computed on a seeded random projection of the embeddings to 128 dimensions
(Johnson-Lindenstrauss); the bank keeps the full embeddings.

Streaming (`StreamingCoreset`): embeddings arrive a batch at a time; every CHUNK_PATCHES of them are reduced
to a chunk coreset of OVERSAMPLE x ratio of their size, and at the end a second greedy pass over the union of
the chunk coresets (from one process or many: `merge_candidates`) picks the bank of ratio x N. What is held is
one chunk plus the chunk coresets (2 x the bank): O(bank), never O(N x patches). A run whose patches fit in
one chunk is the exact greedy coreset.

The approximation (coverage radius R = max over all patches of the distance to the nearest bank entry): by the
triangle inequality R_stream <= max chunk radius + merge radius (`CoresetResult.radius_bound`, computed in
every fit), and since each greedy radius is at most twice the optimal k-center radius of any superset
(Gonzalez), R_stream <= 4 x OPT <= 4 x R_exact. Measured: docs/models.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PROJECTION_DIM = 128  # the paper's implementation projects to 128 dimensions for the coreset distances
CHUNK_PATCHES = 32768  # patches reduced at a time by the streaming coreset (32 images at 256 px, stride 8)
OVERSAMPLE = 2.0  # chunk coresets keep this many times the bank's share
_ROWS = 4096  # rows per block in coverage_radius


def projection(dim: int, seed: int = 0, out_dim: int = PROJECTION_DIM) -> torch.Tensor | None:
    """A seeded Gaussian random projection (dim, out_dim) scaled by 1/sqrt(out_dim); None when dim <= out_dim
    (no reduction to gain). The same seed gives the same matrix on every worker."""
    if dim <= out_dim:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, out_dim, generator=generator) / math.sqrt(out_dim)


def greedy_coreset(x: torch.Tensor, k: int, start: int = 0) -> tuple[torch.Tensor, float]:
    """Indices (k,) of the greedy k-center coreset of the rows of x (N, d) from row `start`, and its coverage
    radius (max over rows of the distance to the nearest chosen row). Vectorised: one addmv per step."""
    before = torch.get_num_threads()
    # One thread: each step is a memory-bound product too short to share, and with 2 threads on a loaded
    # 2-core machine every step waited on the other thread (41k x 128 rows, 4096 steps: 56.6 CPU s and 231 s
    # wall on 2 threads, 3.6 and 16.5 on one).
    torch.set_num_threads(1)
    try:
        return _greedy(x.contiguous(), max(1, min(int(k), int(x.shape[0]))), int(start))
    finally:
        torch.set_num_threads(before)


def _greedy(x: torch.Tensor, k: int, current: int) -> tuple[torch.Tensor, float]:
    n = int(x.shape[0])
    sq = (x * x).sum(1)
    min_d = torch.full((n,), math.inf, dtype=x.dtype)
    step = torch.empty(n, dtype=x.dtype)
    chosen = torch.empty(k, dtype=torch.long)
    for i in range(k):
        chosen[i] = current
        torch.addmv(sq, x, x[current], alpha=-2.0, out=step)  # ||x||^2 - 2 x.c, then + ||c||^2
        step.add_(sq[current])
        torch.minimum(min_d, step, out=min_d)
        current = int(torch.argmax(min_d))
    return chosen, math.sqrt(max(float(min_d[current]), 0.0))


def coverage_radius(points: torch.Tensor, centers: torch.Tensor) -> float:
    """max over points of the Euclidean distance to the nearest center (blocks of rows, bounded memory)."""
    worst = 0.0
    for i in range(0, int(points.shape[0]), _ROWS):
        d = torch.cdist(points[i : i + _ROWS].double(), centers.double())
        worst = max(worst, float(d.min(1).values.max()))
    return worst


def _projected(x: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
    return x if proj is None else x @ proj


def start_index(x: torch.Tensor) -> int:
    """Where the greedy pass starts: the row farthest from the mean. The paper starts anywhere; a rule that does
    not depend on the order of the rows makes the exact coreset the same set however the images were sharded."""
    return int(((x - x.mean(0)) ** 2).sum(1).argmax())


def select(x: torch.Tensor, k: int, proj: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """The rows of x of its greedy k-coreset (distances on the projection), and its coverage radius."""
    xp = _projected(x, proj)
    idx, radius = greedy_coreset(xp, k, start_index(xp))
    return x[idx].clone(), radius


def bank_size(ratio: float, count: int) -> int:
    """Bank entries for `count` patches: ceil(ratio x count), at least 1."""
    return max(1, math.ceil(ratio * count))


@dataclass
class Candidates:
    """A shard's reduced embeddings: what it sends to the merge. `count` patches were seen; every one of them
    is within `radius` (on the projection) of some row of `rows`."""

    count: int
    rows: torch.Tensor
    radius: float


@dataclass
class CoresetResult:
    bank: torch.Tensor
    patches: int  # patches seen
    candidates: int  # rows the final greedy pass chose from
    radius_bound: float  # coverage radius of the bank over every patch seen is at most this (projected metric)
    exact: bool  # True when the final pass saw every patch: the exact greedy coreset

    def summary(self) -> dict:
        """What a run records about its bank (config.json's info)."""
        return {
            "bank_size": int(self.bank.shape[0]),
            "patches": self.patches,
            "candidates": self.candidates,
            "exact": self.exact,
            "radius_bound": round(self.radius_bound, 6),
        }


class StreamingCoreset:
    """Bounded-memory coreset of a stream of patch embeddings (see the module docstring)."""

    def __init__(
        self,
        ratio: float,
        proj: torch.Tensor | None,
        *,
        chunk_patches: int = CHUNK_PATCHES,
        oversample: float = OVERSAMPLE,
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        self.ratio, self.proj = ratio, proj
        self.chunk_patches, self.keep = max(1, int(chunk_patches)), min(1.0, oversample * ratio)
        self.count = 0
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        self._kept: list[torch.Tensor] = []
        self._radius = 0.0

    def add(self, embeddings: torch.Tensor) -> None:
        """Fold patch embeddings (n, D); copied, so the caller may reuse its buffer."""
        self._buffer.append(embeddings.detach().to(torch.float32).clone())
        self._buffered += int(embeddings.shape[0])
        self.count += int(embeddings.shape[0])
        while self._buffered >= self.chunk_patches:
            rows = torch.cat(self._buffer)
            self._buffer = [rows[self.chunk_patches :]]
            self._buffered = int(self._buffer[0].shape[0])
            self._reduce(rows[: self.chunk_patches])

    def _reduce(self, rows: torch.Tensor) -> None:
        kept, radius = select(rows, math.ceil(self.keep * rows.shape[0]), self.proj)
        self._kept.append(kept)
        self._radius = max(self._radius, radius)

    def candidates(self) -> Candidates:
        """This shard's candidates: its raw patches if they never filled a chunk (the exact case), else its chunk
        coresets with the remainder reduced too."""
        rest = torch.cat(self._buffer) if self._buffer else torch.empty(0)
        self._buffer, self._buffered = [], 0
        if not self._kept:
            return Candidates(self.count, rest, 0.0)
        if rest.shape[0]:
            self._reduce(rest)
        return Candidates(self.count, torch.cat(self._kept), self._radius)

    def finish(self) -> CoresetResult:
        return merge_candidates([self.candidates()], self.ratio, self.proj)


def merge_candidates(parts: list[Candidates], ratio: float, proj: torch.Tensor | None) -> CoresetResult:
    """The bank of ratio x (all patches seen) chosen by one greedy pass over every shard's candidates."""
    parts = [p for p in parts if p.count > 0]
    if not parts:
        raise ValueError("no patch embeddings to build a memory bank from")
    union = torch.cat([p.rows for p in parts])
    patches = sum(p.count for p in parts)
    bank, radius = select(union, bank_size(ratio, patches), proj)
    exact = all(p.radius == 0.0 and p.rows.shape[0] == p.count for p in parts)
    return CoresetResult(bank, patches, int(union.shape[0]), radius + max(p.radius for p in parts), exact)
