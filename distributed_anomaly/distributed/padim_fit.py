"""PADIM fitting as a Ray Data pipeline: exact statistics, memory independent of the dataset.

    driver: manifest (paths) --from_items--> [decode tasks: read_image + to_tensor]
            --> [actor pool: frozen backbone] --deviations--> [NodePartials actor of that node: one partial per worker]
            --> one small row per image back to the driver; at the end the driver merges the partials.

Getting state out of a Ray Data actor pool: a callable class gets no "end of input" call and Ray Data retires
the actors itself, so the partial statistics do not live in the pool actors. Each pool actor, when it starts,
asks the fit's PartialRegistry (an actor owned by the driver) for the NodePartials actor of its own node, and
folds each batch's deviations into its partial there (exact moment updates, stats.MomentAccumulator), waiting
for the fold before it returns the batch's rows. The partials thus outlive the pool, and the driver reads them back with
ordinary method calls, one chunk of patch positions at a time, merging into one accumulator. Flushing from the
pool actor's `__del__` does not work: objects it creates there (ray.put, large task arguments) get the same
ObjectID in every actor (nil task context at shutdown, Ray 2.60), so partials silently overwrite each other.

Nothing is trusted blindly: every image must come back exactly once as a row naming the worker that folded
it, and each worker's partial must hold exactly that many images, else the fit fails with a message (never a
silently smaller fit). Memory: the driver holds the manifest, one row per image, one accumulator (P, C, C)
and two chunks (<= CHUNK_BYTES each); a node holds its workers' backbones and partials and a batch of
embeddings per worker; Ray Data's object-store budget for decoded batches is capped
(pool.object_store_budget) and decoding runs in at most workers + 1 tasks. None of this grows with the
number of images. See README.md, "Distributed PADIM fitting".

The pipeline itself (pool.py) is shared with scoring (scoring.py); models travel as payloads (payload.py).
"""

from __future__ import annotations

import contextlib
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distributed_anomaly import engine
from distributed_anomaly.config import DEFAULT_RUNTIME
from distributed_anomaly.data.loader import Progress
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.distributed.payload import build_from_payload, model_payload
from distributed_anomaly.distributed.pool import (
    check_pool_args,
    default_threads,
    pool_pipeline,
    require_ray,
    resolve,
    set_threads,
    warn,
)
from distributed_anomaly.errors import ImageReadError, UserError
from distributed_anomaly.frozen import patch_runtime
from distributed_anomaly.models.padim import Padim
from distributed_anomaly.stats import GaussianStats, MomentAccumulator

# A partial moves in chunks of whole patch positions of at most this many bytes (m2 dominates).
CHUNK_BYTES = 64 << 20


