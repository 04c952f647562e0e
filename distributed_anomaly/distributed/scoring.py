"""Scoring on Ray Data: raw anomaly maps of any fitted model (PADIM or STFPM) by batch inference on a pool.

    manifest --> [decode tasks] --> [ModelScorer actors: model(x)[:, 0]] --> (idx, map) rows --> driver

Same maps as engine.anomaly_maps, in record order; every image must come back exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from distributed_anomaly.config import DEFAULT_RUNTIME
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.data.progress import Progress
from distributed_anomaly.data.sizes import ImageSize, as_hw
from distributed_anomaly.distributed.payload import build_from_payload, model_payload, set_threads
from distributed_anomaly.distributed.pool import (
    check_pool_args,
    default_threads,
    pool_pipeline,
    require_ray,
    resolve,
)
from distributed_anomaly.engine import map_function
from distributed_anomaly.errors import ImageReadError


class ModelScorer:
    """Pool actor for batch inference: (B, 3, S, S) -> raw anomaly maps (B, S, S)."""

    def __init__(self, payload: Any, threads: int, runtime: str, precision: str) -> None:
        set_threads(threads)
        self.model = build_from_payload(resolve(payload))
        self.maps = map_function(self.model, runtime, precision, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], dtype=bool)
        pixels = batch["pixels"]
        maps = np.zeros((len(ok), pixels.shape[-2], pixels.shape[-1]), dtype=np.float32)
        if ok.any():
            with torch.inference_mode():
                maps[ok] = self.maps(torch.from_numpy(np.ascontiguousarray(pixels[ok])))[:, 0].numpy()
        return {"idx": batch["idx"], "ok": ok, "error": batch["error"], "map": maps}


def anomaly_maps_ray(
    model: torch.nn.Module,
    records: Sequence[Record],
    image_size: ImageSize,
    batch_size: int = 32,
    workers: int = 1,
    progress: bool = True,
    what: str = "score",
    cpus_per_worker: float = 1.0,
    threads_per_worker: int | None = None,
    runtime: str = DEFAULT_RUNTIME,
    precision: str = "f32",
) -> np.ndarray:
    """(N, H, W) float32 raw anomaly maps in record order, by Ray Data batch inference (like engine.anomaly_maps;
    PADIM's frozen network on `runtime` at `precision`)."""
    out = np.empty((len(records), *as_hw(image_size)), dtype=np.float32)
    if not records:
        return out
    require_ray()
    check_pool_args(batch_size, workers, cpus_per_worker)
    model.eval()
    payload = ray.put(model_payload(model, with_gaussian=True))
    threads = default_threads(cpus_per_worker, threads_per_worker)
    seen = np.zeros(len(records), dtype=bool)
    bar = Progress(len(records), f"{what} (ray, {workers} workers)", progress)
    with pool_pipeline(
        records, image_size, batch_size, workers, cpus_per_worker, ModelScorer, (payload, threads, runtime, precision)
    ) as batches:
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
