"""STFPM data-parallel training on Ray Train (V2): DDP student, frozen teacher, fault tolerant, resumable.

    driver: manifest (paths) --Ray Data--> [seeded per-epoch shuffle of the paths] --> [decode tasks:
            data.images.decode_batch] --streaming_split(W, equal=False)-->
    rank r: ray.train.get_dataset_shard("train") -> batches -> engine.stfpm_epoch(DDP student, frozen teacher)
            ray.train.get_dataset_shard("val")   -> engine.stfpm_val_loss -> all-reduced -> early stopping
            ray.train.report(metrics, checkpoint)  (every rank, once per epoch)

What is computed is the in-process engine's (engine.stfpm_epoch / stfpm_val_loss / EarlyStopping /
make_optimizer); this module only decides where. Semantics (see README, "Distributed STFPM training"):

* `train_cfg.batch_size` is the GLOBAL batch: each of W workers takes ceil(B / W) images per step.
* The loss is summed over the images (like anomalib's); DDP would average the gradients over ranks, so the
  student's DDP wrapper gets a communication hook that SUMS them instead: one step's gradient is the gradient
  of the loss summed over the whole global batch, exactly as one process with batch B computes it.
* Uneven shards: no image is dropped (streaming_split(equal=False); Ray Train's default equal=True would drop
  up to W-1 images per epoch). Before every step the ranks all-reduce "do I still have a batch"; a rank that
  has run out takes part in the step with an empty batch (its gradient contribution is zero, its batch-norm
  statistics untouched), so every rank runs the same number of optimizer steps and the SGD momentum
  buffers stay identical, and the epoch ends for all ranks when the last image has been used.
* Batch norm in the student is per replica by default (as DDP does); `batch_norm="sync"` converts it to
  SyncBatchNorm (GPU only in torch); `batch_norm="frozen"` uses running statistics (the equivalence test).
* Checkpoints (rank 0 writes, every rank reports): student weights, optimizer, epoch, early-stopping state,
  history, torch RNG; kept by CheckpointConfig(num_to_keep, score "val_loss", order "min"); Ray always keeps
  the latest too. A worker that dies restarts the group (FailureConfig(max_failures)) from the latest one;
  `resume_from` continues an interrupted run. The best checkpoint becomes the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import ray
import torch
import torch.distributed as dist

from distributed_anomaly import engine
from distributed_anomaly import storage as shared
from distributed_anomaly.config import ModelConfig, TrainConfig
from distributed_anomaly.data.images import decode_batch
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.distributed.padim_fit import build_from_payload, check_cluster_cpus, model_payload
from distributed_anomaly.errors import ImageReadError, UserError
from distributed_anomaly.fileio import write_json
from distributed_anomaly.models.stfpm import Stfpm, stfpm_loss

STATE_FILE = "state.pt"
LOCAL_INDEX = "local_checkpoints.json"  # workers=0: our own checkpoint index (Ray keeps none in local mode)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints
DECODE_CPUS = 0.25  # logical CPUs of one shuffle / decode task
BATCH_NORM_MODES = ("replica", "sync", "frozen")
# Test-only fault injection, read by the driver and passed to the workers: JSON, one object or a list, such as
# {"action": "kill", "rank": 1, "epoch": 2, "marker": "/tmp/x"}: at the start of epoch 2, rank 1 SIGKILLs its
# own process once (the marker file records that it happened). "raise" raises instead (and in-process, "kill"
# raises too rather than killing the caller).
FAULT_ENV = "DISTRIBUTED_ANOMALY_FAULT_INJECTION"


# --------------------------------------------------------------------------------------------- worker side

def _sum_allreduce_hook(process_group, bucket):  # no annotations: DDP checks them (and they would be strings)
    """DDP communication hook: all-reduce SUM (DDP's default divides by the world size).

    The STFPM loss is summed over the batch, so summing the ranks' gradients makes one step on W ranks with
    B images each equal to one step on one process with W*B images.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _tensor_batches(shard: Any, batch_size: int, device: torch.device, what: str) -> Iterator[torch.Tensor]:
    """Decoded (B, 3, S, S) batches of this rank's shard; an unreadable image stops training with its name."""
    for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1, drop_last=False):
        ok = np.asarray(b["ok"], dtype=bool)
        if not ok.all():
            raise ImageReadError(f"{what} image unreadable: {b['error'][np.flatnonzero(~ok)[0]]}")
        yield torch.from_numpy(np.array(b["pixels"], dtype=np.float32)).to(device, non_blocking=True)  # writable copy


