"""How many trials run at once: each trial's driver plus its fit's Ray workers and decode tasks must fit.

A trial is a Tune function trainable holding TRIAL_DRIVER_CPUS (it calibrates and scores in its own process)
that starts its fit as separate Ray work: `workers` Ray Data actors (PADIM) or Ray Train workers (STFPM),
1 CPU each, plus Ray Data's decode tasks. Those are not inside the trial's reservation, so the number of trials
running at once is capped at what the cluster can hold with their fits: otherwise the trial drivers could take
every CPU while their workers wait for one forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from distributed_anomaly.distributed.cpus import cpus_needed
from distributed_anomaly.errors import UserError

TRIAL_DRIVER_CPUS = 1.0


@dataclass(frozen=True)
class Budget:
    cluster_cpus: float
    per_trial: float  # the trial's driver plus its fit's workers and decode tasks
    concurrent: int
    note: str = ""


def fit_cpus(model: str, workers: int) -> float:
    """Logical CPUs one trial's fit holds at most besides its driver (decode tasks as the fit code sizes them)."""
    return cpus_needed(model, workers)


def plan_budget(cluster_cpus: float, workers: int, models: set[str], requested: int | None) -> Budget:
    """How many trials may run at once so that every running trial's fit can be scheduled."""
    per_trial = TRIAL_DRIVER_CPUS + max(fit_cpus(m, workers) for m in models)
    if cluster_cpus < per_trial:
        raise UserError(
            f"the Ray cluster has {cluster_cpus:g} logical CPUs; one trial needs {per_trial:g} "
            f"({TRIAL_DRIVER_CPUS:g} for the trial, the rest for its {workers} worker(s) and decoding): "
            "use fewer --workers or a bigger cluster"
        )
    fits = int(cluster_cpus // per_trial)
    if requested is None:
        return Budget(cluster_cpus, per_trial, fits)
    if requested > fits:
        return Budget(
            cluster_cpus,
            per_trial,
            fits,
            f"--max-concurrent {requested} lowered to {fits}: {fits} trials x {per_trial:g} CPUs fill the "
            f"cluster's {cluster_cpus:g}; more would wait for CPUs their own drivers hold",
        )
    return Budget(cluster_cpus, per_trial, requested)
