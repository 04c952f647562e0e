"""PADIM fitting and scoring as Ray Data pipelines: exact statistics, memory independent of the dataset.

    driver: manifest (paths) --from_items--> [decode tasks: read_image + to_tensor]
            --> [actor pool: backbone] --embeddings--> [NodePartials actor of that node: one partial per worker]
            --> one small row per image back to the driver; at the end the driver merges the partials.

Getting state out of a Ray Data actor pool: a callable class gets no "end of input" call and Ray Data retires
the actors itself, so the partial statistics do not live in the pool actors. Each pool actor, when it starts,
asks the fit's PartialRegistry (an actor owned by the driver) for the NodePartials actor of its own node, and
folds each batch's embeddings into its partial there (exact Chan updates, stats.py), waiting for the fold
before it returns the batch's rows. The partials thus outlive the pool, and the driver reads them back with
ordinary method calls, one chunk of patch positions at a time, merging into one accumulator. Flushing from the
pool actor's `__del__` does not work: objects it creates there (ray.put, large task arguments) get the same
ObjectID in every actor (nil task context at shutdown, Ray 2.60), so partials silently overwrite each other.

Nothing is trusted blindly: every image must come back exactly once as a row naming the worker that folded
it, and each worker's partial must hold exactly that many images, else the fit fails with a message (never a
silently smaller fit). Memory: the driver holds the manifest, one row per image, one accumulator (P, C, C)
and two chunks (<= CHUNK_BYTES each); a node holds its workers' backbones and partials and a batch of
embeddings per worker; Ray Data's object-store budget for decoded batches is capped (`_object_store_budget`)
and decoding runs in at most workers + 1 tasks. None of this grows with the number of images.
See README.md, "Distributed PADIM fitting".
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import uuid
import warnings
from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distributed_anomaly import engine
from distributed_anomaly.data.images import decode_batch
from distributed_anomaly.data.loader import Progress
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.errors import ImageReadError, UserError
from distributed_anomaly.models.padim import Padim
from distributed_anomaly.models.stfpm import Stfpm
from distributed_anomaly.stats import GaussianStats

# A partial moves in chunks of whole patch positions of at most this many bytes (m2 dominates).
CHUNK_BYTES = 64 << 20
# Logical CPUs of one decode task; differs from the actors' so Ray Data does not fuse decoding into them.
# decode_batch lives in the data layer, which imports torch but not torchvision or this module: a decode
# worker's imports take 1.75 s of CPU instead of 4.2 s (python -X importtime, this machine).
DECODE_CPUS = 0.5
# Ray Data starts the pool's actors, then feeds whichever is ready: on a small dataset the first actor up can
# take every batch while the others still import torch (a node left idle). The pool is awaited (up to this long)
# before any batch is dispatched, so every worker gets its share.
POOL_START_TIMEOUT_S = 600


# --------------------------------------------------------------------------------------------- model transfer

def model_payload(model: torch.nn.Module, *, with_gaussian: bool = True) -> dict[str, Any]:
    """What an actor needs to rebuild `model` without downloading weights: constructor args + state dict."""
    drop = () if with_gaussian else ("mean", "inv_cov")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in drop}
    if isinstance(model, Padim):
        return {"kind": "padim", "state": state,
                "kwargs": dict(backbone=model.extractor.backbone, layers=list(model.extractor.layers),
                               n_features=model.n_features, image_size=model.image_size)}
    if isinstance(model, Stfpm):
        return {"kind": "stfpm", "state": state,
                "kwargs": dict(backbone=model.teacher.backbone, layers=list(model.teacher.layers),
                               image_size=model.image_size)}
    return {"kind": "module", "module": model}  # anything else travels pickled


def build_from_payload(payload: dict[str, Any]) -> torch.nn.Module:
    if payload["kind"] == "module":
        module = payload["module"]
    else:
        cls = Padim if payload["kind"] == "padim" else Stfpm
        module = cls(**payload["kwargs"], pretrained=False)
        missing, unexpected = module.load_state_dict(payload["state"], strict=False)
        if unexpected or set(missing) - {"mean", "inv_cov"}:
            raise RuntimeError(f"model state does not fit the rebuilt {payload['kind']}: missing {missing}, "
                               f"unexpected {unexpected}")
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- pipeline pieces

def chunk_bounds(n_positions: int, n_features: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """Position ranges [p0, p1) whose co-moment slice is at most CHUNK_BYTES (at least one position each)."""
    per_position = n_features * n_features * torch.empty((), dtype=dtype).element_size()
    step = max(1, CHUNK_BYTES // per_position)
    return [(p, min(p + step, n_positions)) for p in range(0, n_positions, step)]


def _set_threads(threads: int) -> None:
    torch.set_num_threads(max(1, int(threads)))


class NodePartials:
    """The partial GaussianStats of the pool actors on one node, one per worker (a threaded actor). Created by
    the PartialRegistry, so owned by the fit, not by Ray Data's pool: the partials outlive the pool actors."""

    def __init__(self, n_positions: int, n_features: int, dtype: str, threads: int) -> None:
        _set_threads(threads)
        # Embeddings arrive as read-only object-store buffers that from_batch only reads: once, for this actor's
        # process (catch_warnings per call would race between the concurrent calls of this threaded actor).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.shape = (n_positions, n_features)
        self.dtype = getattr(torch, dtype)
        self.partials: dict[str, GaussianStats] = {}

    def update(self, worker: str, embeddings: np.ndarray) -> int:
        """Fold a batch of embeddings (B, C, P) into `worker`'s partial. Each worker calls this serially."""
        stats = self.partials.get(worker)
        if stats is None:
            stats = self.partials.setdefault(worker, GaussianStats.empty(*self.shape, self.dtype))
        stats.update(torch.from_numpy(embeddings))
        return stats.count

    def chunk(self, worker: str, p0: int, p1: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Positions [p0, p1) of `worker`'s partial as (count, mean, m2), in the accumulation dtype."""
        stats = self.partials[worker]
        return stats.count, stats.mean[p0:p1].numpy(), stats.m2[p0:p1].numpy()

    def drop(self, worker: str) -> None:
        self.partials.pop(worker, None)


class PartialRegistry:
    """One per fit, owned by the driver: gives each pool actor the NodePartials actor of its node."""

    def __init__(self, n_positions: int, n_features: int, dtype: str, threads: int) -> None:
        self.args = (n_positions, n_features, dtype, threads)
        self.node_stores: dict[str, Any] = {}
        self.worker_node: dict[str, str] = {}
        # The store of this (the driver's) node starts now, beside the pool actors, rather than when the first
        # of them asks: its process start (importing torch) is then off the path to the first batch.
        self._store(ray.get_runtime_context().get_node_id())

    def _store(self, node_id: str) -> Any:
        if node_id not in self.node_stores:
            self.node_stores[node_id] = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=64)(
                NodePartials).options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True)
                                      ).remote(*self.args)
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


