"""PADIM fitting as a Ray Data pipeline: exact statistics, memory independent of the dataset.

    driver: manifest (paths) --from_items--> [decode tasks, or the actors themselves: data.decode]
            --> [actor pool: frozen backbone] --deviations--> [NodePartials actor of that node: one partial per node]
            --> one small row per image back to the driver; at the end the driver merges the partials.

What runs on the nodes (node_fit.py: the OpenVINO pool actor, NodePartials, PartialRegistry) imports no torch;
the driver converts the frozen network once and ships it as an IR. The torch runtime's actor is TorchEmbedder.

Getting state out of a Ray Data actor pool: a callable class gets no "end of input" call and Ray Data retires
the actors itself, so the partial statistics do not live in the pool actors. Each pool actor, when it starts,
asks the fit's PartialRegistry (an actor owned by the driver) for the NodePartials actor of its own node, and
folds each batch's deviations into the node's partial there (exact moment updates, moments.MomentAccumulator;
every worker of a node takes deviations from the node's shift), waiting for the fold before it returns the
batch's rows. The partials thus outlive the pool, and the driver reads them back, one per node, with
ordinary method calls, one chunk of patch positions at a time, merging into one accumulator. Flushing from the
pool actor's `__del__` does not work: objects it creates there (ray.put, large task arguments) get the same
ObjectID in every actor (nil task context at shutdown, Ray 2.60), so partials silently overwrite each other.

Nothing is trusted blindly: every image must come back exactly once as a row naming the worker that folded
it, and each node's partial must count exactly that many images of each of its workers, else the fit fails with
a message (never a silently smaller fit). Memory: the driver holds the manifest, one row per image, one
accumulator (P, C, C), two raw chunks (float32 S2, half of CHUNK_BYTES each) and a conversion buffer (<=
CHUNK_BYTES): a node ships its partial as accumulated and the driver converts it. A node holds its workers'
backbones, one partial and a batch of embeddings per worker; Ray Data's object-store budget for decoded batches
is capped (pool.object_store_budget) and decoding runs in the actors or in at most workers + 1 tasks. None of
this grows with the number of images. See docs/distributed.md and docs/scaling.md.

The pipeline itself (pool.py) is shared with scoring (scoring.py); models travel as payloads (payload.py).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from distributed_anomaly import engine
from distributed_anomaly.config import DEFAULT_RUNTIME
from distributed_anomaly.data.decode import decode_batch
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.data.progress import Progress
from distributed_anomaly.data.sizes import ImageSize
from distributed_anomaly.distributed.node_fit import (
    NodePartials,
    OpenVinoEmbedder,
    PatchEmbedder,
    folded_rows,
    partial_registry,
)
from distributed_anomaly.distributed.payload import build_from_payload, model_payload, set_threads
from distributed_anomaly.distributed.pool import (
    check_pool_args,
    decode_in_actors_default,
    default_threads,
    pool_pipeline,
    require_ray,
    resolve,
    warn,
)
from distributed_anomaly.errors import ImageReadError, UserError
from distributed_anomaly.frozen import TorchPatches, patch_blob, patch_runtime
from distributed_anomaly.models.padim import Padim
from distributed_anomaly.moments import moments_to_stats
from distributed_anomaly.stats import GaussianStats

# A partial moves in chunks of whole patch positions whose float64 co-moment is at most this many bytes (the raw
# float32 chunk on the wire is half of it).
CHUNK_BYTES = 64 << 20


def chunk_bounds(n_positions: int, n_features: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """Position ranges [p0, p1) whose co-moment slice is at most CHUNK_BYTES (at least one position each)."""
    per_position = n_features * n_features * torch.empty((), dtype=dtype).element_size()
    step = max(1, CHUNK_BYTES // per_position)
    return [(p, min(p + step, n_positions)) for p in range(0, n_positions, step)]


# --------------------------------------------------------------------------------------------- actors


class TorchEmbedder(PatchEmbedder):
    """The pool actor on the torch runtime (the reference): rebuilds the model from its payload and runs
    frozen.TorchPatches with `threads` torch threads. The OpenVINO actor is node_fit.OpenVinoEmbedder (no torch)."""

    def __init__(self, payload: Any, registry: Any, threads: int, image_size: ImageSize) -> None:
        set_threads(threads)
        model = build_from_payload(resolve(payload))
        super().__init__(registry, model.n_positions, model.n_features, image_size)
        patches = TorchPatches(model)
        self.frozen = lambda x, shift: tuple(
            t.numpy() for t in patches(torch.from_numpy(x), torch.from_numpy(np.asarray(shift)))
        )


class PoolFolder:
    """A pool actor (map_batches callable class) on the torch runtime that folds its share of the images into its
    own partial in its node's store, waiting for each fold before it reports the images (exact accounting).
    Subclasses say what is built (`setup`) and folded (`fold`). PADIM's OpenVINO actor needs no torch:
    node_fit.OpenVinoEmbedder."""

    def __init__(self, payload: Any, registry: Any, threads: int, runtime: str, precision: str = "f32") -> None:
        set_threads(threads)
        self.worker_id = uuid.uuid4().hex
        self.node_id = ray.get_runtime_context().get_node_id()
        store = registry.store_for.remote(self.worker_id, self.node_id)  # starts while the model is built
        self.model = build_from_payload(resolve(payload))
        self.setup(runtime, threads, precision)
        self.store = ray.get(store)[0]

    def setup(self, runtime: str, threads: int, precision: str) -> None:
        raise NotImplementedError

    def fold(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "pixels" not in batch:  # the actors decode their own images (decode_in_actors)
            batch = decode_batch(batch, self.model.image_size)
        ok = np.asarray(batch["ok"], dtype=bool)
        if ok.any():
            self.fold(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
        return folded_rows(batch, ok, self.worker_id, self.node_id)


def _pool_actor(model: Padim, registry: Any, threads: int, runtime: str, precision: str) -> tuple[type, tuple]:
    """(pool actor class, its constructor arguments) for `runtime`: the OpenVINO one gets the patched IR
    (converted here, once, then shared through the object store), the torch one the model payload."""
    if runtime == "openvino":
        blob = ray.put(patch_blob(model))
        args = (blob, registry, threads, precision, model.n_positions, model.n_features, model.image_size)
        return OpenVinoEmbedder, args
    patch_runtime(model, runtime, threads, precision)  # refuses an unknown runtime or bf16 on torch, up front
    payload = ray.put(model_payload(model, with_gaussian=False))
    return TorchEmbedder, (payload, registry, threads, model.image_size)


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
    torch_of: dict[str, bool] = field(default_factory=dict)  # whether each worker's process had loaded torch
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
        for idx, ok, err, worker, node, torch_loaded in zip(
            out["idx"], out["ok"], out["error"], out["worker"], out["node"], out["torch"]
        ):
            self.torch_of[str(worker)] = bool(torch_loaded) or self.torch_of.get(str(worker), False)
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
                {"worker": w, "node": self.node_of[w], "images": k, "torch_loaded": self.torch_of[w]}
                for w, k in sorted(self.rows_per_worker.items())
            ],
            "nodes": sorted({self.node_of[w] for w in self.rows_per_worker}),
            "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 2),
            # Start-up (actors, model load) until the first batch is out; then the pipeline's steady rate.
            "startup_s": round(self.first_out - self.started, 3),
            "steady_images_per_s": steady,
            **extra,
        }


def fold_on_pool(
    tally: FitTally, pool: tuple, udf: type, ctor_args: tuple, progress: bool, decode_in_actors: bool | None = None
) -> bool:
    """Run the fit's pipeline (pool: image size, batch size, workers, CPUs per worker) with pool actors `udf`
    (decoding their own images if `decode_in_actors`; None: on nodes with few CPUs, pool.decode_in_actors_default),
    accounting for every row in `tally`; checks that every image came back. Returns where decoding ran."""
    records, workers = tally.records, pool[2]
    if decode_in_actors is None:
        decode_in_actors = decode_in_actors_default()
    bar = Progress(len(records), f"fit {tally.model.lower()} (ray, {workers} workers)", progress)
    with pool_pipeline(records, *pool, udf, ctor_args, decode_in_actors) as batches:
        for out in batches:
            tally.add(out)
            bar.update(len(out["idx"]))
    bar.close()
    tally.check_complete()
    if tally.skipped:
        warn(f"{len(tally.skipped)} of {len(records)} training images were unreadable and left out of the fit")
    return decode_in_actors


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
    precision: str = "f32",
    decode_in_actors: bool | None = None,
) -> tuple[GaussianStats, dict]:
    """Fit PADIM's Gaussians on a Ray cluster (Ray must be initialised: see ensure_ray); same result as
    engine.fit_padim up to float64 rounding. Sets the model's mean/inv_cov and returns (stats, info).

    workers: size of the actor pool running the backbone; each actor reserves `cpus_per_worker` logical CPUs
    and runs its frozen backbone on `runtime` at `precision` with `threads_per_worker` threads (default:
    cpus_per_worker). decode_in_actors: the actors decode their images (default: on nodes with few CPUs,
    pool.decode_in_actors_default).
    skip_corrupt: an unreadable image is skipped with a warning (listed in info) instead of stopping the fit.
    info: images (counted), manifest_images, skipped (paths), num_skipped, workers [{worker, node, images,
    torch_loaded}],
    nodes, seconds, images_per_s (end to end), startup_s (until the first batch), steady_images_per_s, dtype,
    runtime, precision, decode_in_actors, partials (merged by the driver: one per node).
    """
    if len(records) < 2:
        raise UserError(f"PADIM needs at least 2 training images, got {len(records)}")
    require_ray()
    check_pool_args(batch_size, workers, cpus_per_worker)
    tally = FitTally(records, skip_corrupt)
    model.eval()
    acc = engine.empty_stats(model)
    threads = default_threads(cpus_per_worker, threads_per_worker)
    dtype = str(acc.dtype).replace("torch.", "")
    with partial_registry(NodePartials, model.n_positions, model.n_features, threads) as registry:
        udf, args = _pool_actor(model, registry, threads, runtime, precision)
        pool = (model.image_size, batch_size, workers, cpus_per_worker)
        decode_in_actors = fold_on_pool(tally, pool, udf, args, progress, decode_in_actors)
        partials = _merge_partials(registry, tally.rows_per_worker, tally.node_of, acc)
    model.set_gaussian(acc)
    return acc, tally.info(
        acc.count,
        dtype=dtype,
        runtime=runtime,
        precision=precision,
        decode_in_actors=decode_in_actors,
        partials=partials,
    )


def _merge_partials(registry: Any, rows_per_worker: Counter, node_of: dict[str, str], acc: GaussianStats) -> int:
    """Merge every node's partial into `acc` (empty), one chunk of positions at a time, checking counts; returns
    how many partials were merged (one per node that folded images).

    Each chunk is the return value of an ordinary method call, so the driver owns it; at most two chunks
    (the one merged and the next, prefetched) exist at once.
    """
    stores = ray.get(registry.all.remote())
    expected = {w: n for w, n in rows_per_worker.items() if n > 0}
    missing = sorted(set(expected) - set(stores))
    if missing:
        raise RuntimeError(f"worker {missing[0]} on node {node_of[missing[0]]} has no statistics store")
    nodes: dict[str, dict[str, int]] = {}
    for worker, n in expected.items():
        nodes.setdefault(stores[worker][0], {})[worker] = n
    total = 0
    for node, rows in sorted(nodes.items()):
        store = stores[next(iter(rows))][1][0]
        n = _merge_node(store, node, rows, acc, total)
        store.drop.remote()  # free it on its node as soon as it is merged
        total += n
    acc.count = total
    return len(nodes)


def _merge_node(store: Any, node: str, rows: dict[str, int], acc: GaussianStats, total: int) -> int:
    """Merge one node's partial (its workers reported `rows` images each) into `acc`, which holds `total`."""
    try:
        counts = ray.get(store.worker_counts.remote())
    except ray.exceptions.RayActorError as exc:
        raise RuntimeError(f"the statistics of node {node} ({sum(rows.values())} images) were lost: {exc}") from exc
    for worker, n in sorted(rows.items()):
        if counts.get(worker, 0) != n:
            raise RuntimeError(
                f"worker {worker} on node {node} reported {n} images but its node's statistics count "
                f"{counts.get(worker, 0)} of them: the fit is inconsistent"
            )
    n = sum(rows.values())
    bounds = chunk_bounds(acc.mean.shape[0], acc.mean.shape[1], acc.dtype)
    buffer = GaussianStats.empty(bounds[0][1] - bounds[0][0], acc.mean.shape[1], acc.dtype) if total else None
    refs = [store.chunk.remote(p0, p1) for p0, p1 in bounds[:2]]
    for i, (p0, p1) in enumerate(bounds):
        try:
            raw = ray.get(refs[i])  # (count, shift, S1, S2 float32)
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"the statistics of node {node} ({n} images) were lost: {exc}") from exc
        refs[i] = None  # release the chunk once merged
        if i + 2 < len(bounds):
            refs.append(store.chunk.remote(*bounds[i + 2]))
        if raw[0] != n:
            raise RuntimeError(
                f"the workers on node {node} reported {n} images but its statistics count {raw[0]}: "
                "the fit is inconsistent"
            )
        _merge_chunk(acc, total, p0, p1, raw, buffer)
        del raw
    return n


def _merge_chunk(acc: GaussianStats, total: int, p0: int, p1: int, raw: tuple, buffer: GaussianStats | None) -> None:
    """Positions [p0, p1) of a node's raw moments into `acc` (holding `total` images): the first partial is
    converted straight into the accumulator, later ones into `buffer` (reused: no fresh memory per chunk) and
    merged (Chan) into the accumulator's view of those positions."""
    if total == 0:
        moments_to_stats(*raw, out=(acc.mean[p0:p1].numpy(), acc.m2[p0:p1].numpy()))
        return
    k = p1 - p0
    part = GaussianStats(raw[0], buffer.mean[:k], buffer.m2[:k])
    moments_to_stats(*raw, out=(part.mean.numpy(), part.m2.numpy()))
    GaussianStats(total, acc.mean[p0:p1], acc.m2[p0:p1]).merge_(part)
