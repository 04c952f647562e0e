"""PADIM fitting and scoring as Ray Data pipelines: exact statistics, memory independent of the dataset.

    driver: manifest (paths) --from_items--> [decode tasks: read_image + to_tensor]
            --> [actor pool: backbone + partial GaussianStats] --> one small row per image back to the driver

Each pool actor folds its share of the images into its own partial `GaussianStats` (stats.py: exact Chan
updates). Ray Data gives a callable class no "end of input" call, so the partial leaves the actor when Ray
Data retires it: `__ray_shutdown__` deletes the UDF, and `__del__` hands the partial to the driver through a
small collector actor, one chunk of patch positions at a time, each chunk waiting for the driver's ack (the
chunk lives in the actor's object store until then; `ray.put(_owner=)` no longer exists). A driver thread
merges the chunks into one accumulator as they arrive. Nothing is trusted blindly: every image must come back
exactly once as a row naming the actor that counted it, and each actor's partial must carry exactly the
count of its rows, else the fit fails with a message (never a silently smaller fit).

Memory: the driver holds the manifest, one row per image (ints/short strings), one accumulator of
(P, C, C) and one chunk (<= CHUNK_BYTES); an actor holds the backbone, its partial and, while flushing, one
chunk; Ray Data's object-store budget for decoded batches is capped (see `_object_store_budget`).
None of this grows with the number of images. See README.md, "Distributed PADIM fitting".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distributed_anomaly import engine
from distributed_anomaly.data.images import read_image, to_tensor
from distributed_anomaly.data.loader import Progress
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.errors import ImageReadError, UserError
from distributed_anomaly.models.padim import Padim
from distributed_anomaly.models.stfpm import Stfpm
from distributed_anomaly.stats import GaussianStats

# A partial moves in chunks of whole patch positions of at most this many bytes (m2 dominates).
CHUNK_BYTES = 64 << 20
# Logical CPUs of one decode task; differs from the actors' so Ray Data does not fuse decoding into them.
DECODE_CPUS = 0.5
# After the last image, how long the driver waits for a partial that makes no progress before failing.
FLUSH_TIMEOUT_S = 300.0


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


def decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data task: paths -> normalised (B, 3, S, S) float32; a file that cannot be read becomes an error row."""
    paths = [str(p) for p in batch["path"]]
    ok = np.zeros(len(paths), dtype=bool)
    errors = [""] * len(paths)
    images = []
    for i, path in enumerate(paths):
        try:
            images.append(read_image(path))
            ok[i] = True
        except ImageReadError as exc:
            errors[i] = str(exc)
        except Exception as exc:  # e.g. PIL's DecompressionBombError: still one bad file, named
            errors[i] = f"cannot decode image {path}: {type(exc).__name__}: {exc}"
    pixels = np.zeros((len(paths), 3, image_size, image_size), dtype=np.float32)
    if images:
        pixels[ok] = to_tensor(images, image_size).numpy()
    return {"idx": np.asarray(batch["idx"], dtype=np.int64), "pixels": pixels, "ok": ok,
            "error": np.asarray(errors, dtype=str)}


def _set_threads(threads: int) -> None:
    torch.set_num_threads(max(1, int(threads)))