def chunk_bounds(n_positions: int, n_features: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """Position ranges [p0, p1) whose co-moment slice is at most CHUNK_BYTES (at least one position each)."""
    per_position = n_features * n_features * torch.empty((), dtype=dtype).element_size()
    step = max(1, CHUNK_BYTES // per_position)
    return [(p, min(p + step, n_positions)) for p in range(0, n_positions, step)]


# --------------------------------------------------------------------------------------------- actors


class NodePartials:
    """The partial statistics of the pool actors on one node, one MomentAccumulator per worker (a threaded
    actor). Created by the PartialRegistry, so owned by the fit, not by Ray Data's pool: the partials outlive
    the pool actors."""

    def __init__(self, n_positions: int, n_features: int, dtype: str, threads: int) -> None:
        set_threads(threads)
        # Deviations arrive as read-only object-store buffers that are only read: once, for this actor's
        # process (catch_warnings per call would race between the concurrent calls of this threaded actor).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.shape = (n_positions, n_features)
        self.dtype = getattr(torch, dtype)
        self.partials: dict[str, MomentAccumulator] = {}

    def update(self, worker: str, dev: np.ndarray, dev_sum: np.ndarray, shift: np.ndarray | None) -> int:
        """Fold a batch of deviations (B, P, C) from `worker`'s shift (sent with its first batch) into its
        partial. Each worker calls this serially."""
        acc = self.partials.get(worker)
        if acc is None:
            acc = self.partials.setdefault(worker, MomentAccumulator(*self.shape))
        if shift is not None:
            acc.set_shift(torch.from_numpy(shift))
        acc.add_deviations(torch.from_numpy(dev), torch.from_numpy(dev_sum))
        return acc.count

    def chunk(self, worker: str, p0: int, p1: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Positions [p0, p1) of `worker`'s partial as (count, mean, m2), in the accumulation dtype."""
        acc = self.partials[worker]
        stats = acc.stats_chunk(p0, p1, self.dtype)
        return acc.count, stats.mean.numpy(), stats.m2.numpy()

    def drop(self, worker: str) -> None:
        self.partials.pop(worker, None)


class PartialRegistry:
    """One per fit, owned by the driver: gives each pool actor the store actor of its node (`store_cls`:
    NodePartials for PADIM, patchcore_fit.NodeCoresets for PatchCore), created with `args`."""

    def __init__(self, store_cls: type, *args: Any) -> None:
        self.store_cls, self.args = store_cls, args
        self.node_stores: dict[str, Any] = {}
        self.worker_node: dict[str, str] = {}
        # The store of this (the driver's) node starts now, beside the pool actors, rather than when the first
        # of them asks: its process start (importing torch) is then off the path to the first batch.
        self._store(ray.get_runtime_context().get_node_id())

    def _store(self, node_id: str) -> Any:
        if node_id not in self.node_stores:
            self.node_stores[node_id] = (
                ray.remote(num_cpus=0, max_restarts=0, max_concurrency=64)(self.store_cls)
                .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True))
                .remote(*self.args)
            )
        return self.node_stores[node_id]

    def store_for(self, worker_id: str, node_id: str) -> list:
        store = self._store(node_id)
        self.worker_node[worker_id] = node_id
        return [store]  # in a list: a handle, not something to resolve

    def all(self) -> dict[str, tuple[str, list]]:
        return {w: (node, [self.node_stores[node]]) for w, node in self.worker_node.items()}

    def release(self) -> None:
        for store in self.node_stores.values():
            ray.kill(store)
        self.node_stores.clear()


@contextlib.contextmanager
def partial_registry(store_cls: type, *args: Any) -> Iterator[Any]:
    """A PartialRegistry actor on the driver's node for one fit; its stores and itself are killed on exit."""
    registry = (
        ray.remote(num_cpus=0, max_restarts=0)(PartialRegistry)
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True))
        .remote(store_cls, *args)
    )
    try:
        yield registry
    finally:
        with contextlib.suppress(Exception):
            ray.get(registry.release.remote(), timeout=30)
        ray.kill(registry)


