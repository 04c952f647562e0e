"""Logical CPUs the Ray pipelines reserve besides their workers (Ray-free: a tuner budgets trials with it
without importing Ray).

PADIM's fit and scoring (pool.py) decode in at most workers + 1 tasks of PADIM_DECODE_CPUS each; STFPM's
training (stfpm_train.py) shuffles and decodes in 2 tasks per rank of STFPM_DECODE_CPUS each.
"""

from __future__ import annotations

import math
import os

# Differs from the pool actors' CPUs so Ray Data does not fuse decoding into them. decode_batch lives in the
# data layer, which imports torch but not torchvision or the Ray glue: a decode worker's imports take 1.75 s
# of CPU instead of 4.2 s (python -X importtime, this machine).
PADIM_DECODE_CPUS = 0.5
STFPM_DECODE_CPUS = 0.25  # one shuffle / decode task of STFPM training


def padim_decode_tasks(workers: int) -> int:
    """Decode tasks in flight at most for a pool of `workers` actors (PADIM fit, scoring)."""
    return workers + 1


def stfpm_decode_tasks(workers: int) -> int:
    """Default decode tasks in flight for `workers` STFPM ranks (0: in-process, decoding still on Ray)."""
    return 2 * max(workers, 1)


def cpus_needed(model: str, workers: int, cpus_per_worker: float = 1.0) -> float:
    """Logical CPUs a `model` ("padim", "patchcore" or "stfpm") run on `workers` Ray workers keeps busy, decoding
    included."""
    if model in ("padim", "patchcore"):
        return workers * cpus_per_worker + padim_decode_tasks(workers) * PADIM_DECODE_CPUS
    return workers * cpus_per_worker + stfpm_decode_tasks(workers) * STFPM_DECODE_CPUS


def serve_ray_cpus(replicas: int, cpus_per_replica: float) -> int:
    """Logical CPUs for a local Ray that only serves: the machine's cores, or the replicas' reservation when
    it is larger (the ingress reserves none), so `serve --replicas 4` on 2 cores starts instead of refusing."""
    return max(os.cpu_count() or 1, math.ceil(replicas * cpus_per_replica))


def local_ray_cpus(model: str, workers: int) -> int:
    """Logical CPUs for a local Ray that runs one fit: the machine's cores, or more when the fit needs more.

    Logical CPUs are a scheduling budget, not cores: a 2-core machine still runs 2 workers and their decode
    tasks, which share the cores, instead of refusing the fit for want of 3.5 declared CPUs.
    """
    return max(os.cpu_count() or 1, math.ceil(cpus_needed(model, max(workers, 1))))


def score_ray_cpus(actors: int | None, cpus_per_actor: float) -> int:
    """Logical CPUs for a local Ray that runs one `score` job: the machine's cores (one actor each by default),
    or the asked actors' reservation when it is larger (as serve_ray_cpus)."""
    return serve_ray_cpus(actors or 0, cpus_per_actor)