class PadimPartial:
    """Pool actor (map_batches callable class): runs the backbone and folds its images into a partial."""

    def __init__(self, payload: Any, collector: Any, threads: int) -> None:
        _set_threads(threads)
        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        self.model = build_from_payload(payload)
        self.stats = engine.empty_stats(self.model)
        self.worker_id = uuid.uuid4().hex
        self.node_id = ray.get_runtime_context().get_node_id()
        self.collector = collector

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], dtype=bool)
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            with torch.inference_mode():
                self.stats.update(self.model.embed(x))
        n = len(ok)
        return {"idx": batch["idx"], "ok": ok, "error": batch["error"],
                "worker": np.full(n, self.worker_id), "node": np.full(n, self.node_id)}

    def __del__(self) -> None:
        # Ray Data retires the actor (all its tasks done) -> hand the partial over. Any failure here shows up
        # on the driver as a missing partial, with a message, never as a silently smaller fit.
        try:
            self._flush()
        except Exception:
            pass

    def _flush(self) -> None:
        stats = getattr(self, "stats", None)
        if stats is None or stats.count == 0:
            return
        bounds = chunk_bounds(stats.mean.shape[0], stats.mean.shape[1], stats.dtype)
        for i, (p0, p1) in enumerate(bounds):
            ref = ray.put({"mean": stats.mean[p0:p1].numpy(), "m2": stats.m2[p0:p1].numpy()})
            item = {"worker": self.worker_id, "node": self.node_id, "count": stats.count, "chunk": i,
                    "n_chunks": len(bounds), "p0": p0, "p1": p1, "ref": [ref]}  # nested: not resolved en route
            if not ray.get(self.collector.push.remote(item)):
                return  # the driver gave up (error elsewhere); nothing more to send
            del ref


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