def _lockstep(batches: Iterator[torch.Tensor], device: torch.device, image_size: int,
              empty_steps: list[int]) -> Iterator[torch.Tensor]:
    """Same number of steps on every rank: a rank out of images yields empty batches while others have some."""
    it = iter(batches)
    empty = torch.empty((0, 3, image_size, image_size), device=device)
    while True:
        x = next(it, None)
        have = torch.tensor([0 if x is None else 1], device=device, dtype=torch.int32)
        dist.all_reduce(have)
        if int(have.item()) == 0:
            return
        if x is None:
            empty_steps[0] += 1
        yield empty if x is None else x


def _all_reduce(values: Sequence[float], device: torch.device, distributed: bool, op: str = "sum") -> list[float]:
    if not distributed:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def _state_dict(model: Stfpm, optimizer: torch.optim.Optimizer, stopper: engine.EarlyStopping, epoch: int,
                history: list[dict], images: list[int], empty: list[int], restores: dict, stopped_early: bool,
                fit_id: str) -> dict:
    return {"student": {k: v.detach().cpu() for k, v in model.student.state_dict().items()},
            "optimizer": optimizer.state_dict(), "epoch": epoch,
            "stopper": asdict(stopper),
            "history": history, "images_per_epoch": images, "empty_steps_per_epoch": empty,
            "restores": restores, "fit_id": fit_id,
            "stopped_early": stopped_early,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}


def load_state(checkpoint_dir: str | os.PathLike) -> dict:
    """A checkpoint's state (tensors, numbers, lists: loaded with weights_only=True, nothing arbitrary)."""
    return torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)


def _maybe_inject_faults(faults: list[dict], rank: int, epoch: int, local: bool) -> None:
    for fault in faults:
        if int(fault.get("rank", 0)) != rank or int(fault.get("epoch", -1)) != epoch:
            continue
        marker = fault.get("marker")
        if marker:
            if os.path.exists(marker):
                continue
            Path(marker).write_text(f"rank {rank} epoch {epoch} pid {os.getpid()}\n")
        if not local:  # the previous epoch's checkpoint is registered: the restart resumes from it, deterministically
            import ray.train

            ray.train.get_all_reported_checkpoints(timeout_s=120)
        if fault.get("action", "kill") == "kill" and not local:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault at epoch {epoch} on rank {rank}")


