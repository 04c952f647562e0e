"""Fault hooks for STFPM training: kill or fail a chosen rank at a chosen epoch (Ray-free).

train_stfpm_ray(..., fault_hook=hook) calls `hook(rank, epoch)` on every rank at the start of every epoch,
after the previous epoch's checkpoint is registered (so a restart resumes from it, deterministically). Any
picklable callable will do; FaultPlan is the one the tests use, and a way to rehearse failures on a real
cluster:

    FaultPlan((Fault(rank=1, epoch=2, marker="/shared/killed"),))   # SIGKILL rank 1 once, at epoch 2

A fault fires once when it names a marker file (the file records that it happened, and a restarted worker
group finds it), else every time its rank reaches its epoch.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

FAULT_ACTIONS = ("kill", "raise")


class InjectedFault(RuntimeError):
    """What a "raise" fault raises (a "kill" fault leaves no exception: the process dies)."""


@dataclass(frozen=True)
class Fault:
    """At the start of `epoch`, `rank` SIGKILLs its own process ("kill") or raises InjectedFault ("raise").

    "kill" is for Ray workers: with workers=0 the loop runs in the caller's process, which it would kill.
    """

    rank: int
    epoch: int
    action: str = "kill"
    marker: str | None = None

    def __post_init__(self) -> None:
        if self.action not in FAULT_ACTIONS:
            raise ValueError(f"fault action must be one of {', '.join(FAULT_ACTIONS)}, got {self.action!r}")

    def fire(self, rank: int, epoch: int) -> None:
        if rank != self.rank or epoch != self.epoch:
            return
        if self.marker:
            if os.path.exists(self.marker):
                return
            Path(self.marker).write_text(f"rank {rank} epoch {epoch} pid {os.getpid()}\n")
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected fault at epoch {epoch} on rank {rank}")


@dataclass(frozen=True)
class FaultPlan:
    """A fault hook: the faults to inject, checked in order."""

    faults: tuple[Fault, ...]

    def __call__(self, rank: int, epoch: int) -> None:
        for fault in self.faults:
            fault.fire(rank, epoch)
