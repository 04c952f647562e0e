"""STFPM data-parallel training on Ray Train (V2): DDP student, frozen teacher, fault tolerant, resumable.

    driver: manifest (paths) --Ray Data--> [each block: its share of the epoch's seeded permutation, shards.py]
            --> [decode tasks: data.images.decode_batch] --streaming_split(W, equal=False)-->
    rank r: stfpm_worker.train_loop_per_worker(StfpmLoopConfig)
            ray.train.get_dataset_shard("train") -> stfpm_steps.run_epoch (engine.stfpm_epoch, DDP student)
            ray.train.get_dataset_shard("val")   -> engine.stfpm_val_loss -> all-reduced -> early stopping
            ray.train.report(metrics, checkpoint)  (every rank, once per epoch)

Where things are: this module is the driver (checks, datasets, TorchTrainer, the best checkpoint back into the
model); stfpm_worker the per-rank loop; stfpm_steps the Ray-free epoch (what DDP changes); checkpoints the
checkpoint content, the in-process store and the run to resume; faults the fault hooks tests inject.
Semantics (see README, "Distributed STFPM training"):

* `train_cfg.batch_size` is the GLOBAL batch: each of W workers takes ceil(B / W) images per step.
* The loss is summed over the images (like anomalib's); DDP would average the gradients over ranks, so the
  student's DDP wrapper gets a communication hook that SUMS them instead: one step's gradient is the gradient
  of the loss summed over the whole global batch, exactly as one process with batch B computes it.
* Uneven shards: no image is dropped (streaming_split(equal=False); Ray Train's default equal=True would drop
  up to W-1 images per epoch). A rank out of images takes part in each remaining step with an empty batch,
  so every rank runs the same number of optimizer steps (stfpm_steps.Ranks.lockstep).
* Batch norm in the student is per replica by default (as DDP does): W workers then compute exactly what one
  process computes when it normalises each worker's sub-batch by its own statistics and sums the losses
  ("ghost batch norm"; the running statistics are rank 0's), epoch after epoch -- not what one process with
  the whole batch B computes (tests/test_distributed_stfpm.py: 2 workers x 2 images match the ghost step to
  1e-6, and differ from the whole-batch step by 4e-2 to 0.26 relative on the weights, 5e-3 on the loss over
  3 epochs). `batch_norm="sync"` converts it to SyncBatchNorm (GPU only in torch: whole-batch statistics);
  `batch_norm="frozen"` uses running statistics (then W workers equal one process with batch B exactly).
* Checkpoints (rank 0 writes, every rank reports): student weights, optimizer, epoch, early-stopping state,
  history, torch RNG; kept by CheckpointConfig(num_to_keep, score "val_loss", order "min"); Ray always keeps
  the latest too. A worker that dies restarts the group (FailureConfig(max_failures)) from the latest one;
  `resume_from` continues an interrupted run. The best checkpoint becomes the model.
* Fault injection (tests, failure drills): `fault_hook(rank, epoch)`, e.g. faults.FaultPlan.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Queue

from distributed_anomaly import rundir
from distributed_anomaly import storage as shared
from distributed_anomaly.config import DEFAULT_RUNTIME, RUNTIMES, ModelConfig, TrainConfig
from distributed_anomaly.data.decode import decode_batch
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.data.sizes import ImageSize
from distributed_anomaly.distributed.checkpoints import LocalStore, best_state, find_run
from distributed_anomaly.distributed.cpus import STFPM_DECODE_CPUS, stfpm_decode_tasks
from distributed_anomaly.distributed.payload import model_payload
from distributed_anomaly.distributed.pool import check_cluster_cpus
from distributed_anomaly.distributed.shards import NoDropDataConfig, shuffled_blocks
from distributed_anomaly.distributed.stfpm_steps import BATCH_NORM_MODES
from distributed_anomaly.distributed.stfpm_worker import StfpmLoopConfig, train_loop_per_worker
from distributed_anomaly.errors import UserError
from distributed_anomaly.frozen import taps_blob
from distributed_anomaly.frozen_ir import check_precision
from distributed_anomaly.models.stfpm import Stfpm

# --------------------------------------------------------------------------------------------- data


def _datasets(
    fit_records: Sequence[Record],
    val_records: Sequence[Record],
    image_size: ImageSize,
    per_worker: int,
    seed: int,
    decode_tasks: int,
) -> dict[str, ray.data.Dataset]:
    """Ray Data pipelines of decoded images: training paths reshuffled every epoch (seeded), validation in order."""

    def build(records: Sequence[Record], shuffle: bool) -> ray.data.Dataset:
        n_blocks = max(1, math.ceil(len(records) / per_worker))
        if shuffle:
            # Each block takes its share of the epoch's seeded permutation (shards.shuffled_blocks): a new order
            # every epoch with no all-to-all exchange; decoding streams after it.
            blocks = ray.data.from_items([{"block": b} for b in range(n_blocks)], override_num_blocks=n_blocks)
            ds = blocks.map_batches(
                shuffled_blocks,
                fn_kwargs={"paths": [r.path for r in records], "seed": seed, "block_size": per_worker},
                batch_size=None,
                batch_format="numpy",
                num_cpus=STFPM_DECODE_CPUS,
                concurrency=decode_tasks,  # as the decode tasks: Ray Data fuses the two into one task per block
            )
        else:
            items = [{"idx": i, "path": r.path} for i, r in enumerate(records)]
            ds = ray.data.from_items(items, override_num_blocks=n_blocks)
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"image_size": image_size},
            batch_size=None,
            batch_format="numpy",
            num_cpus=STFPM_DECODE_CPUS,
            concurrency=decode_tasks,
        )
        ds.context.execution_options.preserve_order = True  # deterministic shard assignment (workers=0 too)
        ds.context.enable_progress_bars = False  # one line per epoch from us instead
        ds.context.print_on_execution_start = False
        return ds

    out = {"train": build(fit_records, True)}
    if val_records:
        out["val"] = build(val_records, False)
    return out


# --------------------------------------------------------------------------------------------- driver


def _check_args(model_cfg: ModelConfig, fit_records: Sequence[Record], workers: int, batch_norm: str) -> None:
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


def _run_location(storage: str | None, run_name: str, resume_from: str | None, local: bool) -> tuple[str, str]:
    """(storage, run_name) of the run: the interrupted run's when resuming, else a new folder (never reused)."""
    if resume_from is not None:
        return shared.split_last(find_run(shared.normalize(resume_from), local))
    storage = shared.normalize(storage or "~/ray_results")
    if shared.exists(shared.join(storage, run_name)):
        raise UserError(
            f"training run folder {shared.join(storage, run_name)} already exists: pass resume_from "
            "to continue it, or choose another run name / storage"
        )
    return storage, run_name


