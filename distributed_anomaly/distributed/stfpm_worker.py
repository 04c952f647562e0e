"""The Ray Train side of STFPM training: the per-worker loop and the typed config it runs with.

    rank r: config -> model (rebuilt from the payload; DDP if W > 1) -> [restore the latest checkpoint]
            per epoch: fault_hook(r, epoch) -> stfpm_steps.run_epoch(get_dataset_shard("train"/"val"))
                       -> early stopping -> ray.train.report(metrics, checkpoint from rank 0)

The computation is stfpm_steps' (Ray-free); checkpoint content and the in-process store are checkpoints';
this module only connects them to Ray Train (context, dataset shards, get_checkpoint, report).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from distributed_anomaly import engine
from distributed_anomaly.data.sizes import ImageSize
from distributed_anomaly.distributed.checkpoints import (
    LocalStore,
    TrainProgress,
    load_state,
    restore,
    save_state,
    state_dict,
)
from distributed_anomaly.distributed.payload import build_from_payload
from distributed_anomaly.distributed.pool import resolve
from distributed_anomaly.distributed.stfpm_steps import (
    EpochTotals,
    Ranks,
    early_stop_step,
    replica_loss_fn,
    run_epoch,
    tensor_batches,
    wrap_ddp,
)
from distributed_anomaly.frozen import OpenVinoTeacher
from distributed_anomaly.frozen_ir import read_blob
from distributed_anomaly.models.stfpm import Stfpm


@dataclass(frozen=True)
class StfpmLoopConfig:
    """Everything a rank needs, picklable. TorchTrainer takes a dict: as_dict() / StfpmLoopConfig(**d)."""

    payload: Any  # payload.model_payload(model), or an ObjectRef of it (one copy in the object store)
    fit_id: str  # this train_stfpm_ray call: a restart after a failure (same id) vs a resume (a later call)
    epochs: int
    per_worker_batch: int  # ceil(global batch / W)
    image_size: ImageSize
    lr: float
    momentum: float
    weight_decay: float
    patience: int
    batch_norm: str = "replica"  # stfpm_steps.BATCH_NORM_MODES
    has_val: bool = False
    local: bool = False  # workers=0: Ray Train's local mode, the loop runs in the caller's process
    use_gpu: bool = False
    threads: int = 1  # torch threads of a Ray worker (and OpenVINO's, for the teacher)
    teacher_ir: Any = None  # frozen_ir.ir_blob of the teacher (or its ObjectRef): OpenVINO teacher; None: torch
    precision: str = "f32"  # the OpenVINO teacher's inference precision
    num_to_keep: int = 2
    local_store: str | None = None  # workers=0: the run folder LocalStore keeps checkpoints in
    progress: bool = False
    progress_queue: Any = None  # a ray.util.queue.Queue the driver prints from (Ray workers' stderr is not ours)
    epoch_eval: Callable[[Stfpm, int], dict] | None = None  # rank 0, after each epoch: metrics to report too
    fault_hook: Callable[[int, int], None] | None = None  # (rank, epoch) at each epoch's start: faults.FaultPlan

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: handles and refs stay as they are


def train_loop_per_worker(config: dict[str, Any]) -> dict:
    """Ray Train's entry point on every rank (in the caller's process for workers=0); returns the summary."""
    cfg = StfpmLoopConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ranks = Ranks(_device(cfg), distributed=not cfg.local and world > 1 and dist.is_initialized())
    model = _build_model(cfg, ranks)
    optimizer = engine.make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    store = LocalStore(cfg.local_store, cfg.num_to_keep, cfg.has_val) if cfg.local else None
    progress = _restored_progress(cfg, model, optimizer, store)  # before DDP: it broadcasts rank 0's weights
    student = wrap_ddp(model.student, ranks.device) if ranks.distributed else model.student
    teacher = _teacher(cfg, model)
    sync = cfg.batch_norm == "sync" and ranks.distributed
    loss_fn = replica_loss_fn(model, student, cfg.batch_norm, sync=sync, teacher=teacher)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg.has_val else None
    say = _printer(cfg, rank)
    if progress.start_epoch:
        say(f"continuing after epoch {progress.start_epoch}/{cfg.epochs} from its checkpoint ({world} worker(s))")
    for epoch in range(progress.start_epoch, cfg.epochs):
        if progress.stopped_early:
            break
        _fault_point(cfg, rank, epoch)
        val = (
            tensor_batches(val_shard, cfg.per_worker_batch, ranks.device, "validation")
            if val_shard is not None
            else None
        )
        totals = run_epoch(
            model,
            optimizer,
            loss_fn,
            tensor_batches(train_shard, cfg.per_worker_batch, ranks.device, "training"),
            val,
            ranks,
            cfg.image_size,
            teacher,
        )
        improved, progress.stopped_early = early_stop_step(progress.stopper, epoch, totals.val_loss, ranks)
        progress.record(totals.result(epoch), totals.images, totals.empty_steps)
        metrics = _metrics(epoch, totals, progress)
        if cfg.epoch_eval is not None and rank == 0:  # e.g. a search objective (tuning.objective)
            metrics.update(cfg.epoch_eval(model, epoch))
        _report(cfg, rank, metrics, model, optimizer, progress, epoch, store)
        say(_epoch_line(cfg, epoch, totals, improved, world))
    return progress.summary(world)


def _device(cfg: StfpmLoopConfig) -> torch.device:
    if cfg.local:
        return torch.device("cuda" if cfg.use_gpu else "cpu")
    torch.set_num_threads(cfg.threads)  # the worker's CPU reservation, not every core of its node
    return ray.train.torch.get_device()


def _build_model(cfg: StfpmLoopConfig, ranks: Ranks) -> Stfpm:
    model = build_from_payload(resolve(cfg.payload))
    assert isinstance(model, Stfpm)
    model.student.requires_grad_(True)
    if cfg.batch_norm == "sync" and ranks.distributed:
        model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.student)
    return model.to(ranks.device)


def _teacher(cfg: StfpmLoopConfig, model: Stfpm) -> OpenVinoTeacher | None:
    """The frozen teacher on OpenVINO, compiled from the driver's IR (no conversion on the worker), or None."""
    if cfg.teacher_ir is None:
        return None
    return OpenVinoTeacher(model, cfg.threads, cfg.precision, graph=read_blob(resolve(cfg.teacher_ir)))