class _LocalStore:
    """workers=0: checkpoints under RUN/checkpoint_epochNNNN with an index; best `keep` by score + the latest."""

    def __init__(self, root: str | os.PathLike, keep: int, scored: bool) -> None:
        self.root, self.keep, self.scored = Path(root), keep, scored
        self.index_path = self.root / LOCAL_INDEX

    def entries(self) -> list[dict]:
        if not self.index_path.is_file():
            return []
        return json.loads(self.index_path.read_text())["checkpoints"]

    def latest(self) -> Path | None:
        e = self.entries()
        return self.root / max(e, key=lambda d: d["epoch"])["dir"] if e else None

    def add(self, src: Path, epoch: int, score: float | None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"checkpoint_epoch{epoch:04d}"
        dst = self.root / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.move(str(src), dst)
        entries = [e for e in self.entries() if e["dir"] != name] + [{"dir": name, "epoch": epoch, "score": score}]
        latest = max(entries, key=lambda d: d["epoch"])
        key = (lambda d: (d["score"] if d["score"] is not None else math.inf, d["epoch"])) if self.scored else \
            (lambda d: -d["epoch"])
        kept = sorted(entries, key=key)[: self.keep]
        if latest not in kept:
            kept.append(latest)
        write_json(self.index_path, {"checkpoints": kept})  # index first: it never names a deleted folder
        for e in entries:
            if e not in kept:
                shutil.rmtree(self.root / e["dir"], ignore_errors=True)
        return dst


def _stfpm_train_loop(config: dict) -> dict:
    """The per-worker loop (also run in-process for workers=0). Returns rank 0's summary."""
    import ray.train
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    local = config["local"]
    distributed = (not local) and world > 1 and dist.is_initialized()
    if local:
        device = torch.device("cuda" if config["use_gpu"] else "cpu")
    else:
        import ray.train.torch as rtt

        device = rtt.get_device()
        if config["threads"]:
            torch.set_num_threads(config["threads"])
    payload = config["payload"]
    model = build_from_payload(ray.get(payload) if isinstance(payload, ray.ObjectRef) else payload)
    assert isinstance(model, Stfpm)
    model.student.requires_grad_(True)
    if config["batch_norm"] == "sync" and distributed:
        model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.student)
    model.to(device)
    optimizer = engine.make_optimizer(model, config["lr"], config["momentum"], config["weight_decay"])
    stopper = engine.EarlyStopping(config["patience"])
    history: list[dict] = []
    images_per_epoch: list[int] = []
    empty_steps_per_epoch: list[int] = []  # summed over ranks: steps a rank took with no image (uneven shards)
    start_epoch, stopped_early = 0, False
    # Loop starts from a checkpoint: after a worker failure within this call, or by resume_from (a new call).
    restores = {"failures": 0, "resumes": 0}

    # Where to start: Ray's latest checkpoint (after a worker failure, or a resumed run) or, in-process, ours.
    store = _LocalStore(config["local_store"], config["num_to_keep"], config["has_val"]) if local else None
    checkpoint = ray.train.get_checkpoint()
    ckpt_dir_ctx = checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(
        store.latest() if store is not None else None)
    with ckpt_dir_ctx as ckpt_dir:
        if ckpt_dir is not None:
            state = load_state(ckpt_dir)
            model.student.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
            stopper = engine.EarlyStopping(**{**state["stopper"], "patience": config["patience"]})
            history, images_per_epoch = list(state["history"]), list(state["images_per_epoch"])
            empty_steps_per_epoch = list(state["empty_steps_per_epoch"])
            start_epoch, stopped_early = state["epoch"] + 1, state["stopped_early"]
            restores = dict(state["restores"])
            restores["failures" if state["fit_id"] == config["fit_id"] else "resumes"] += 1
            torch.set_rng_state(state["rng"]["torch"])
            if state["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    student = model.student
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        student = DistributedDataParallel(model.student, device_ids=[device.index] if device.type == "cuda" else None)
        student.register_comm_hook(None, _sum_allreduce_hook)
    bn = engine.batchnorms(model.student)
    frozen_bn = config["batch_norm"] == "frozen"
    sync_bn = config["batch_norm"] == "sync" and distributed

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        # An empty batch (a rank out of images) must not touch running statistics; SyncBN ranks must all join.
        bn_train = not frozen_bn and (x.shape[0] > 0 or sync_bn)
        for m in bn:
            m.train(bn_train)
        with torch.no_grad():
            t = model.teacher(x)
        return stfpm_loss(t, student(x))

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    per_worker = config["per_worker_batch"]
    progress_queue = config["progress_queue"]

    def emit(line: str) -> None:
        if rank != 0 or not config["progress"]:
            return
        if progress_queue is not None:
            with contextlib.suppress(Exception):
                progress_queue.put_nowait(line)
        else:
            print(line, file=sys.stderr, flush=True)

    if start_epoch:
        emit(f"continuing after epoch {start_epoch}/{config['epochs']} from its checkpoint ({world} worker(s))")
    epochs = config["epochs"]
    epoch = start_epoch
    while epoch < epochs and not stopped_early:
        _maybe_inject_faults(config["faults"], rank, epoch, local)
        start = time.perf_counter()
        batches = _tensor_batches(train_shard, per_worker, device, "training")
        empty = [0]
        if distributed:
            batches = _lockstep(batches, device, config["image_size"], empty)
        mean, n = engine.stfpm_epoch(model, batches, optimizer, loss_fn)
        total, n_all, n_empty = _all_reduce([mean * n, n, empty[0]], device, distributed)
        train_loss = total / max(n_all, 1)
        val_loss = None
        if val_shard is not None:
            v, v_n = engine.stfpm_val_loss(model, _tensor_batches(val_shard, per_worker, device, "validation"))
            v_total, v_n = _all_reduce([v * v_n, v_n], device, distributed)
            val_loss = v_total / max(v_n, 1)
        seconds = _all_reduce([time.perf_counter() - start], device, distributed, op="max")[0]
        improved = val_loss is not None and stopper.step(epoch, val_loss)
        stop = val_loss is not None and stopper.should_stop
        stop = bool(_all_reduce([float(stop)], device, distributed, op="max")[0])  # all ranks stop together
        stopped_early = stop  # as engine.train_stfpm: the patience ran out (possibly at the last epoch)
        record = engine.EpochResult(epoch, train_loss, val_loss, n_all / max(seconds, 1e-9), seconds)
        history.append(asdict(record))
        images_per_epoch.append(int(n_all))
        empty_steps_per_epoch.append(int(n_empty))
        metrics = {"epoch": epoch, "train_loss": train_loss, "images_per_s": record.images_per_s,
                   "seconds": seconds, "images": int(n_all), "best_epoch": stopper.best_epoch,
                   "stopped_early": stopped_early}
        if val_loss is not None:
            metrics["val_loss"] = val_loss
        if config.get("epoch_eval") is not None and rank == 0:  # e.g. a search objective (tuning.objective)
            metrics.update(config["epoch_eval"](model, epoch))
        with tempfile.TemporaryDirectory(prefix="stfpm-ckpt-") as tmp:
            ckpt = None
            if rank == 0:
                state = _state_dict(model, optimizer, stopper, epoch, history, images_per_epoch,
                                    empty_steps_per_epoch, restores, stopped_early, config["fit_id"])
                torch.save(state, Path(tmp) / STATE_FILE)
                if store is not None:
                    ckpt = Checkpoint.from_directory(str(store.add(Path(tmp), epoch, val_loss)))
                    Path(tmp).mkdir(exist_ok=True)  # the TemporaryDirectory cleanup expects it
                else:
                    ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        emit(f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}"
             + (f", val loss {val_loss:.4f}" + (" (best)" if improved else "") if val_loss is not None else "")
             + f", {record.images_per_s:.1f} images/s, {world} worker(s)")
        epoch += 1
    has_best = stopper.best_epoch >= 0
    return {"history": history, "images_per_epoch": images_per_epoch, "empty_steps_per_epoch": empty_steps_per_epoch,
            "best_epoch": stopper.best_epoch if has_best else len(history) - 1,
            "best_val_loss": stopper.best if has_best else None, "stopped_early": stopped_early,
            "restores": restores, "start_epoch": start_epoch, "world_size": world}