class PadimEmbedder:
    """Pool actor (map_batches callable class): runs the backbone on its share of the images and folds the
    embeddings into its own partial (in its node's NodePartials), waiting for each fold before it reports
    the images."""

    def __init__(self, payload: Any, registry: Any, threads: int) -> None:
        _set_threads(threads)
        self.worker_id = uuid.uuid4().hex
        self.node_id = ray.get_runtime_context().get_node_id()
        store = registry.store_for.remote(self.worker_id, self.node_id)  # starts while the model is built
        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        self.model = build_from_payload(payload)
        self.store = ray.get(store)[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], dtype=bool)
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            with torch.inference_mode():
                emb = self.model.embed(x).contiguous().numpy()
            ray.get(self.store.update.remote(self.worker_id, emb))  # folded before these rows are reported: exact accounting
        n = len(ok)
        return {"idx": batch["idx"], "ok": ok, "error": batch["error"],
                "worker": np.full(n, self.worker_id), "node": np.full(n, self.node_id)}


class ModelScorer:
    """Pool actor for batch inference: (B, 3, S, S) -> raw anomaly maps (B, S, S)."""

    def __init__(self, payload: Any, threads: int) -> None:
        _set_threads(threads)
        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        self.model = build_from_payload(payload)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], dtype=bool)
        pixels = batch["pixels"]
        maps = np.zeros((len(ok), pixels.shape[-2], pixels.shape[-1]), dtype=np.float32)
        if ok.any():
            with torch.inference_mode():
                maps[ok] = self.model(torch.from_numpy(np.ascontiguousarray(pixels[ok])))[:, 0].numpy()
        return {"idx": batch["idx"], "ok": ok, "error": batch["error"], "map": maps}