class PoolFolder:
    """A pool actor (map_batches callable class) that folds its share of the images into its own partial in
    its node's store, waiting for each fold before it reports the images (exact accounting). Subclasses say
    what is built (`setup`) and folded (`fold`)."""

    def __init__(self, payload: Any, registry: Any, threads: int, runtime: str) -> None:
        set_threads(threads)
        self.worker_id = uuid.uuid4().hex
        self.node_id = ray.get_runtime_context().get_node_id()
        store = registry.store_for.remote(self.worker_id, self.node_id)  # starts while the model is built
        self.model = build_from_payload(resolve(payload))
        self.setup(runtime, threads)
        self.store = ray.get(store)[0]

    def setup(self, runtime: str, threads: int) -> None:
        raise NotImplementedError

    def fold(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], dtype=bool)
        if ok.any():
            self.fold(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
        n = len(ok)
        return {
            "idx": batch["idx"],
            "ok": ok,
            "error": batch["error"],
            "worker": np.full(n, self.worker_id),
            "node": np.full(n, self.node_id),
        }


class PadimEmbedder(PoolFolder):
    """PADIM's pool actor: the frozen backbone (on `runtime`), deviations folded into moment accumulators."""

    def setup(self, runtime: str, threads: int) -> None:
        self.frozen = patch_runtime(self.model, runtime, threads)
        self.shift: torch.Tensor | None = None  # this worker's: the mean of its first batch

    def _deviations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
        if self.shift is not None:
            return (*self.frozen(x, self.shift), None)
        patches, _ = self.frozen(x, torch.zeros(self.model.n_positions, self.model.n_features))
        self.shift = patches.mean(0)
        dev = patches - self.shift
        return dev, dev.sum(0), self.shift.numpy()

    def fold(self, x: torch.Tensor) -> None:
        with torch.inference_mode():
            dev, dev_sum, shift = self._deviations(x)
        ray.get(self.store.update.remote(self.worker_id, dev.numpy(), dev_sum.numpy(), shift))


# --------------------------------------------------------------------------------------------- driver side


@dataclass
class FitTally:
    """The driver's account of the rows that came back: every image once, each folded by a known worker."""

    records: Sequence[Record]
    skip_corrupt: bool
    model: str = "PADIM"
    min_images: int = 2
    seen: np.ndarray = field(init=False)
    rows_per_worker: Counter = field(default_factory=Counter)  # images each worker folded in (readable rows)
    node_of: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first_out: float | None = None  # times of the first and last output batch: start-up vs steady state
    last_out: float | None = None
    n_first: int = 0
    n_out: int = 0

    def __post_init__(self) -> None:
        self.seen = np.zeros(len(self.records), dtype=bool)

    def add(self, out: dict[str, np.ndarray]) -> None:
        self.last_out = time.perf_counter()
        self.n_out += 1
        if self.first_out is None:
            self.first_out, self.n_first = self.last_out, len(out["idx"])
        for idx, ok, err, worker, node in zip(out["idx"], out["ok"], out["error"], out["worker"], out["node"]):
            if self.seen[idx]:
                raise RuntimeError(f"image {self.records[idx].path} was processed twice")
            self.seen[idx] = True
            self.node_of[str(worker)] = str(node)
            if ok:
                self.rows_per_worker[str(worker)] += 1
            elif self.skip_corrupt:
                self.skipped.append(self.records[idx].path)
                warn(f"skipping unreadable image: {err}")
            else:
                raise ImageReadError(f"{err} (use --skip-corrupt to leave unreadable images out of the fit)")

    def check_complete(self) -> None:
        if not self.seen.all():
            missing = np.flatnonzero(~self.seen)
            raise RuntimeError(
                f"{len(missing)} images never came back from the pipeline (first: {self.records[missing[0]].path})"
            )
        n_images = len(self.records) - len(self.skipped)
        if n_images < self.min_images:
            raise UserError(
                f"{self.model} needs at least {self.min_images} readable training image(s), got {n_images} "
                f"({len(self.skipped)} unreadable skipped)"
            )

    def info(self, images: int, **extra: Any) -> dict:
        n = len(self.records)
        seconds = time.perf_counter() - self.started
        steady = (
            round((n - self.n_first) / (self.last_out - self.first_out), 2)
            if self.n_out >= 4 and self.last_out > self.first_out
            else None
        )
        return {
            "images": images,
            "manifest_images": n,
            "skipped": self.skipped,
            "num_skipped": len(self.skipped),
            "workers": [
                {"worker": w, "node": self.node_of[w], "images": k} for w, k in sorted(self.rows_per_worker.items())
            ],
            "nodes": sorted({self.node_of[w] for w in self.rows_per_worker}),
            "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 2),
            # Start-up (actors, model load) until the first batch is out; then the pipeline's steady rate.
            "startup_s": round(self.first_out - self.started, 3),
            "steady_images_per_s": steady,
            **extra,
        }


def fold_on_pool(tally: FitTally, pool: tuple, udf: type, ctor_args: tuple, progress: bool) -> None:
    """Run the fit's pipeline (pool: image size, batch size, workers, CPUs per worker) with pool actors `udf`,
    accounting for every row in `tally`; checks that every image came back."""
    records, workers = tally.records, pool[2]
    bar = Progress(len(records), f"fit {tally.model.lower()} (ray, {workers} workers)", progress)
    with pool_pipeline(records, *pool, udf, ctor_args) as batches:
        for out in batches:
            tally.add(out)
            bar.update(len(out["idx"]))
    bar.close()
    tally.check_complete()
    if tally.skipped:
        warn(f"{len(tally.skipped)} of {len(records)} training images were unreadable and left out of the fit")


def fit_padim_ray(
    model: Padim,
    records: Sequence[Record],
    *,
    batch_size: int,
    workers: int,
    progress: bool = True,
    skip_corrupt: bool = False,
    cpus_per_worker: float = 1.0,
    threads_per_worker: int | None = None,
    runtime: str = DEFAULT_RUNTIME,
) -> tuple[GaussianStats, dict]:
    """Fit PADIM's Gaussians on a Ray cluster (Ray must be initialised: see ensure_ray); same result as
    engine.fit_padim up to float64 rounding. Sets the model's mean/inv_cov and returns (stats, info).

    workers: size of the actor pool running the backbone; each actor reserves `cpus_per_worker` logical CPUs
    and runs its frozen backbone on `runtime` with `threads_per_worker` threads (default: cpus_per_worker).
    skip_corrupt: an unreadable image is skipped with a warning (listed in info) instead of stopping the fit.
    info: images (counted), manifest_images, skipped (paths), num_skipped, workers [{worker, node, images}],
    nodes, seconds, images_per_s (end to end), startup_s (until the first batch), steady_images_per_s, dtype.
    """
    if len(records) < 2:
        raise UserError(f"PADIM needs at least 2 training images, got {len(records)}")
    require_ray()
    check_pool_args(batch_size, workers, cpus_per_worker)
    tally = FitTally(records, skip_corrupt)
    model.eval()
    acc = engine.empty_stats(model)
    threads = default_threads(cpus_per_worker, threads_per_worker)
    payload = ray.put(model_payload(model, with_gaussian=False))
    dtype = str(acc.dtype).replace("torch.", "")
    with partial_registry(NodePartials, model.n_positions, model.n_features, dtype, threads) as registry:
        pool = (model.image_size, batch_size, workers, cpus_per_worker)
        fold_on_pool(tally, pool, PadimEmbedder, (payload, registry, threads, runtime), progress)
        _merge_partials(registry, tally.rows_per_worker, tally.node_of, acc)
    model.set_gaussian(acc)
    return acc, tally.info(acc.count, dtype=dtype)


def _merge_partials(registry: Any, rows_per_worker: Counter, node_of: dict[str, str], acc: GaussianStats) -> None:
    """Merge every worker's partial into `acc` (empty), one chunk of positions at a time, checking counts.

    Each chunk is the return value of an ordinary method call, so the driver owns it; at most two chunks
    (the one merged and the next, prefetched) exist at once.
    """
    stores = ray.get(registry.all.remote())
    expected = {w: n for w, n in rows_per_worker.items() if n > 0}
    missing = sorted(set(expected) - set(stores))
    if missing:
        raise RuntimeError(f"worker {missing[0]} on node {node_of[missing[0]]} has no statistics store")
    bounds = chunk_bounds(acc.mean.shape[0], acc.mean.shape[1], acc.dtype)
    total = 0
    for worker, n in sorted(expected.items()):
        store = stores[worker][1][0]
        refs = [store.chunk.remote(worker, p0, p1) for p0, p1 in bounds[:2]]
        for i, (p0, p1) in enumerate(bounds):
            try:
                count, mean, m2 = ray.get(refs[i])
            except ray.exceptions.RayActorError as exc:
                raise RuntimeError(
                    f"the statistics of worker {worker} on node {node_of[worker]} ({n} images) were lost: {exc}"
                ) from exc
            refs[i] = None  # release the chunk once merged
            if i + 2 < len(bounds):
                refs.append(store.chunk.remote(worker, *bounds[i + 2]))
            if count != n:
                raise RuntimeError(
                    f"worker {worker} on node {node_of[worker]} reported {n} images but its "
                    f"statistics count {count}: the fit is inconsistent"
                )
            part = GaussianStats(count, torch.from_numpy(np.array(mean)), torch.from_numpy(np.array(m2)))
            del mean, m2
            # A view of the accumulator's positions [p0, p1): merge_ updates it in place.
            GaussianStats(total, acc.mean[p0:p1], acc.m2[p0:p1]).merge_(part)
        store.drop.remote(worker)  # free it on its node as soon as it is merged
        total += n
    acc.count = total