# --------------------------------------------------------------------------------------------- driver side

def _datasets(fit_records: Sequence[Record], val_records: Sequence[Record], image_size: int, per_worker: int,
              seed: int, decode_tasks: int) -> dict:
    """Ray Data pipelines of decoded images: training paths reshuffled every epoch (seeded), validation in order."""
    from ray.data import RandomSeedConfig

    def build(records: Sequence[Record], shuffle: bool):
        items = [{"idx": i, "path": r.path} for i, r in enumerate(records)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_worker)))
        if shuffle:
            # Only paths are shuffled (an all-to-all over a few bytes per image); decoding streams after it.
            ds = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True), num_cpus=DECODE_CPUS)
        ds = ds.map_batches(decode_batch, fn_kwargs={"image_size": image_size}, batch_size=None,
                            batch_format="numpy", num_cpus=DECODE_CPUS, concurrency=decode_tasks)
        ds.context.execution_options.preserve_order = True  # deterministic shard assignment (workers=0 too)
        ds.context.enable_progress_bars = False  # one line per epoch from us instead
        ds.context.print_on_execution_start = False
        return ds

    out = {"train": build(fit_records, True)}
    if val_records:
        out["val"] = build(val_records, False)
    return out


def _data_config():
    from ray.train import DataConfig

    class NoDropDataConfig(DataConfig):
        """Ray Train's DataConfig, but streaming_split(equal=False): no image dropped to even out the shards.

        preserve_order makes the split deterministic: Ray Data's splitter gives each block, in order, to the
        rank with the fewest rows so far.
        """

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                options = self._resolve_execution_options(name)
                options.preserve_order = True
                ds.context.execution_options = options
                for i, split in enumerate(ds.streaming_split(world_size, equal=False,
                                                             locality_hints=worker_node_ids)):
                    output[i][name] = split
            return output

    return NoDropDataConfig()


