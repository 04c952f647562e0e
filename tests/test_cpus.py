"""The CPU budget of Ray fits: what a local Ray declares for the fit it is started for (no Ray needed)."""

from __future__ import annotations

import os

import pytest

from distributed_anomaly.distributed.cpus import cpus_needed, local_ray_cpus, serve_ray_cpus


@pytest.mark.parametrize("model,workers", [("padim", 1), ("padim", 2), ("stfpm", 2), ("stfpm", 4)])
def test_a_local_ray_holds_the_fit_on_a_small_machine(
    monkeypatch: pytest.MonkeyPatch, model: str, workers: int
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    declared, needed = local_ray_cpus(model, workers), cpus_needed(model, workers)
    assert declared >= needed and declared >= 2  # the fit is not refused, even beyond the 2 cores
    assert declared - max(needed, 2) < 1  # and no more than it needs


def test_a_local_ray_declares_the_machine_when_it_has_more(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert local_ray_cpus("padim", 2) == 16
    assert cpus_needed("padim", 2) == 2 + 3 * 0.5  # two actors and workers + 1 decode tasks of 0.5 CPU
    assert cpus_needed("stfpm", 2) == 2 + 4 * 0.25  # two ranks and two decode tasks per rank of 0.25 CPU


@pytest.mark.parametrize(
    "cores,replicas,cpus,expected", [(2, 4, 1.0, 4), (2, 1, 1.0, 2), (16, 4, 1.0, 16), (2, 3, 1.5, 5)]
)
def test_a_local_ray_for_serve_holds_every_replica(
    monkeypatch: pytest.MonkeyPatch, cores: int, replicas: int, cpus: float, expected: int
) -> None:
    """`serve --replicas N` (and `pipeline --serve`) without --address: enough logical CPUs for N replicas."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert serve_ray_cpus(replicas, cpus) == expected