def _restored_progress(
    cfg: StfpmLoopConfig, model: Stfpm, optimizer: torch.optim.Optimizer, store: LocalStore | None
) -> TrainProgress:
    """Ray's latest checkpoint (after a worker failure, or a resumed run) or, in-process, ours; else a start."""
    checkpoint = ray.train.get_checkpoint()
    folder = (
        _private_copy(checkpoint)
        if checkpoint is not None
        else contextlib.nullcontext(store.latest() if store is not None else None)
    )
    with folder as ckpt_dir:
        if ckpt_dir is None:
            return TrainProgress(engine.EarlyStopping(cfg.patience))
        return restore(load_state(ckpt_dir), model, optimizer, cfg.patience, cfg.fit_id)


@contextlib.contextmanager
def _private_copy(checkpoint: Checkpoint) -> Iterator[str]:
    """The checkpoint's folder for this rank alone. Ray's as_directory() downloads a remote checkpoint once per node
    into a folder the node's ranks share, and a rank that arrives after the download re-downloads into it while
    another rank reads: on a restart from S3 a rank then read a half-rewritten state.pt ("PytorchStreamReader
    failed reading file"). A local checkpoint is read in place."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="stfpm-restore-") as tmp:
        yield checkpoint.to_directory(tmp)


def _fault_point(cfg: StfpmLoopConfig, rank: int, epoch: int) -> None:
    """Call the fault hook once the previous epoch's checkpoint is registered (a restart resumes from it)."""
    if cfg.fault_hook is None:
        return
    if not cfg.local:
        ray.train.get_all_reported_checkpoints(timeout_s=120)
    cfg.fault_hook(rank, epoch)


def _metrics(epoch: int, totals: EpochTotals, progress: TrainProgress) -> dict[str, Any]:
    record = totals.result(epoch)
    metrics = {
        "epoch": epoch,
        "train_loss": totals.train_loss,
        "images_per_s": record.images_per_s,
        "seconds": totals.seconds,
        "images": totals.images,
        "best_epoch": progress.stopper.best_epoch,
        "stopped_early": progress.stopped_early,
    }
    if totals.val_loss is not None:
        metrics["val_loss"] = totals.val_loss
    return metrics


def _report(
    cfg: StfpmLoopConfig,
    rank: int,
    metrics: dict,
    model: Stfpm,
    optimizer: torch.optim.Optimizer,
    progress: TrainProgress,
    epoch: int,
    store: LocalStore | None,
) -> None:
    """Every rank reports (Ray Train's barrier); rank 0 attaches the checkpoint (in-process: kept by `store`)."""
    with tempfile.TemporaryDirectory(prefix="stfpm-ckpt-") as tmp:
        ckpt = None
        if rank == 0:
            save_state(tmp, state_dict(model, optimizer, progress, epoch, cfg.fit_id))
            if store is not None:
                ckpt = Checkpoint.from_directory(str(store.add(Path(tmp), epoch, metrics.get("val_loss"))))
                Path(tmp).mkdir(exist_ok=True)  # the TemporaryDirectory cleanup expects it
            else:
                ckpt = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def _printer(cfg: StfpmLoopConfig, rank: int) -> Callable[[str], None]:
    """Rank 0's progress lines: through the driver's queue from Ray workers, to stderr in-process."""

    def say(line: str) -> None:
        if rank != 0 or not cfg.progress:
            return
        if cfg.progress_queue is not None:
            with contextlib.suppress(Exception):
                cfg.progress_queue.put_nowait(line)
        else:
            print(line, file=sys.stderr, flush=True)

    return say


def _epoch_line(cfg: StfpmLoopConfig, epoch: int, totals: EpochTotals, improved: bool, world: int) -> str:
    val = totals.val_loss
    return (
        f"epoch {epoch + 1}/{cfg.epochs}: train loss {totals.train_loss:.4f}"
        + (f", val loss {val:.4f}" + (" (best)" if improved else "") if val is not None else "")
        + f", {totals.result(epoch).images_per_s:.1f} images/s, {world} worker(s)"
    )