def _find_run(resume_from: str, local: bool) -> str:
    """The run folder to resume: RESUME itself, or one run folder directly inside it (or in RESUME/ray_train)."""
    marker = LOCAL_INDEX if local else RAY_SNAPSHOT
    if shared.exists(shared.join(resume_from, marker)):
        return resume_from
    if not shared.is_uri(resume_from):
        for parent in (Path(resume_from), Path(resume_from) / "ray_train"):
            found = sorted(p for p in parent.glob(f"*/{marker}")) if parent.is_dir() else []
            if len(found) == 1:
                return str(found[0].parent)
            if len(found) > 1:
                raise UserError(f"{parent} holds several training runs ({', '.join(p.parent.name for p in found)}); "
                                "pass the one to resume")
    other = RAY_SNAPSHOT if local else LOCAL_INDEX
    if shared.exists(shared.join(resume_from, other)):
        raise UserError(f"{resume_from} was trained {'on Ray workers' if local else 'in-process (workers=0)'}; "
                        f"resume it with {'workers >= 1' if local else 'workers=0'}")
    raise UserError(f"nothing to resume in {resume_from}: no {marker} (is it a training run folder?)")


def decode_task_count(workers: int) -> int:
    """Default decode tasks in flight for `workers` ranks (tuning.search budgets CPUs with it)."""
    return 2 * max(workers, 1)


def _best_state_ray(result: Any, best_epoch: int) -> dict:
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m.get("epoch") == best_epoch]
    if not candidates:
        kept = sorted(m.get("epoch") for _, m in (result.best_checkpoints or []))
        raise RuntimeError(f"the checkpoint of the best epoch {best_epoch} was not kept (kept epochs: {kept})")
    with candidates[-1][0].as_directory() as d:
        return load_state(d)


def _progress_printer(queue: Any) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()

    def run() -> None:
        while True:
            try:
                for line in queue.get_nowait_batch(queue.qsize()):
                    print(line, file=sys.stderr, flush=True)
            except Exception:
                pass
            if stop.is_set():
                return
            stop.wait(0.5)

    thread = threading.Thread(target=run, name="stfpm-progress", daemon=True)
    thread.start()
    return stop, thread


