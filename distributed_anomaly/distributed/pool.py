"""The Ray Data actor-pool pipeline shared by the PADIM fit and by scoring, and the checks made before it starts.

    manifest (paths) --from_items--> [decode tasks: data.decode.decode_batch] --> [actor pool: a callable class]
                     --> output batches (numpy dicts) back to the driver
    (or, decode_in_actors: manifest --> [actor pool: decode_batch, then the callable] --> driver)

Blocks of at most `batch_size` consecutive images are the unit of work end to end; the pool is fully started
before the first batch is dispatched; the object-store budget for decoded batches is a constant. See
padim_fit (the fit's actors) and scoring (batch inference) for what runs in the pool.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import ray
from ray.data import DataContext, ExecutionResources

from distributed_anomaly.data.decode import decode_batch
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.data.sizes import ImageSize, as_hw
from distributed_anomaly.distributed.cpus import PADIM_DECODE_CPUS, padim_decode_tasks
from distributed_anomaly.errors import UserError

# Ray Data starts the pool's actors, then feeds whichever is ready: on a small dataset the first actor up can
# take every batch while the others still import torch (a node left idle). The pool is awaited (up to this long)
# before any batch is dispatched, so every worker gets its share.
POOL_START_TIMEOUT_S = 600
# A node with at most this many logical CPUs decodes inside its pool actors (decode_in_actors_default).
FEW_CPUS = 8


def check_cluster_cpus(workers: int, cpus_per_worker: float, decode_cpus: float) -> None:
    """Refuse up front a pool the cluster cannot hold (it would wait for CPUs forever)."""
    total = ray.cluster_resources().get("CPU", 0.0)
    need = workers * cpus_per_worker + decode_cpus
    if total < need:
        raise UserError(
            f"the Ray cluster has {total:g} logical CPUs; {workers} workers x {cpus_per_worker:g} CPUs "
            f"plus {decode_cpus:g} for decoding need {need:g} (use fewer workers, fewer CPUs per worker, "
            "or add nodes)"
        )


def require_ray() -> None:
    """The pipelines join the driver's Ray; they never start one behind the caller's back."""
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call distributed_anomaly.distributed.ensure_ray() first")


def check_pool_args(batch_size: int, workers: int, cpus_per_worker: float) -> None:
    """Arguments a pool cannot run with, refused before anything starts."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    check_cluster_cpus(workers, cpus_per_worker, PADIM_DECODE_CPUS)


def default_threads(cpus_per_worker: float, threads_per_worker: int | None) -> int:
    """Threads of a pool actor (torch's or OpenVINO's): as many as the logical CPUs it reserved, unless told."""
    return max(1, int(threads_per_worker if threads_per_worker is not None else cpus_per_worker))


def resolve(payload: Any) -> Any:
    """A model payload passed by reference (ray.put once, shared by every actor) or by value."""
    return ray.get(payload) if isinstance(payload, ray.ObjectRef) else payload


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def object_store_budget(image_size: ImageSize, batch_size: int, workers: int) -> int:
    """Room for a few decoded batches per actor in flight; a constant, whatever the number of images."""
    height, width = as_hw(image_size)
    batch_bytes = batch_size * 3 * height * width * 4
    return int(max(256 << 20, 4 * (workers + 1) * batch_bytes))


@contextlib.contextmanager
def quiet_data_context(image_size: ImageSize, batch_size: int, workers: int) -> Iterator[None]:
    """Ray Data without progress bars or INFO logs, a capped object-store budget and a whole pool started before
    the first batch; the previous settings come back on exit."""
    ctx = DataContext.get_current()
    saved = (
        ctx.enable_progress_bars,
        ctx.print_on_execution_start,
        ctx.execution_options.resource_limits,
        ctx.wait_for_min_actors_s,
    )
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    try:
        data_logger.setLevel(logging.ERROR)
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.wait_for_min_actors_s = POOL_START_TIMEOUT_S
        ctx.execution_options.resource_limits = ExecutionResources.for_limits(
            object_store_memory=object_store_budget(image_size, batch_size, workers)
        )
        yield
    finally:
        (
            ctx.enable_progress_bars,
            ctx.print_on_execution_start,
            ctx.execution_options.resource_limits,
            ctx.wait_for_min_actors_s,
        ) = saved
        data_logger.setLevel(saved_level)


def decode_in_actors_default() -> bool:
    """Decode inside the pool actors when the smallest node has few logical CPUs (FEW_CPUS): there a decode task
    is one more process competing for the same cores, and its pixels one more copy through the object store;
    on larger nodes separate decode tasks keep the actors' cores on the frozen network."""
    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return min(cpus, default=0.0) <= FEW_CPUS


@contextlib.contextmanager
def pool_pipeline(
    records: Sequence[Record],
    image_size: ImageSize,
    batch_size: int,
    workers: int,
    cpus_per_worker: float,
    udf: type,
    ctor_args: tuple,
    decode_in_actors: bool = False,
) -> Iterator[Iterator[dict[str, np.ndarray]]]:
    """Run paths -> decode tasks -> actor pool `udf`; yields an iterator over its output batches (numpy dicts).

    Blocks of at most `batch_size` consecutive images are the unit of work end to end (no batch_size
    re-bundling: Ray Data would merge small blocks and hand one actor most of a small dataset). With
    `decode_in_actors` there are no decode tasks: the actors get batches of paths and decode them
    (data.decode.decode_batch) themselves.
    """
    it = None
    with quiet_data_context(image_size, batch_size, workers):
        try:
            items = [{"idx": i, "path": r.path} for i, r in enumerate(records)]
            ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
            if not decode_in_actors:
                # Decoding is cheap next to the backbone: workers + 1 concurrent decode tasks keep the pool fed,
                # and bound the number of decode worker processes.
                ds = ds.map_batches(
                    decode_batch,
                    fn_kwargs={"image_size": image_size},
                    batch_size=None,
                    batch_format="numpy",
                    num_cpus=PADIM_DECODE_CPUS,
                    compute=ray.data.TaskPoolStrategy(size=padim_decode_tasks(workers)),
                )
            ds = ds.map_batches(
                udf,
                fn_constructor_args=ctor_args,
                batch_size=None,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=cpus_per_worker,
            )
            it = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
            yield it
        finally:
            close = getattr(it, "close", None)  # stops the execution now (not at garbage collection) on errors
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
