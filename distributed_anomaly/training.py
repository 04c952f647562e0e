"""`train` end to end in one process: manifest -> split -> fit -> calibrate -> evaluate -> RUN_DIR."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distributed_anomaly import engine, rundir
from distributed_anomaly.config import ModelConfig, TrainConfig
from distributed_anomaly.data.loader import load_masks
from distributed_anomaly.data.mvtec import Record, load_dataset, records_of_split, split_train_val
from distributed_anomaly.errors import UserError
from distributed_anomaly.evaluation import compute_metrics
from distributed_anomaly.fileio import write_json
from distributed_anomaly.postprocess import PostProcessor, fit_postprocessor, no_threshold_postprocessor


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def calibrate(model, cfg: ModelConfig, tcfg: TrainConfig, calib: list[Record], fit_records: list[Record],
              progress: bool) -> PostProcessor:
    """Thresholds and normalisation from the calibration images (see postprocess for the rule)."""
    if calib:
        maps = engine.anomaly_maps(model, calib, cfg.image_size, tcfg.batch_size, progress, "calibrate")
        labels = np.array([r.label for r in calib], dtype=bool)
        masks = load_masks(calib, cfg.image_size) if labels.any() else None
        return fit_postprocessor(maps.reshape(len(maps), -1).max(1), labels, maps, masks,
                                 user_threshold=tcfg.threshold, user_pixel_threshold=tcfg.pixel_threshold)
    # No calibration images: normalise with the training images' own maps.
    maps = engine.anomaly_maps(model, fit_records, cfg.image_size, tcfg.batch_size, progress, "normalise")
    if tcfg.threshold is not None:
        return fit_postprocessor(maps.reshape(len(maps), -1).max(1), np.zeros(len(maps), bool), maps,
                                 user_threshold=tcfg.threshold, user_pixel_threshold=tcfg.pixel_threshold)
    return no_threshold_postprocessor(maps)


def evaluate_model(model, cfg: ModelConfig, post: PostProcessor, test: list[Record], batch_size: int,
                   progress: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics, raw maps and ground-truth masks of the test split (maps and masks feed the report)."""
    maps = engine.anomaly_maps(model, test, cfg.image_size, batch_size, progress, "evaluate")
    masks = load_masks(test, cfg.image_size)
    return compute_metrics(maps, test, masks, post), maps, masks


def _finish(run: str | os.PathLike, metrics: dict, test: list[Record], maps: np.ndarray, masks: np.ndarray,
            post: PostProcessor, report: bool) -> None:
    write_json(Path(run) / rundir.METRICS, metrics)
    if report:
        from distributed_anomaly.report import write_report

        metrics["report"] = str(write_report(run, test, maps, masks, post, metrics))


@dataclass(frozen=True)
class Execution:
    """Where the fit runs; does not change what is computed (tests check the Ray and in-process fits agree).

    workers 0 and no address: in this process. workers >= 1 or an address: on Ray (a local single-node Ray when
    no address is given; `auto` or HOST:PORT joins a cluster).
    """

    workers: int = 0
    address: str | None = None
    skip_corrupt: bool = False
    storage: str | None = None
    resume: str | None = None

    @property
    def uses_ray(self) -> bool:
        return self.workers > 0 or bool(self.address) or self.resume is not None


def _maybe_ray(run: Execution):
    if not run.uses_ray:
        return contextlib.nullcontext()
    from distributed_anomaly.distributed.ray_setup import ray_session

    return ray_session(run.address)