def _progress_printer(queue: Any) -> tuple[threading.Event, threading.Thread]:
    """Print the workers' progress lines here (Ray workers' output does not reach this terminal)."""
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


def _fit(trainer: TorchTrainer, queue: Any, run_path: str) -> Result:
    """trainer.fit() with the progress printer running and Ray Data's INFO lines muted; a failure says how
    to continue."""
    printer = _progress_printer(queue) if queue is not None else None
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # Ray Data's per-execution INFO lines (in this process for workers=0)
    try:
        result = trainer.fit()
    except Exception as exc:
        raise RuntimeError(
            f"STFPM training on Ray failed ({type(exc).__name__}: {exc}); its checkpoints are in "
            f"{run_path}: continue with resume_from={run_path!r}"
        ) from exc
    finally:
        data_logger.setLevel(saved_level)
        if printer is not None:
            printer[0].set()
            printer[1].join(timeout=5)
        if queue is not None:
            with contextlib.suppress(Exception):
                queue.shutdown()
    if result.return_value is None:
        raise RuntimeError(f"STFPM training on Ray returned no summary (run folder {run_path})")
    return result


def _info(summary: dict, **call: Any) -> dict:
    """train_stfpm_ray's info: the loop's summary (rank 0's) flattened, plus how this call ran."""
    restores = summary["restores"]
    return {
        "history": summary["history"],
        "images_per_epoch": summary["images_per_epoch"],
        "empty_steps_per_epoch": summary["empty_steps_per_epoch"],
        "best_epoch": int(summary["best_epoch"]),
        "best_val_loss": summary["best_val_loss"],
        "epochs_run": len(summary["history"]),
        "stopped_early": bool(summary["stopped_early"]),
        "failures": restores["failures"],
        "resumes": restores["resumes"],
        **call,
    }