@ray.remote(num_cpus=0, max_restarts=0)
class PartialCollector:
    """Rendezvous between retiring pool actors and the driver: a queue of chunks, each acked once merged."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue | None = None
        self._acks: dict[tuple[str, int], asyncio.Event] = {}
        self._aborted = False

    def _q(self) -> asyncio.Queue:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    async def push(self, item: dict) -> bool:
        """Called by an actor; returns once the driver has merged the chunk (True) or gave up (False)."""
        if self._aborted:
            return False
        event = asyncio.Event()
        self._acks[(item["worker"], item["chunk"])] = event
        await self._q().put(item)
        await event.wait()
        return not self._aborted

    async def take(self, timeout: float) -> dict | None:
        try:
            return await asyncio.wait_for(self._q().get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def ack(self, worker: str, chunk: int) -> None:
        event = self._acks.pop((worker, chunk), None)
        if event is not None:
            event.set()

    async def abort(self) -> None:
        self._aborted = True
        for event in self._acks.values():
            event.set()
        self._acks.clear()


class _Merger(threading.Thread):
    """Driver thread: takes chunks from the collector and merges each into the accumulator, exactly once."""

    def __init__(self, collector: Any, acc: GaussianStats) -> None:
        super().__init__(name="padim-partial-merger", daemon=True)
        self.collector = collector
        self.acc = acc
        self.bounds = chunk_bounds(acc.mean.shape[0], acc.mean.shape[1], acc.dtype)
        # One GaussianStats view per chunk of positions: chunks of different workers may arrive interleaved,
        # so each position range keeps its own count.
        self.views = [GaussianStats(0, acc.mean[p0:p1], acc.m2[p0:p1]) for p0, p1 in self.bounds]
        self.chunks_done: dict[str, set[int]] = {}
        self.counts: dict[str, int] = {}
        self.n_chunks: dict[str, int] = {}
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                item = ray.get(self.collector.take.remote(0.5))
                if item is not None:
                    self._merge(item)
                    ray.get(self.collector.ack.remote(item["worker"], item["chunk"]))
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _merge(self, item: dict) -> None:
        worker, chunk, count = item["worker"], int(item["chunk"]), int(item["count"])
        with self.lock:
            if chunk in self.chunks_done.get(worker, set()):
                raise RuntimeError(f"partial statistics chunk {chunk} of worker {worker} arrived twice")
            if self.bounds[chunk] != (item["p0"], item["p1"]) or item["n_chunks"] != len(self.bounds):
                raise RuntimeError(f"worker {worker} sent chunk {chunk} = positions {item['p0']}:{item['p1']}, "
                                   f"expected {self.bounds[chunk]} of {len(self.bounds)}")
        part = ray.get(item["ref"][0])
        other = GaussianStats(count, torch.from_numpy(np.array(part["mean"])), torch.from_numpy(np.array(part["m2"])))
        del part
        view = self.views[chunk]
        if view.count == 0:  # merge_ would rebind the view to a copy; write into the accumulator instead
            view.mean.copy_(other.mean)
            view.m2.copy_(other.m2)
            view.count = other.count
        else:
            view.merge_(other)  # in place: add_/baddbmm_ into the accumulator's slices
        with self.lock:
            self.chunks_done.setdefault(worker, set()).add(chunk)
            self.counts[worker] = count
            self.n_chunks[worker] = int(item["n_chunks"])
            self.last_progress = time.monotonic()

    def complete(self, worker: str) -> bool:
        with self.lock:
            return worker in self.n_chunks and len(self.chunks_done[worker]) == self.n_chunks[worker]


# --------------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _pipeline(records: Sequence[Record], image_size: int, batch_size: int, workers: int, cpus_per_worker: float,
              udf: type, ctor_args: tuple) -> Iterator[Iterator[dict[str, np.ndarray]]]:
    """Run paths -> decode tasks -> actor pool `udf`; yields an iterator over its output batches (numpy dicts).

    Blocks of at most `batch_size` consecutive images are the unit of work end to end (no batch_size
    re-bundling: Ray Data would merge small blocks and hand one actor most of a small dataset). While the
    block runs, Ray Data's progress bars and INFO logs are off and its object-store budget is capped.
    """
    from ray.data import DataContext, ExecutionResources

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.resource_limits)
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    batches = None
    try:
        data_logger.setLevel(logging.ERROR)
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.execution_options.resource_limits = ExecutionResources.for_limits(
            object_store_memory=_object_store_budget(image_size, batch_size, workers))
        items = [{"idx": i, "path": r.path} for i, r in enumerate(records)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
        ds = ds.map_batches(decode_batch, fn_kwargs={"image_size": image_size}, batch_size=None,
                            batch_format="numpy", num_cpus=DECODE_CPUS)
        ds = ds.map_batches(udf, fn_constructor_args=ctor_args, batch_size=None, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker)
        batches = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
        yield iter(batches)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.resource_limits = saved
        data_logger.setLevel(saved_level)


def _object_store_budget(image_size: int, batch_size: int, workers: int) -> int:
    """Room for a few decoded batches per actor in flight; a constant, whatever the number of images."""
    batch_bytes = batch_size * 3 * image_size * image_size * 4
    return int(max(256 << 20, 4 * (workers + 1) * batch_bytes))


def _check_args(records: Sequence[Record], batch_size: int, workers: int, cpus_per_worker: float) -> None:
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    total = ray.cluster_resources().get("CPU", 0.0)
    need = workers * cpus_per_worker + DECODE_CPUS
    if total < need:
        raise UserError(f"the Ray cluster has {total:g} logical CPUs; {workers} workers x {cpus_per_worker:g} CPUs "
                        f"plus {DECODE_CPUS:g} for decoding need {need:g} (use fewer workers or add nodes)")


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
    info: images (counted), skipped (paths), workers [{worker, node, images}], nodes, seconds, images_per_s.
    """
    if len(records) < 2:
        raise UserError(f"PADIM needs at least 2 training images, got {len(records)}")
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call distributed_anomaly.distributed.ensure_ray() first")
    _check_args(records, batch_size, workers, cpus_per_worker)
    start = time.perf_counter()
    model.eval()
    acc = engine.empty_stats(model)
    payload = ray.put(model_payload(model, with_gaussian=False))
    # Next to the driver: it only relays chunk references; the chunks go from each actor's node to the driver.
    collector = PartialCollector.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=True)).remote()
    merger = _Merger(collector, acc)
    merger.start()
    threads = _default_threads(cpus_per_worker, threads_per_worker)
    seen = np.zeros(len(records), dtype=bool)
    rows_per_worker: Counter[str] = Counter()  # images each worker counted (ok rows)
    node_of: dict[str, str] = {}
    skipped: list[str] = []
    bar = Progress(len(records), f"fit padim (ray, {workers} workers)", progress)
    finished = False
    try:
        with _pipeline(records, model.image_size, batch_size, workers, cpus_per_worker, PadimPartial,
                       (payload, collector, threads)) as batches:
            for out in batches:
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
                if merger.error is not None:
                    raise merger.error
        bar.close()
        if not seen.all():
            missing = np.flatnonzero(~seen)
            raise RuntimeError(f"{len(missing)} images never came back from the pipeline (first: "
                               f"{records[missing[0]].path})")
        _wait_for_partials(merger, rows_per_worker, node_of)
        finished = True
    finally:
        merger.stop.set()
        if not finished:
            with contextlib.suppress(Exception):
                ray.get(collector.abort.remote(), timeout=10)
        merger.join(timeout=30)
        ray.kill(collector)
    n_images = len(records) - len(skipped)
    if n_images < 2:
        raise UserError(f"PADIM needs at least 2 readable training images, got {n_images} "
                        f"({len(skipped)} unreadable skipped)")
    acc.count = n_images
    if skipped:
        _warn(f"{len(skipped)} of {len(records)} training images were unreadable and left out of the fit")
    model.set_gaussian(acc)
    seconds = time.perf_counter() - start
    info = {"images": n_images, "manifest_images": len(records), "skipped": skipped, "num_skipped": len(skipped),
            "workers": [{"worker": w, "node": node_of[w], "images": n} for w, n in sorted(rows_per_worker.items())],
            "nodes": sorted(set(node_of[w] for w in rows_per_worker)), "seconds": round(seconds, 3),
            "images_per_s": round(len(records) / seconds, 2), "dtype": str(acc.dtype).replace("torch.", "")}
    return acc, info


