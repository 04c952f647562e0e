"""One STFPM training epoch on one rank of a data-parallel group (Ray-free: torch and torch.distributed only).

What is computed is the in-process engine's (engine.stfpm_epoch / stfpm_val_loss / EarlyStopping); these
functions add only what data parallelism needs, so stfpm_worker's Ray Train loop stays glue:

* Gradients are SUMMED over ranks (sum_allreduce_hook): the STFPM loss is summed over the images, so one step
  on W ranks with b images each is one step on the W*b images of the global batch.
* Ranks step in lockstep (Ranks.lockstep): before every step they all-reduce "do I still have a batch"; a rank
  out of images steps with an empty batch (zero gradient, batch-norm statistics untouched), so every rank
  takes the same number of optimizer steps and the epoch ends when the last image has been used.
* Batch norm (replica_loss_fn): "replica" normalises each rank's sub-batch with its own statistics (DDP's
  behaviour: W ranks compute the step a single process computes when it normalises each of W sub-batches of
  the global batch separately, "ghost batch norm" -- not the whole-batch statistics of one process with batch
  W*b); "sync" uses SyncBatchNorm (GPU only in torch), "frozen" the running statistics.
* Losses, image counts and the stop decision are all-reduced, so every rank sees the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distributed_anomaly import engine
from distributed_anomaly.data.sizes import ImageSize, as_hw
from distributed_anomaly.errors import ImageReadError
from distributed_anomaly.frozen import OpenVinoTeacher
from distributed_anomaly.models.stfpm import Stfpm, stfpm_loss

BATCH_NORM_MODES = ("replica", "sync", "frozen")


def sum_allreduce_hook(process_group, bucket):  # no annotations: DDP checks them (and they would be strings)
    """DDP communication hook: all-reduce SUM (DDP's default divides by the world size).

    The STFPM loss is summed over the batch, so summing the ranks' gradients makes one step on W ranks with
    B images each equal to one step on one process with W*B images.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_ddp(student: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """The student as DDP with summed gradients (the process group must be up: Ray Train's TorchConfig)."""
    ddp = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    ddp.register_comm_hook(None, sum_allreduce_hook)
    return ddp


@dataclass(frozen=True)
class Ranks:
    """This rank's view of the group: one process (distributed=False) reduces nothing and never waits."""

    device: torch.device
    distributed: bool = False

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def lockstep(
        self, batches: Iterator[torch.Tensor], image_size: ImageSize, empty_steps: list[int]
    ) -> Iterator[torch.Tensor]:
        """Same number of steps on every rank: a rank out of images yields empty batches while others have some."""
        if not self.distributed:
            yield from batches
            return
        it = iter(batches)
        empty = torch.empty((0, 3, *as_hw(image_size)), device=self.device)
        while True:
            x = next(it, None)
            have = torch.tensor([0 if x is None else 1], device=self.device, dtype=torch.int32)
            dist.all_reduce(have)
            if int(have.item()) == 0:
                return
            if x is None:
                empty_steps[0] += 1
            yield empty if x is None else x


def tensor_batches(shard: Any, batch_size: int, device: torch.device, what: str) -> Iterator[torch.Tensor]:
    """Decoded (B, 3, S, S) batches of a shard of data.images.decode_batch rows (anything with Ray Data's
    iter_batches); an unreadable image stops training with its name."""
    for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1, drop_last=False):
        ok = np.asarray(b["ok"], dtype=bool)
        if not ok.all():
            raise ImageReadError(f"{what} image unreadable: {b['error'][np.flatnonzero(~ok)[0]]}")
        yield torch.from_numpy(np.array(b["pixels"], dtype=np.float32)).to(device, non_blocking=True)  # writable copy


def replica_loss_fn(
    model: Stfpm, student: torch.nn.Module, batch_norm: str, sync: bool, teacher: OpenVinoTeacher | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training loss of one rank's batch through `student` (model.student, or its DDP wrapper); the teacher's
    features from `teacher` (frozen.OpenVinoTeacher) when given, else from the model's torch teacher.

    An empty batch (a rank out of images) must not touch running statistics; SyncBN ranks must all join.
    """
    bn = engine.batchnorms(model.student)
    frozen = batch_norm == "frozen"

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        bn_train = not frozen and (x.shape[0] > 0 or sync)
        for m in bn:
            m.train(bn_train)
        with torch.no_grad():
            t = teacher(x) if teacher is not None and x.shape[0] else model.teacher(x)
        return stfpm_loss(t, student(x))

    return loss_fn


@dataclass(frozen=True)
class EpochTotals:
    """One epoch over all ranks: per-image losses, images, empty steps (summed) and seconds (slowest rank)."""

    train_loss: float
    images: int
    empty_steps: int
    val_loss: float | None
    seconds: float

    def result(self, epoch: int) -> engine.EpochResult:
        return engine.EpochResult(
            epoch, self.train_loss, self.val_loss, self.images / max(self.seconds, 1e-9), self.seconds
        )


def run_epoch(
    model: Stfpm,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    train: Iterator[torch.Tensor],
    val: Iterator[torch.Tensor] | None,
    ranks: Ranks,
    image_size: ImageSize,
    teacher: OpenVinoTeacher | None = None,
) -> EpochTotals:
    """SGD over this rank's training batches in lockstep with the others, then the validation loss."""
    start = time.perf_counter()
    empty = [0]
    mean, n = engine.stfpm_epoch(model, ranks.lockstep(train, image_size, empty), optimizer, loss_fn)
    total, n_all, n_empty = ranks.all_reduce([mean * n, n, empty[0]])
    val_loss = None
    if val is not None:
        v, v_n = engine.stfpm_val_loss(model, val, teacher)
        v_total, v_n = ranks.all_reduce([v * v_n, v_n])
        val_loss = v_total / max(v_n, 1)
    seconds = ranks.all_reduce([time.perf_counter() - start], op="max")[0]
    return EpochTotals(total / max(n_all, 1), int(n_all), int(n_empty), val_loss, seconds)


def early_stop_step(
    stopper: engine.EarlyStopping, epoch: int, val_loss: float | None, ranks: Ranks
) -> tuple[bool, bool]:
    """(improved, stop): the epoch's validation loss into `stopper`; all ranks stop together."""
    improved = val_loss is not None and stopper.step(epoch, val_loss)
    stop = val_loss is not None and stopper.should_stop
    return improved, bool(ranks.all_reduce([float(stop)], op="max")[0])
