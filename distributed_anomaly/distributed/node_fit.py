"""What a node runs in a Ray PADIM fit, torch-free: the pool actor on OpenVINO and the node's partial statistics.

    pool actor (OpenVinoEmbedder):  paths -> decode + normalise (data.decode, numpy and Pillow)
                                    -> PADIM's patched IR (frozen_ir.CompiledPatches) -> deviations (B, P, C)
    NodePartials (one per node):    deviations of all its workers -> one moments.MomentAccumulator (numpy, float32)

Torch, torchvision and the model classes are loaded by the driver only: it converts the frozen network once
(frozen.patch_blob, cached on its disk) and ships the IR as bytes through the object store. An actor process
then holds numpy, Pillow, OpenVINO and Ray: ~0.5 GB less each than one that imports torch, and no torch import
on the way to the first batch (tests/test_node_runtime.py checks sys.modules inside the actors). On nodes with
few cores the actors decode their own images (`decode_in_actors`): no decode processes, and no decoded pixels
through the object store. padim_fit.py drives the fit (and holds the torch runtime's actor).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from threadpoolctl import threadpool_limits

from distributed_anomaly.data.decode import decode_batch
from distributed_anomaly.data.sizes import ImageSize
from distributed_anomaly.distributed.pool import resolve
from distributed_anomaly.frozen_ir import CompiledPatches, read_blob
from distributed_anomaly.moments import MomentAccumulator


class NodePartials:
    """The partial statistics of one node: a single MomentAccumulator that every pool actor on the node folds
    into (a threaded actor; the accumulator's lock orders the folds), and each worker's image count for the
    driver's accounting. One partial per node rather than one per worker: a node holds one S2 (P, C, C) and one
    stage whatever its worker count, and the driver pulls one partial from it. Created by the PartialRegistry,
    so owned by the fit, not by Ray Data's pool: the partial outlives the pool actors."""

    def __init__(self, n_positions: int, n_features: int, threads: int) -> None:
        threadpool_limits(max(1, int(threads)), user_api="blas")  # the node's share, not all its cores
        self.acc: MomentAccumulator | None = MomentAccumulator(n_positions, n_features)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def node_shift(self, first_mean: np.ndarray) -> np.ndarray:
        """The shift every worker on this node takes its deviations from: the first caller's batch mean fixes
        it (any shift is exact; one near the mean keeps float32 S2 accurate, and normal images' means are
        close to each other)."""
        with self._lock:
            if self.acc.shift is None:
                self.acc.set_shift(first_mean)
            return self.acc.shift

    def update(self, worker: str, dev: np.ndarray, dev_sum: np.ndarray) -> int:
        """Fold `worker`'s batch of deviations (B, P, C) from the node's shift; returns the node's count."""
        self.acc.add_deviations(dev, dev_sum)
        with self._lock:
            self.counts[worker] += int(dev.shape[0])
        return self.acc.count

    def worker_counts(self) -> dict[str, int]:
        """{worker: images it folded}: the driver checks them against the rows each worker reported."""
        with self._lock:
            return dict(self.counts)

    def chunk(self, p0: int, p1: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """Positions [p0, p1) of the node's partial as accumulated: (count, shift, S1, S2 float32). The driver
        turns them into statistics (moments.moments_to_stats): half the bytes of float64 statistics on the wire."""
        return self.acc.raw_chunk(p0, p1)

    def drop(self) -> None:
        """Free the partial once the driver has merged it."""
        self.acc = None


class PartialRegistry:
    """One per fit, owned by the driver: gives each pool actor the store actor of its node (`store_cls`:
    NodePartials for PADIM, patchcore_fit.NodeCoresets for PatchCore), created with `args`."""

    def __init__(self, store_cls: type, *args: Any) -> None:
        self.store_cls, self.args = store_cls, args
        self.node_stores: dict[str, Any] = {}
        self.worker_node: dict[str, str] = {}
        # The store of this (the driver's) node starts now, beside the pool actors, rather than when the first
        # of them asks: its process start is then off the path to the first batch.
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


def folded_rows(batch: dict[str, np.ndarray], ok: np.ndarray, worker_id: str, node_id: str) -> dict[str, np.ndarray]:
    """What a pool actor returns for a batch it folded: one small row per image, for the driver's accounting."""
    n = len(ok)
    return {
        "idx": batch["idx"],
        "ok": ok,
        "error": batch["error"],
        "worker": np.full(n, worker_id),
        "node": np.full(n, node_id),
        # Whether this actor's process has loaded torch (fixed memory: ~0.5 GB), reported per worker in info.
        "torch": np.full(n, "torch" in sys.modules),
    }


class PatchEmbedder:
    """Pool actor (map_batches callable class): runs the frozen network on its share of the images and folds
    the deviations of their embeddings into its node's partial (NodePartials), waiting for each fold before it
    reports the images. Batches hold decoded `pixels`, or only `path`s when it decodes them itself.

    Subclasses set `self.frozen`: numpy (images, shift) -> (deviations, sum), like frozen_ir.CompiledPatches."""

    frozen: Any

    def __init__(self, registry: Any, n_positions: int, n_features: int, image_size: ImageSize) -> None:
        self.worker_id = uuid.uuid4().hex
        self.node_id = ray.get_runtime_context().get_node_id()
        self._store_ref = registry.store_for.remote(self.worker_id, self.node_id)  # starts while the model loads
        self.shape = (n_positions, n_features)
        self.image_size = image_size
        self.shift: np.ndarray | None = None  # its node's (NodePartials.node_shift), asked for at the first batch

    def _deviations(self, x: np.ndarray, store: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.shift is not None:
            return self.frozen(x, self.shift)
        patches, _ = self.frozen(x, np.zeros(self.shape, dtype=np.float32))
        self.shift = ray.get(store.node_shift.remote(patches.mean(0, dtype=np.float32)))
        dev = patches - self.shift
        return dev, dev.sum(0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "pixels" not in batch:
            batch = decode_batch(batch, self.image_size)
        ok = np.asarray(batch["ok"], dtype=bool)
        if ok.any():
            store = ray.get(self._store_ref)[0]
            dev, dev_sum = self._deviations(np.ascontiguousarray(batch["pixels"][ok]), store)
            # Folded before these rows are reported: exact accounting.
            ray.get(store.update.remote(self.worker_id, dev, dev_sum))
        return folded_rows(batch, ok, self.worker_id, self.node_id)


class OpenVinoEmbedder(PatchEmbedder):
    """The pool actor on OpenVINO: compiles the driver's patched IR (`blob`: frozen_ir.ir_blob, or a reference to
    it) with `threads` threads at `precision`; never imports torch."""

    def __init__(
        self,
        blob: Any,
        registry: Any,
        threads: int,
        precision: str,
        n_positions: int,
        n_features: int,
        image_size: ImageSize,
    ) -> None:
        super().__init__(registry, n_positions, n_features, image_size)
        self.frozen = CompiledPatches(read_blob(resolve(blob)), threads, precision)
