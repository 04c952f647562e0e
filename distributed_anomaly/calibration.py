"""Scoring records, fitting thresholds on calibration images, and evaluating a test split.

A `Scorer` turns records into raw maps wherever the model runs (in this process, on Ray Data, or as a
quantised OpenVINO graph during int8 export), so the threshold rule and the metrics are the same for all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from distributed_anomaly import engine
from distributed_anomaly.config import DEFAULT_RUNTIME, ModelConfig, TrainConfig
from distributed_anomaly.data.loader import load_masks
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.data.sizes import ImageSize
from distributed_anomaly.evaluation import compute_metrics
from distributed_anomaly.postprocess import PostProcessor, fit_postprocessor, no_threshold_postprocessor

Scorer = Callable[[Sequence[Record], str], np.ndarray]  # (records, what) -> (N, H, W) raw maps


def in_process_scorer(
    model,
    image_size: ImageSize,
    batch_size: int,
    progress: bool,
    runtime: str = DEFAULT_RUNTIME,
    precision: str = "f32",
) -> Scorer:
    return lambda records, what: engine.anomaly_maps(
        model, records, image_size, batch_size, progress, what, runtime=runtime, precision=precision
    )


def scored_once(score: Scorer, records: Sequence[Record], what: str = "score") -> Scorer:
    """`score` run once over `records` (each path once); the returned scorer answers any subset of them from
    that pass. On Ray each call of a scorer starts a pool (processes, imports, the model): calibration and
    test then cost one start, not two. The price: both splits' maps are held together (a split asked for in
    the order it was scored is a view, not a copy)."""
    unique = list({r.path: r for r in records}.values())
    maps = score(unique, what)
    row = {r.path: i for i, r in enumerate(unique)}

    def answer(subset: Sequence[Record], _what: str) -> np.ndarray:
        missing = [r.path for r in subset if r.path not in row]
        if missing:
            raise KeyError(f"{missing[0]} was not in the scored records ({len(missing)} missing)")
        rows = [row[r.path] for r in subset]
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):
            return maps[rows[0] : rows[0] + len(rows)]
        return maps[rows]

    return answer


def calibrate(
    model,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    calib: list[Record],
    fit_records: list[Record],
    progress: bool,
    score: Scorer | None = None,
) -> PostProcessor:
    """Thresholds and normalisation from the calibration images (see postprocess for the rule)."""
    score = score or in_process_scorer(model, cfg.image_size, tcfg.batch_size, progress)
    if calib:
        maps = score(calib, "calibrate")
        labels = np.array([r.label for r in calib], dtype=bool)
        masks = load_masks(calib, cfg.image_size) if labels.any() else None
        return fit_postprocessor(
            maps.reshape(len(maps), -1).max(1),
            labels,
            maps,
            masks,
            user_threshold=tcfg.threshold,
            user_pixel_threshold=tcfg.pixel_threshold,
            target_fpr=tcfg.target_fpr,
        )
    # No calibration images: normalise with the training images' own maps.
    maps = score(fit_records, "normalise")
    if tcfg.threshold is not None:
        return fit_postprocessor(
            maps.reshape(len(maps), -1).max(1),
            np.zeros(len(maps), bool),
            maps,
            user_threshold=tcfg.threshold,
            user_pixel_threshold=tcfg.pixel_threshold,
        )
    return no_threshold_postprocessor(maps)


def evaluate_model(
    model,
    cfg: ModelConfig,
    post: PostProcessor,
    test: list[Record],
    batch_size: int,
    progress: bool,
    score: Scorer | None = None,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics, raw maps and ground-truth masks of the test split (maps and masks feed the report)."""
    maps = (score or in_process_scorer(model, cfg.image_size, batch_size, progress))(test, "evaluate")
    masks = load_masks(test, cfg.image_size)
    return compute_metrics(maps, test, masks, post), maps, masks