# --------------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _pipeline(records: Sequence[Record], image_size: int, batch_size: int, workers: int, cpus_per_worker: float,
              udf: type, ctor_args: tuple) -> Iterator[Iterator[dict[str, np.ndarray]]]:
    """Run paths -> decode tasks -> actor pool `udf`; yields an iterator over its output batches (numpy dicts).

    Blocks of at most `batch_size` consecutive images are the unit of work end to end (no batch_size
    re-bundling: Ray Data would merge small blocks and hand one actor most of a small dataset). Inside the
    with-block, Ray Data's progress bars and INFO logs are off, its object-store budget is capped and the whole
    pool is started before the first batch is dispatched.
    """
    from ray.data import DataContext, ExecutionResources

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.resource_limits,
             ctx.wait_for_min_actors_s)
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    it = None
    try:
        data_logger.setLevel(logging.ERROR)
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.wait_for_min_actors_s = POOL_START_TIMEOUT_S
        ctx.execution_options.resource_limits = ExecutionResources.for_limits(
            object_store_memory=_object_store_budget(image_size, batch_size, workers))
        items = [{"idx": i, "path": r.path} for i, r in enumerate(records)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
        # Decoding is cheap next to the backbone: workers + 1 concurrent decode tasks keep the pool fed, and
        # bound the number of decode worker processes (each imports torch: ~0.3 GB).
        ds = ds.map_batches(decode_batch, fn_kwargs={"image_size": image_size}, batch_size=None,
                            batch_format="numpy", num_cpus=DECODE_CPUS,
                            compute=ray.data.TaskPoolStrategy(size=decode_task_count(workers)))
        ds = ds.map_batches(udf, fn_constructor_args=ctor_args, batch_size=None, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker)
        it = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
        yield it
    finally:
        close = getattr(it, "close", None)  # stops the execution now (not at garbage collection) on errors
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.resource_limits,
         ctx.wait_for_min_actors_s) = saved
        data_logger.setLevel(saved_level)


def decode_task_count(workers: int) -> int:
    """Decode tasks in flight at most for a pool of `workers` (tuning.search budgets CPUs with it)."""
    return workers + 1


def _object_store_budget(image_size: int, batch_size: int, workers: int) -> int:
    """Room for a few decoded batches per actor in flight; a constant, whatever the number of images."""
    batch_bytes = batch_size * 3 * image_size * image_size * 4
    return int(max(256 << 20, 4 * (workers + 1) * batch_bytes))


def check_cluster_cpus(workers: int, cpus_per_worker: float, decode_cpus: float) -> None:
    """Refuse up front a pool the cluster cannot hold (it would wait for CPUs forever)."""
    total = ray.cluster_resources().get("CPU", 0.0)
    need = workers * cpus_per_worker + decode_cpus
    if total < need:
        raise UserError(f"the Ray cluster has {total:g} logical CPUs; {workers} workers x {cpus_per_worker:g} CPUs "
                        f"plus {decode_cpus:g} for decoding need {need:g} (use fewer workers, fewer CPUs per worker, "
                        "or add nodes)")


def _check_args(batch_size: int, workers: int, cpus_per_worker: float) -> None:
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    check_cluster_cpus(workers, cpus_per_worker, DECODE_CPUS)


def _default_threads(cpus_per_worker: float, threads_per_worker: int | None) -> int:
    return max(1, int(threads_per_worker if threads_per_worker is not None else cpus_per_worker))


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- public API