def train_stfpm_ray(model_cfg: ModelConfig, train_cfg: TrainConfig, fit_records: Sequence[Record],
                    val_records: Sequence[Record], *, workers: int, storage: str | None = None,
                    run_name: str = "stfpm", resume_from: str | None = None, progress: bool = True,
                    model: Stfpm | None = None, use_gpu: bool | None = None, cpus_per_worker: float = 1.0,
                    max_failures: int = 3, num_to_keep: int = 2, batch_norm: str = "replica",
                    decode_tasks: int | None = None, epoch_eval: Callable[[Stfpm, int], dict] | None = None,
                    callbacks: Sequence[Any] = ()) -> tuple[Stfpm, dict]:
    """Train STFPM's student with Ray Train (Ray must be initialised: see ensure_ray); returns (model, info).

    workers: W >= 1 Ray Train workers (DDP over gloo on CPU, NCCL on GPU); 0 runs the same loop in this
        process (Ray Train's local mode; Ray Data still decodes).
    train_cfg.batch_size is the global batch (ceil(B / W) images per worker and step); epochs, lr, momentum,
        weight decay and patience as in engine.train_stfpm. The shuffle seed is model_cfg.seed.
    storage: where checkpoints go (local folder, shared file system or URI; default ~/ray_results); the run
        folder is STORAGE/RUN_NAME and must not exist yet unless resuming.
    resume_from: a run folder (or a folder holding exactly one, e.g. RUN_DIR or RUN_DIR/ray_train) of an
        interrupted run: training continues after its latest checkpoint (storage/run_name are taken from it).
    model: an already built Stfpm to train in place (else built from model_cfg/train_cfg); its teacher and the
        student's initial weights travel to the workers (no weights download there).
    batch_norm: "replica" (DDP's per-replica statistics), "sync" (SyncBatchNorm; GPU only) or "frozen".
    cpus_per_worker: logical CPUs each worker reserves (torch threads: its integer part, at least 1);
        decode_tasks: Ray Data decode tasks in flight at most (default 2 per worker, DECODE_CPUS each);
        max_failures: worker-group restarts from the latest checkpoint; num_to_keep: best checkpoints kept.
    epoch_eval: a picklable callable (model, epoch) -> {name: number} run on rank 0 after every epoch; its values
        join that epoch's reported metrics (hyperparameter search scores each epoch with it). It must leave the
        model as it found it. callbacks: Ray Train UserCallbacks of the run (e.g. Tune's TuneReportCallback,
        which forwards the per-epoch metrics to the Tune trial that called this; Ray Train's local mode,
        workers=0, runs none).
    info: history (engine.EpochResult dicts, each epoch once), images_per_epoch, empty_steps_per_epoch (steps a
        rank took without images, summed over ranks), best_epoch, best_val_loss, epochs_run,
        stopped_early, failures (worker-group restarts from a checkpoint, all calls of this run), resumes
        (resume_from calls that found a checkpoint), resumed (this call), run_path, workers, global_batch_size,
        per_worker_batch_size, batch_norm, device, seconds.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 0:
        raise UserError(f"workers must be >= 0, got {workers}")
    if batch_norm not in BATCH_NORM_MODES:
        raise UserError(f"batch_norm must be one of {', '.join(BATCH_NORM_MODES)}, got {batch_norm!r}")
    if model_cfg.model != "stfpm":
        raise UserError(f"train_stfpm_ray trains STFPM, got model {model_cfg.model!r}")
    if not fit_records:
        raise UserError("STFPM needs at least 1 training image")
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call distributed_anomaly.distributed.ensure_ray() first")
    tcfg = train_cfg.resolved("stfpm")
    use_gpu = torch.cuda.is_available() if use_gpu is None else bool(use_gpu)
    if batch_norm == "sync" and not use_gpu and workers > 1:
        raise UserError("batch_norm='sync' needs GPUs (torch's SyncBatchNorm has no CPU implementation)")
    local = workers == 0
    world = max(workers, 1)
    per_worker = max(1, math.ceil(tcfg.batch_size / world))
    if not local:
        check_cluster_cpus(workers, cpus_per_worker, DECODE_CPUS)

    resumed = resume_from is not None
    if resumed:
        storage, run_name = shared.split_last(_find_run(shared.normalize(resume_from), local))
    else:
        storage = shared.normalize(storage or "~/ray_results")
        if shared.exists(shared.join(storage, run_name)):
            raise UserError(f"training run folder {shared.join(storage, run_name)} already exists: pass resume_from "
                            "to continue it, or choose another run name / storage")
    run_path = shared.join(storage, run_name)

    if model is None:
        from distributed_anomaly import rundir

        model = rundir.build_model(model_cfg, pretrained=tcfg.pretrained, weights_file=tcfg.weights_file)
    payload = model_payload(model)
    faults = json.loads(os.environ.get(FAULT_ENV) or "[]")
    faults = [faults] if isinstance(faults, dict) else faults
    queue = None
    if progress and not local:
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})
    config = {"payload": payload if local else ray.put(payload), "local": local, "use_gpu": use_gpu,
              "threads": max(1, int(cpus_per_worker)), "batch_norm": batch_norm, "lr": tcfg.lr,
              "momentum": tcfg.momentum, "weight_decay": tcfg.weight_decay, "patience": tcfg.patience,
              "epochs": tcfg.epochs, "per_worker_batch": per_worker, "image_size": model_cfg.image_size,
              "has_val": bool(val_records), "num_to_keep": num_to_keep, "local_store": run_path if local else None,
              "progress": progress, "progress_queue": queue, "faults": faults, "fit_id": uuid.uuid4().hex,
              "epoch_eval": epoch_eval}
    checkpoint_config = (CheckpointConfig(num_to_keep=num_to_keep, checkpoint_score_attribute="val_loss",
                                          checkpoint_score_order="min") if val_records
                         else CheckpointConfig(num_to_keep=num_to_keep))
    trainer = TorchTrainer(
        _stfpm_train_loop, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu and not local,  # + 1 GPU per worker
                                     resources_per_worker=None if local else {"CPU": cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage, checkpoint_config=checkpoint_config,
                             failure_config=FailureConfig(max_failures=max_failures), callbacks=list(callbacks)),
        datasets=_datasets(fit_records, val_records, model_cfg.image_size, per_worker, model_cfg.seed,
                           decode_tasks or decode_task_count(world)),
        dataset_config=_data_config())
    start = time.perf_counter()
    printer = _progress_printer(queue) if queue is not None else None
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # Ray Data's per-execution INFO lines (in this process for workers=0)
    try:
        result = trainer.fit()
    except Exception as exc:
        raise RuntimeError(f"STFPM training on Ray failed ({type(exc).__name__}: {exc}); its checkpoints are in "
                           f"{run_path}: continue with resume_from={run_path!r}") from exc
    finally:
        data_logger.setLevel(saved_level)
        if printer is not None:
            printer[0].set()
            printer[1].join(timeout=5)
        if queue is not None:
            with contextlib.suppress(Exception):
                queue.shutdown()
    summary = result.return_value
    if summary is None:
        raise RuntimeError(f"STFPM training on Ray returned no summary (run folder {run_path})")
    best_epoch = int(summary["best_epoch"])
    if local:
        entry = [e for e in _LocalStore(run_path, num_to_keep, bool(val_records)).entries() if e["epoch"] == best_epoch]
        if not entry:
            raise RuntimeError(f"the checkpoint of the best epoch {best_epoch} is missing from {run_path}")
        state = load_state(Path(run_path) / entry[0]["dir"])
    else:
        state = _best_state_ray(result, best_epoch)
    model.student.load_state_dict(state["student"])
    model.eval()
    history = summary["history"]
    restores = summary["restores"]
    info = {"history": history, "images_per_epoch": summary["images_per_epoch"],
            "empty_steps_per_epoch": summary["empty_steps_per_epoch"], "best_epoch": best_epoch,
            "best_val_loss": summary["best_val_loss"],
            "epochs_run": len(history), "stopped_early": bool(summary["stopped_early"]),
            "failures": restores["failures"], "resumes": restores["resumes"], "resumed": resumed,
            "run_path": run_path, "workers": workers, "global_batch_size": per_worker * world,
            "per_worker_batch_size": per_worker, "batch_norm": batch_norm, "device": "cuda" if use_gpu else "cpu",
            "seconds": round(time.perf_counter() - start, 3)}
    return model, info