def _checkpoint_config(num_to_keep: int, scored: bool) -> CheckpointConfig:
    """Keep the best `num_to_keep` by validation loss when there is one (Ray always keeps the latest too)."""
    if not scored:
        return CheckpointConfig(num_to_keep=num_to_keep)
    return CheckpointConfig(
        num_to_keep=num_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
    )


def _trainer(
    loop: StfpmLoopConfig, workers: int, cpus_per_worker: float, run: RunConfig, datasets: dict
) -> TorchTrainer:
    """The TorchTrainer of one run: gloo on CPU, NCCL on GPU; workers=0 is Ray Train's local mode."""
    local = workers == 0
    scaling = ScalingConfig(
        num_workers=workers,
        use_gpu=loop.use_gpu and not local,  # + 1 GPU per worker
        resources_per_worker=None if local else {"CPU": cpus_per_worker},
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.as_dict(),
        torch_config=TorchConfig(backend="nccl" if loop.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run,
        datasets=datasets,
        dataset_config=NoDropDataConfig(),
    )


def _teacher_ir(model: Stfpm, runtime: str, precision: str, use_gpu: bool, local: bool) -> Any:
    """The teacher's IR for the workers (by value in local mode, else one copy in the object store), or None for
    the torch teacher (asked for, or on GPUs, where OpenVINO's CPU plugin would be the slower device)."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    check_precision(precision)
    if runtime == "torch" or use_gpu:
        if precision != "f32":
            raise UserError("bf16 is an OpenVINO precision: the torch teacher computes in f32")
        return None
    blob = taps_blob(model)
    return blob if local else ray.put(blob)


# Over 60 lines: the public API's contract (a 36-line docstring over 20 keyword arguments) and the typed loop
# config built field by field; the rest is straight-line setup whose steps are the helpers above.
def train_stfpm_ray(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    fit_records: Sequence[Record],
    val_records: Sequence[Record],
    *,
    workers: int,
    storage: str | None = None,
    run_name: str = "stfpm",
    resume_from: str | None = None,
    progress: bool = True,
    model: Stfpm | None = None,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
    max_failures: int = 3,
    num_to_keep: int = 2,
    batch_norm: str = "replica",
    decode_tasks: int | None = None,
    epoch_eval: Callable[[Stfpm, int], dict] | None = None,
    callbacks: Sequence[Any] = (),
    fault_hook: Callable[[int, int], None] | None = None,
    runtime: str = DEFAULT_RUNTIME,
    precision: str = "f32",
) -> tuple[Stfpm, dict]:
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
        decode_tasks: Ray Data decode tasks in flight at most (default 2 per worker, STFPM_DECODE_CPUS each);
        max_failures: worker-group restarts from the latest checkpoint; num_to_keep: best checkpoints kept.
    epoch_eval: a picklable callable (model, epoch) -> {name: number} run on rank 0 after every epoch; its values
        join that epoch's reported metrics (hyperparameter search scores each epoch with it). It must leave the
        model as it found it. callbacks: Ray Train UserCallbacks of the run (e.g. Tune's TuneReportCallback,
        which forwards the per-epoch metrics to the Tune trial that called this; Ray Train's local mode,
        workers=0, runs none).
    runtime: the frozen teacher's (frozen.RUNTIMES): on "openvino" (CPU workers) the driver converts it once and
        every worker compiles that IR at `precision`; on GPUs, or "torch", the teacher runs in torch.
    fault_hook: a picklable callable (rank, epoch) called on every rank at the start of every epoch, once the
        previous epoch's checkpoint is registered: tests and failure drills kill or fail a worker with it
        (faults.FaultPlan).
    info: history (engine.EpochResult dicts, each epoch once), images_per_epoch, empty_steps_per_epoch (steps a
        rank took without images, summed over ranks), best_epoch, best_val_loss, epochs_run,
        stopped_early, failures (worker-group restarts from a checkpoint, all calls of this run), resumes
        (resume_from calls that found a checkpoint), resumed (this call), run_path, workers, global_batch_size,
        per_worker_batch_size, batch_norm, device, teacher_runtime, seconds.
    """
    _check_args(model_cfg, fit_records, workers, batch_norm)
    tcfg = train_cfg.resolved("stfpm")
    use_gpu = torch.cuda.is_available() if use_gpu is None else bool(use_gpu)
    if batch_norm == "sync" and not use_gpu and workers > 1:
        raise UserError("batch_norm='sync' needs GPUs (torch's SyncBatchNorm has no CPU implementation)")
    local, world = workers == 0, max(workers, 1)
    per_worker = max(1, math.ceil(tcfg.batch_size / world))
    if not local:
        check_cluster_cpus(workers, cpus_per_worker, STFPM_DECODE_CPUS)
    storage, run_name = _run_location(storage, run_name, resume_from, local)
    run_path = shared.join(storage, run_name)
    if model is None:
        model = rundir.build_model(model_cfg, pretrained=tcfg.pretrained, weights_file=tcfg.weights_file)
    queue = Queue(actor_options={"num_cpus": 0}) if progress and not local else None
    teacher_ir = _teacher_ir(model, runtime, precision, use_gpu, local)
    loop = StfpmLoopConfig(
        payload=model_payload(model) if local else ray.put(model_payload(model)),
        fit_id=uuid.uuid4().hex,
        **{k: getattr(tcfg, k) for k in ("epochs", "lr", "momentum", "weight_decay", "patience")},
        per_worker_batch=per_worker,
        image_size=model_cfg.image_size,
        batch_norm=batch_norm,
        has_val=bool(val_records),
        local=local,
        use_gpu=use_gpu,
        threads=max(1, int(cpus_per_worker)),
        teacher_ir=teacher_ir,
        precision=precision,
        num_to_keep=num_to_keep,
        local_store=run_path if local else None,
        progress=progress,
        progress_queue=queue,
        epoch_eval=epoch_eval,
        fault_hook=fault_hook,
    )
    datasets = _datasets(
        fit_records,
        val_records,
        model_cfg.image_size,
        per_worker,
        model_cfg.seed,
        decode_tasks or stfpm_decode_tasks(world),
    )
    run = RunConfig(
        name=run_name,
        storage_path=storage,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=_checkpoint_config(num_to_keep, bool(val_records)),
        callbacks=list(callbacks),
    )
    trainer = _trainer(loop, workers, cpus_per_worker, run, datasets)
    start = time.perf_counter()
    result = _fit(trainer, queue, run_path)
    summary = result.return_value
    store = LocalStore(run_path, num_to_keep, bool(val_records)) if local else None
    model.student.load_state_dict(best_state(result, run_path, int(summary["best_epoch"]), store)["student"])
    model.eval()
    return model, _info(
        summary,
        resumed=resume_from is not None,
        run_path=run_path,
        workers=workers,
        global_batch_size=per_worker * world,
        per_worker_batch_size=per_worker,
        batch_norm=batch_norm,
        device="cuda" if use_gpu else "cpu",
        teacher_runtime="torch" if teacher_ir is None else "openvino",
        seconds=round(time.perf_counter() - start, 3),
    )