def _wait_for_partials(merger: _Merger, rows_per_worker: Counter, node_of: dict[str, str]) -> None:
    """Block until every worker that counted images has delivered its whole partial, with matching counts."""
    expected = {w: n for w, n in rows_per_worker.items() if n > 0}
    wait_start = time.monotonic()
    while True:
        if merger.error is not None:
            raise merger.error
        pending = [w for w in expected if not merger.complete(w)]
        if not pending:
            break
        if time.monotonic() - max(merger.last_progress, wait_start) > FLUSH_TIMEOUT_S:
            w = pending[0]
            raise RuntimeError(
                f"the statistics of {len(pending)} worker(s) never arrived (first: worker {w} on node {node_of[w]}, "
                f"{expected[w]} images): the actor died or could not hand over its partial; the fit is incomplete")
        time.sleep(0.02)
    for w, n in expected.items():
        if merger.counts[w] != n:
            raise RuntimeError(f"worker {w} on node {node_of[w]} returned {n} images but its statistics count "
                               f"{merger.counts[w]}: the fit is inconsistent")
    extra = set(merger.counts) - set(expected)
    if extra:
        raise RuntimeError(f"statistics arrived from worker(s) {sorted(extra)} that returned no images")
    total = sum(expected.values())
    if any(v.count != total for v in merger.views):
        raise RuntimeError(f"position chunks hold image counts {sorted({v.count for v in merger.views})}, "
                           f"expected {total}")


def anomaly_maps_ray(model: torch.nn.Module, records: Sequence[Record], image_size: int, batch_size: int = 32,
                     workers: int = 1, progress: bool = True, what: str = "score", cpus_per_worker: float = 1.0,
                     threads_per_worker: int | None = None) -> np.ndarray:
    """(N, S, S) float32 raw anomaly maps in record order, by Ray Data batch inference (like engine.anomaly_maps)."""
    out = np.empty((len(records), image_size, image_size), dtype=np.float32)
    if not records:
        return out
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call distributed_anomaly.distributed.ensure_ray() first")
    _check_args(records, batch_size, workers, cpus_per_worker)
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
