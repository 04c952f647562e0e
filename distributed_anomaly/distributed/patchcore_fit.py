"""PatchCore's memory bank as a Ray Data pipeline: shard coresets on the nodes, one greedy pass on the driver.

    driver: manifest --> [decode tasks] --> [actor pool: frozen backbone -> patch embeddings]
            --> [NodeCoresets actor of that node: one streaming coreset per worker] --> one row per image back
            --> at the end the driver gathers every worker's candidates and merges them (coreset.merge_candidates)

The same pool, registry and accounting as the PADIM fit (padim_fit.py: every image must come back exactly
once, each worker's store must have seen exactly its images' patches). Memory: a node holds one chunk plus the
chunk coresets per worker (models/coreset.py), the driver the candidates of every worker (about 2 x the bank)
and the bank: nothing grows with the number of images beyond the bank itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from distributed_anomaly import engine
from distributed_anomaly.config import DEFAULT_RUNTIME
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.distributed.node_fit import partial_registry
from distributed_anomaly.distributed.padim_fit import FitTally, PoolFolder, fold_on_pool
from distributed_anomaly.distributed.payload import model_payload
from distributed_anomaly.distributed.pool import check_pool_args, default_threads, require_ray
from distributed_anomaly.errors import UserError
from distributed_anomaly.models.coreset import (
    CHUNK_PATCHES,
    Candidates,
    CoresetResult,
    StreamingCoreset,
    merge_candidates,
    projection,
)
from distributed_anomaly.models.patchcore import PatchCore


class NodeCoresets:
    """The streaming coresets of the pool actors on one node, one per worker (a threaded actor owned by the
    fit's PartialRegistry, so they outlive Ray Data's pool)."""

    def __init__(self, ratio: float, n_features: int, seed: int, chunk_patches: int, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only buffers
        self.args = (ratio, projection(n_features, seed))
        self.options = {"chunk_patches": chunk_patches}
        self.n_features = n_features
        self.streams: dict[str, StreamingCoreset] = {}

    def update(self, worker: str, embeddings: np.ndarray) -> int:
        """Fold a batch of patch embeddings (B, P, D) from `worker` (each worker calls this serially)."""
        stream = self.streams.get(worker)
        if stream is None:
            stream = self.streams.setdefault(worker, StreamingCoreset(*self.args, **self.options))
        with torch.inference_mode():
            stream.add(torch.from_numpy(embeddings).reshape(-1, self.n_features))
        return stream.count

    def candidates(self, worker: str) -> tuple[int, np.ndarray, float]:
        """(patches seen, candidate rows, their coverage radius) of `worker`'s stream; the stream is dropped."""
        with torch.inference_mode():
            found = self.streams.pop(worker).candidates()
        return found.count, found.rows.numpy(), found.radius


class PatchCoreEmbedder(PoolFolder):
    """PatchCore's pool actor: the frozen backbone (on `runtime`) and the patch features; the embeddings go to
    this worker's streaming coreset in its node's NodeCoresets."""

    def setup(self, runtime: str, threads: int, precision: str) -> None:
        self.embed = engine.patchcore_embedder(self.model, runtime, threads, precision)

    def fold(self, x: torch.Tensor) -> None:
        with torch.inference_mode():
            emb = self.embed(x)
        ray.get(self.store.update.remote(self.worker_id, emb.numpy()))


def _gather(registry: Any, tally: FitTally, patches_per_image: int) -> list[Candidates]:
    """Every worker's candidates, checked against the images it reported."""
    stores = ray.get(registry.all.remote())
    parts = []
    for worker, images in sorted(tally.rows_per_worker.items()):
        if images == 0:
            continue
        if worker not in stores:
            raise RuntimeError(f"worker {worker} on node {tally.node_of[worker]} has no coreset store")
        try:
            count, rows, radius = ray.get(stores[worker][1][0].candidates.remote(worker))
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"the coreset of worker {worker} ({images} images) was lost: {exc}") from exc
        if count != images * patches_per_image:
            raise RuntimeError(
                f"worker {worker} reported {images} images but its coreset saw {count} patches "
                f"({patches_per_image} per image): the fit is inconsistent"
            )
        parts.append(Candidates(count, torch.from_numpy(np.array(rows)), radius))
    return parts


def fit_patchcore_ray(
    model: PatchCore,
    records: Sequence[Record],
    *,
    batch_size: int,
    workers: int,
    progress: bool = True,
    skip_corrupt: bool = False,
    cpus_per_worker: float = 1.0,
    threads_per_worker: int | None = None,
    runtime: str = DEFAULT_RUNTIME,
    chunk_patches: int = CHUNK_PATCHES,
    precision: str = "f32",
    decode_in_actors: bool | None = None,
) -> tuple[CoresetResult, dict]:
    """PatchCore's memory bank on a Ray cluster (Ray initialised: see ensure_ray): per-worker streaming coresets
    merged by one greedy pass here. Sets the model's bank; returns (result, info); the arguments and info as
    fit_padim_ray's."""
    if not records:
        raise UserError("PatchCore needs at least 1 training image")
    require_ray()
    check_pool_args(batch_size, workers, cpus_per_worker)
    tally = FitTally(records, skip_corrupt, "PatchCore", 1)
    model.eval()
    threads = default_threads(cpus_per_worker, threads_per_worker)
    payload = ray.put(model_payload(model, with_gaussian=False))
    store_args = (model.coreset_ratio, model.n_features, model.seed, chunk_patches, threads)
    with partial_registry(NodeCoresets, *store_args) as registry:
        pool = (model.image_size, batch_size, workers, cpus_per_worker)
        args = (payload, registry, threads, runtime, precision)
        decode_in_actors = fold_on_pool(tally, pool, PatchCoreEmbedder, args, progress, decode_in_actors)
        parts = _gather(registry, tally, model.n_positions)
    with torch.inference_mode():
        result = merge_candidates(parts, model.coreset_ratio, model.projection())
    model.set_bank(result.bank)
    images = sum(tally.rows_per_worker.values())
    return result, tally.info(images, coreset=result.summary(), decode_in_actors=decode_in_actors)