def train(data: str | os.PathLike, out: str | os.PathLike, cfg: ModelConfig, tcfg: TrainConfig,
          progress: bool = True, overwrite: bool = False, report: bool = False,
          run: Execution = Execution()) -> dict:
    """Fit, calibrate, evaluate and save; returns the metrics (also in RUN_DIR/metrics.json)."""
    if run.skip_corrupt and not run.uses_ray:
        raise UserError("--skip-corrupt applies to Ray fitting (--workers N)")
    if (Path(out) / rundir.CONFIG).exists() and not overwrite:
        raise UserError(f"{out} already holds a trained model; choose another --out or pass --overwrite")
    tcfg = tcfg.resolved(cfg.model)
    records = load_dataset(data)
    test = records_of_split(records, "test")
    fit_records, val = split_train_val(records, tcfg.val_fraction, cfg.seed)
    log(f"data: {len(fit_records)} training, {len(val)} validation (held out from train/good), {len(test)} test images")
    model = rundir.build_model(cfg, pretrained=tcfg.pretrained, weights_file=tcfg.weights_file)
    start = time.perf_counter()
    info: dict = {"data": str(Path(data).resolve()), "num_train_images": len(fit_records),
                  "num_val_images": len(val), "workers": run.workers, "ray": run.uses_ray}
    with _maybe_ray(run):
        if cfg.model == "padim" and run.uses_ray:
            from distributed_anomaly.distributed.padim_fit import fit_padim_ray

            stats, ray_info = fit_padim_ray(model, fit_records, batch_size=tcfg.batch_size, workers=max(run.workers, 1),
                                            progress=progress, skip_corrupt=run.skip_corrupt)
            info["images_counted"] = stats.count
            info["ray_fit"] = ray_info
        elif cfg.model == "padim":
            info["images_counted"] = engine.fit_padim(model, fit_records, tcfg.batch_size, progress).count
        elif run.uses_ray:
            from distributed_anomaly.distributed.stfpm_train import train_stfpm_ray

            model, ray_info = train_stfpm_ray(cfg, tcfg, fit_records, val, workers=run.workers, model=model,
                                              storage=run.storage or str(Path(out).resolve() / "ray_train"),
                                              resume_from=run.resume, progress=progress)
            history = ray_info.pop("history")
            info.update(best_epoch=ray_info.get("best_epoch"), epochs_run=ray_info.get("epochs_run"),
                        stopped_early=ray_info.get("stopped_early"), ray_train=ray_info)
            write_json(Path(out) / rundir.HISTORY, history)
        else:
            result = engine.train_stfpm(model, fit_records, val, epochs=tcfg.epochs, batch_size=tcfg.batch_size,
                                        lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay,
                                        patience=tcfg.patience, seed=cfg.seed, progress=progress)
            info.update(best_epoch=result.best_epoch, epochs_run=len(result.history),
                        stopped_early=result.stopped_early)
            write_json(Path(out) / rundir.HISTORY, [asdict(h) for h in result.history])
    info["fit_seconds"] = round(time.perf_counter() - start, 3)
    calib = test if tcfg.calibrate_on_test else val
    if tcfg.calibrate_on_test:
        log("warning: --calibrate-on-test fits thresholds on the test images; threshold-dependent metrics are optimistic")
    post = calibrate(model, cfg, tcfg, calib, fit_records, progress)
    metrics, maps, masks = evaluate_model(model, cfg, post, test, tcfg.batch_size, progress)
    metrics["calibrated_on"] = "test" if tcfg.calibrate_on_test else ("validation" if val else "none")
    rundir.save_model(out, cfg, tcfg, model, post, info)
    _finish(out, metrics, test, maps, masks, post, report)
    return metrics


def evaluate_run(run: str | os.PathLike, data: str | os.PathLike | None = None, batch_size: int = 32,
                 progress: bool = True, report: bool = False) -> dict:
    """Re-score a saved run on its (or another) dataset's test split with its stored thresholds."""
    cfg, model, post = rundir.load_model(run)
    _, tcfg, info = rundir.load_config(run)
    data = data or info.get("data")
    if not data:
        raise UserError(f"{run} does not record its dataset; pass --data")
    test = records_of_split(load_dataset(data), "test")
    metrics, maps, masks = evaluate_model(model, cfg, post, test, batch_size, progress)
    metrics["calibrated_on"] = "test" if tcfg.calibrate_on_test else ("validation" if tcfg.val_fraction else "none")
    _finish(run, metrics, test, maps, masks, post, report)
    return metrics
