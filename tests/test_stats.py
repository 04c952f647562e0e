"""Mergeable Gaussian statistics: any partition and merge order equals one float64 pass over all images."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distributed_anomaly.stats import COVARIANCE_EPS, GaussianStats, accumulation_dtype


def _reference(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """numpy's float64 mean and unbiased covariance per position of (N, C, P) embeddings."""
    a = x.double().numpy()
    mean = a.mean(axis=0).T  # (P, C)
    cov = np.stack([np.cov(a[:, :, p], rowvar=False) for p in range(a.shape[2])])
    return mean, cov


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 40),
    cuts=st.lists(st.floats(0, 1), max_size=6),
    seed=st.integers(0, 2**16),
    offset=st.sampled_from([0.0, 1e3]),
)
def test_any_partition_and_merge_order_matches_one_pass(n: int, cuts: list[float], seed: int, offset: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, 3, generator=gen, dtype=torch.float64) * 3 + offset  # offset: far-from-zero means
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    parts = [GaussianStats.from_batch(x[a:b]) for a, b in itertools.pairwise(bounds) if b > a]
    random.Random(seed).shuffle(parts)
    # A random binary tree of merges (associativity), not just left-to-right.
    while len(parts) > 1:
        i = random.Random(seed + len(parts)).randrange(len(parts) - 1)
        parts[i : i + 2] = [parts[i].merge(parts[i + 1])]
    merged = parts[0]
    mean, cov = _reference(x)
    assert merged.count == n
    assert _rel_err(merged.mean.numpy(), mean) <= 1e-6
    assert _rel_err(merged.covariance().numpy(), cov) <= 1e-6


def test_update_in_batches_equals_from_batch() -> None:
    x = torch.randn(17, 4, 6, dtype=torch.float64)
    s = GaussianStats.empty(6, 4)
    for i in range(0, 17, 5):
        s.update(x[i : i + 5])
    whole = GaussianStats.from_batch(x)
    assert s.count == 17
    torch.testing.assert_close(s.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.m2, whole.m2, rtol=1e-10, atol=1e-10)


def test_float32_accumulation_stays_accurate_around_large_means() -> None:
    """Shifted-mean (Chan) accumulation keeps float32 usable where raw sums of squares would cancel."""
    x = torch.randn(200, 8, 4, dtype=torch.float64) + 500.0
    s = GaussianStats.empty(4, 8, dtype=torch.float32)
    for i in range(0, 200, 7):
        s.update(x[i : i + 7])
    _, cov = _reference(x)
    assert _rel_err(s.covariance().double().numpy(), cov) < 1e-3


def test_merge_with_empty_and_shape_mismatch() -> None:
    a = GaussianStats.from_batch(torch.randn(3, 2, 2))
    assert GaussianStats.empty(2, 2).merge(a).count == 3
    assert a.merge(GaussianStats.empty(2, 2)).count == 3
    with pytest.raises(ValueError, match="shapes"):
        a.merge(GaussianStats.from_batch(torch.randn(3, 3, 2)))


def test_finalize_gives_inverse_of_regularised_covariance() -> None:
    x = torch.randn(30, 5, 2, dtype=torch.float64)
    s = GaussianStats.from_batch(x)
    mean, inv = s.finalize()
    _, cov = _reference(x)
    expected = np.linalg.inv(cov + COVARIANCE_EPS * np.eye(5))
    assert _rel_err(inv.double().numpy(), expected) < 1e-5
    assert mean.dtype == torch.float32


def test_state_round_trip_and_too_few_images() -> None:
    s = GaussianStats.from_batch(torch.randn(4, 3, 2))
    t = GaussianStats.from_state(s.to_state())
    assert t.count == 4 and torch.equal(t.m2, s.m2)
    with pytest.raises(ValueError, match="at least 2"):
        GaussianStats.from_batch(torch.randn(1, 3, 2)).covariance()


def test_accumulation_dtype_switches_to_float32_only_for_huge_models() -> None:
    assert accumulation_dtype(64 * 64, 100) == torch.float64  # resnet18/100 at 256 px: 0.33 GB
    assert accumulation_dtype(64 * 64, 550) == torch.float32  # wide_resnet50_2/550: 9.9 GB in float64


def test_finalize_in_chunks_equals_one_shot_inverse() -> None:
    """Chunking over patch positions (7 positions, chunks of 3: a ragged last chunk) changes nothing."""
    g = torch.Generator().manual_seed(3)
    stats = GaussianStats.from_batch(torch.randn(12, 5, 7, generator=g))
    mean, inv = stats.finalize(chunk_positions=3)
    cov = stats.covariance() + COVARIANCE_EPS * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(inv, torch.linalg.inv(cov).to(torch.float32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, stats.mean.to(torch.float32))
    assert inv.dtype == torch.float32 and inv.shape == (7, 5, 5)