def fit_padim_ray(model: Padim, records: Sequence[Record], *, batch_size: int, workers: int, progress: bool = True,
                  skip_corrupt: bool = False, cpus_per_worker: float = 1.0,
                  threads_per_worker: int | None = None) -> tuple[GaussianStats, dict]:
    """Fit PADIM's Gaussians on a Ray cluster (Ray must be initialised: see ensure_ray); same result as
    engine.fit_padim up to float64 rounding. Sets the model's mean/inv_cov and returns (stats, info).

    workers: size of the actor pool running the backbone; each actor reserves `cpus_per_worker` logical CPUs
    and runs torch with `threads_per_worker` threads (default: cpus_per_worker).
    skip_corrupt: an unreadable image is skipped with a warning (listed in info) instead of stopping the fit.
    info: images (counted), manifest_images, skipped (paths), num_skipped, workers [{worker, node, images}],
    nodes, seconds, images_per_s (end to end), startup_s (until the first batch), steady_images_per_s, dtype.
    """
    if len(records) < 2:
        raise UserError(f"PADIM needs at least 2 training images, got {len(records)}")
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call distributed_anomaly.distributed.ensure_ray() first")
    _check_args(batch_size, workers, cpus_per_worker)
    start = time.perf_counter()
    model.eval()
    acc = engine.empty_stats(model)
    threads = _default_threads(cpus_per_worker, threads_per_worker)
    payload = ray.put(model_payload(model, with_gaussian=False))
    registry = ray.remote(num_cpus=0, max_restarts=0)(PartialRegistry).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    ).remote(model.n_positions, model.n_features, str(acc.dtype).replace("torch.", ""), threads)
    seen = np.zeros(len(records), dtype=bool)
    rows_per_worker: Counter[str] = Counter()  # images each worker folded in (readable rows)
    node_of: dict[str, str] = {}
    skipped: list[str] = []
    bar = Progress(len(records), f"fit padim (ray, {workers} workers)", progress)
    first_out = last_out = None  # times of the first and last output batch: start-up vs steady state
    n_first = n_out = 0
    try:
        with _pipeline(records, model.image_size, batch_size, workers, cpus_per_worker, PadimEmbedder,
                       (payload, registry, threads)) as batches:
            for out in batches:
                last_out = time.perf_counter()
                n_out += 1
                if first_out is None:
                    first_out, n_first = last_out, len(out["idx"])
                for idx, ok, err, worker, node in zip(out["idx"], out["ok"], out["error"], out["worker"],
                                                      out["node"]):
                    if seen[idx]:
                        raise RuntimeError(f"image {records[idx].path} was processed twice")
                    seen[idx] = True
                    node_of[str(worker)] = str(node)
                    if ok:
                        rows_per_worker[str(worker)] += 1
                    elif skip_corrupt:
                        skipped.append(records[idx].path)
                        _warn(f"skipping unreadable image: {err}")
                    else:
                        raise ImageReadError(f"{err} (use --skip-corrupt to leave unreadable images out of the fit)")
                bar.update(len(out["idx"]))
        bar.close()
        if not seen.all():
            missing = np.flatnonzero(~seen)
            raise RuntimeError(f"{len(missing)} images never came back from the pipeline (first: "
                               f"{records[missing[0]].path})")
        n_images = len(records) - len(skipped)
        if n_images < 2:
            raise UserError(f"PADIM needs at least 2 readable training images, got {n_images} "
                            f"({len(skipped)} unreadable skipped)")
        _merge_partials(registry, rows_per_worker, node_of, acc)
    finally:
        with contextlib.suppress(Exception):
            ray.get(registry.release.remote(), timeout=30)
        ray.kill(registry)
    if skipped:
        _warn(f"{len(skipped)} of {len(records)} training images were unreadable and left out of the fit")
    model.set_gaussian(acc)
    seconds = time.perf_counter() - start
    info = {"images": acc.count, "manifest_images": len(records), "skipped": skipped, "num_skipped": len(skipped),
            "workers": [{"worker": w, "node": node_of[w], "images": n} for w, n in sorted(rows_per_worker.items())],
            "nodes": sorted({node_of[w] for w in rows_per_worker}), "seconds": round(seconds, 3),
            "images_per_s": round(len(records) / seconds, 2),
            # Start-up (actors, model load) until the first batch is out; then the pipeline's steady rate.
            "startup_s": round(first_out - start, 3),
            "steady_images_per_s": (round((len(records) - n_first) / (last_out - first_out), 2)
                                    if n_out >= 4 and last_out > first_out else None),
            "dtype": str(acc.dtype).replace("torch.", "")}
    return acc, info


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
                raise RuntimeError(f"the statistics of worker {worker} on node {node_of[worker]} ({n} images) "
                                   f"were lost: {exc}") from exc
            refs[i] = None  # release the chunk once merged
            if i + 2 < len(bounds):
                refs.append(store.chunk.remote(worker, *bounds[i + 2]))
            if count != n:
                raise RuntimeError(f"worker {worker} on node {node_of[worker]} reported {n} images but its "
                                   f"statistics count {count}: the fit is inconsistent")
            part = GaussianStats(count, torch.from_numpy(np.array(mean)), torch.from_numpy(np.array(m2)))
            del mean, m2
            # A view of the accumulator's positions [p0, p1): merge_ updates it in place.
            GaussianStats(total, acc.mean[p0:p1], acc.m2[p0:p1]).merge_(part)
        store.drop.remote(worker)  # free it on its node as soon as it is merged
        total += n
    acc.count = total


def anomaly_maps_ray(model: torch.nn.Module, records: Sequence[Record], image_size: int, batch_size: int = 32,
                     workers: int = 1, progress: bool = True, what: str = "score", cpus_per_worker: float = 1.0,
                     threads_per_worker: int | None = None) -> np.ndarray:
    """(N, S, S) float32 raw anomaly maps in record order, by Ray Data batch inference (like engine.anomaly_maps)."""
    out = np.empty((len(records), image_size, image_size), dtype=np.float32)
    if not records:
        return out
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call distributed_anomaly.distributed.ensure_ray() first")
    _check_args(batch_size, workers, cpus_per_worker)
    model.eval()
    payload = ray.put(model_payload(model, with_gaussian=True))
    threads = _default_threads(cpus_per_worker, threads_per_worker)
    seen = np.zeros(len(records), dtype=bool)
    bar = Progress(len(records), f"{what} (ray, {workers} workers)", progress)
    with _pipeline(records, image_size, batch_size, workers, cpus_per_worker, ModelScorer,
                   (payload, threads)) as batches:
        for b in batches:
            bad = np.flatnonzero(~np.asarray(b["ok"], dtype=bool))
            if len(bad):
                raise ImageReadError(str(b["error"][bad[0]]))
            idx = np.asarray(b["idx"], dtype=np.int64)
            if seen[idx].any():
                raise RuntimeError(f"image {records[idx[seen[idx]][0]].path} was scored twice")
            seen[idx] = True
            out[idx] = b["map"]
            bar.update(len(idx))
    bar.close()
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} images never came back from the scoring pipeline")
    return out
