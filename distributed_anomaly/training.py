"""`train` end to end in one process: manifest -> split -> fit -> calibrate -> evaluate -> RUN_DIR."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from distributed_anomaly import engine, rundir
from distributed_anomaly import storage as shared
from distributed_anomaly.calibration import Scorer, calibrate, evaluate_model, in_process_scorer, scored_once
from distributed_anomaly.config import (
    DEFAULT_RUNTIME,
    FROZEN_FIT_MODELS,
    Execution,
    ModelConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from distributed_anomaly.data.dataset import load_dataset, resolve_layout
from distributed_anomaly.data.layout import DataLayout
from distributed_anomaly.data.mvtec import Record, records_of_split, split_train_val
from distributed_anomaly.distributed.cpus import local_ray_cpus
from distributed_anomaly.errors import ImageReadError, TrainingInterrupted, UserError
from distributed_anomaly.fileio import read_json, write_json
from distributed_anomaly.postprocess import PostProcessor
from distributed_anomaly.report import write_report

logger = logging.getLogger(__name__)
# The Ray glue (distributed.*) imports Ray, which an in-process run never needs: imported where a run uses Ray.


def finish_run(
    run: str | os.PathLike,
    metrics: dict,
    test: list[Record],
    maps: np.ndarray,
    masks: np.ndarray,
    post: PostProcessor,
    report: bool,
) -> None:
    """metrics.json, and with `report` the HTML report beside it (its path added to `metrics`)."""
    write_json(Path(run) / rundir.METRICS, metrics)
    if report:
        metrics["report"] = str(write_report(run, test, maps, masks, post, metrics))


def _maybe_ray(run: Execution, model: str):
    """The Ray session a run needs: none in process; a local Ray sized to the fit; or the cluster at the address."""
    if not run.uses_ray:
        return contextlib.nullcontext()
    import ray

    from distributed_anomaly.distributed.ray_setup import ray_session

    num_cpus = None
    if not run.address and not ray.is_initialized():  # else this process's Ray is used, whatever its size
        num_cpus = local_ray_cpus(model, run.workers)
        logger.info(
            f"starting a local Ray with {num_cpus} logical CPUs for {max(run.workers, 1)} worker(s) and "
            "their decoding (--address joins a running cluster instead)"
        )
    return ray_session(run.address, num_cpus=num_cpus)


def train(
    data: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    progress: bool = True,
    overwrite: bool = False,
    report: bool = False,
    run: Execution | None = None,
    layout: DataLayout | None = None,
) -> dict:
    """Fit, calibrate, evaluate and save; returns the metrics (also in RUN_DIR/metrics.json).

    `run` says where the fit runs (default: in this process); `layout` how `data` is laid out (default:
    detected), recorded in config.json so that `evaluate` and `export` read the data the same way."""
    run = run or Execution()
    _check_target(out, overwrite, run)
    tcfg = tcfg.resolved(cfg.model)
    if cfg.model == "stfpm" and run.uses_ray and run.run_name is None:
        run = replace(run, run_name=f"stfpm-{uuid.uuid4().hex[:8]}")
    layout = resolve_layout(data, layout)
    records = load_dataset(data, layout)
    test = records_of_split(records, "test")
    fit_records, val = split_train_val(records, tcfg.val_fraction, cfg.seed)
    # Ray PADIM's fit pipeline skips (or stops on) unreadable images itself; every other split is checked here,
    # before any work, so a bad test image cannot fail the run after a whole fit.
    own_check = cfg.model in FROZEN_FIT_MODELS and run.uses_ray
    fit_records, val, test, skipped = screen_splits(fit_records, val, test, run.skip_corrupt, check_fit=not own_check)
    logger.info(
        f"data: {len(fit_records)} training, {len(val)} validation (held out from train/good), {len(test)} test images"
    )
    model = rundir.build_model(cfg, pretrained=tcfg.pretrained, weights_file=tcfg.weights_file)
    if run.resume is None:  # once the inputs are known good, before any work: what `train --resume` continues
        if overwrite:  # the old run stops being complete before any of it is replaced
            (Path(out) / rundir.CONFIG).unlink(missing_ok=True)
        _write_request(out, data, layout, cfg, tcfg, run)
    info: dict = {"data": str(Path(data).resolve()), "data_layout": layout.to_dict()}
    info.update(num_train_images=len(fit_records), num_val_images=len(val))
    info.update(workers=run.workers, ray=run.uses_ray)
    with _maybe_ray(run, cfg.model):
        model, fit_info, history = _fit_or_interrupt(model, cfg, tcfg, fit_records, val, run, out, progress)
        info.update(fit_info)
        if own_check:  # the images the Ray fit skipped are left out of everything after it too
            skipped["train"] = list(fit_info["ray_fit"]["skipped"])
            fit_records = [r for r in fit_records if r.path not in set(skipped["train"])]
        if history is not None:
            write_json(Path(out) / rundir.HISTORY, history)
        post, metrics, maps, masks = _calibrate_and_evaluate(model, cfg, tcfg, run, (fit_records, val, test), progress)
    metrics["calibrated_on"] = "test" if tcfg.calibrate_on_test else ("validation" if val else "none")
    metrics["skipped_images"] = info["skipped_images"] = skipped
    rundir.save_model(out, cfg, tcfg, model, post, info)
    finish_run(out, metrics, test, maps, masks, post, report)
    if run.storage:
        uploaded = shared.upload(out, shared.counterpart(run.storage, out), marker=rundir.CONFIG)
        logger.info(f"run uploaded to {uploaded}")
    return metrics


def _calibrate_and_evaluate(model, cfg: ModelConfig, tcfg: TrainConfig, run: Execution, splits, progress: bool):
    """Thresholds from the calibration split, then the test metrics; on Ray Data when the fit ran on Ray."""
    fit_records, val, test = splits
    if tcfg.calibrate_on_test:
        logger.warning(
            "--calibrate-on-test fits thresholds on the test images; threshold-dependent metrics are optimistic"
        )
    calib = test if tcfg.calibrate_on_test else val
    if run.uses_ray:  # one pool for both splits (calibrate scores the training images when there is no calib)
        score = scored_once(_ray_scorer(model, cfg, tcfg, run, progress), [*(calib or fit_records), *test])
    else:
        score = in_process_scorer(model, cfg.image_size, tcfg.batch_size, progress, run.runtime, run.precision)
    post = calibrate(model, cfg, tcfg, calib, fit_records, progress, score)
    metrics, maps, masks = evaluate_model(model, cfg, post, test, tcfg.batch_size, progress, score)
    return post, metrics, maps, masks


def screen_splits(
    fit_records: list[Record], val: list[Record], test: list[Record], skip_corrupt: bool, check_fit: bool = True
) -> tuple[list[Record], list[Record], list[Record], dict[str, list[str]]]:
    """The splits without their unreadable images, and {split: skipped paths} (what metrics.json lists).

    Validation and test images are always checked (a bad one stops the run here, before the fit, unless
    skip_corrupt); training images with skip_corrupt only (else the fit stops on the first one) and
    unless the caller's fit checks them itself (check_fit False: Ray PADIM)."""
    splits = {"train": fit_records, "validation": val, "test": test}
    skipped: dict[str, list[str]] = {name: [] for name in splits}
    for name, records in splits.items():
        if name == "train" and not (skip_corrupt and check_fit):
            continue
        bad = engine.unreadable_images(records)
        if bad and not skip_corrupt:
            raise ImageReadError(
                f"{bad[0][1]} ({len(bad)} unreadable image(s) in the {name} split; --skip-corrupt leaves them "
                "out and lists them in metrics.json)"
            )
        for _, why in bad:
            logger.warning(f"skipping unreadable image: {why}")
        skipped[name] = [r.path for r, _ in bad]
        gone = set(skipped[name])
        splits[name] = [r for r in records if r.path not in gone]
    return splits["train"], splits["validation"], splits["test"], skipped


def _check_target(out: str | os.PathLike, overwrite: bool, run: Execution) -> None:
    """Refuse to overwrite a finished run, or to start over an interrupted one, unless asked to."""
    if (Path(out) / rundir.CONFIG).exists() and not overwrite:
        raise UserError(f"{out} already holds a trained model; choose another --out or pass --overwrite")
    if (Path(out) / rundir.REQUEST).exists() and not overwrite and run.resume is None:
        raise UserError(
            f"{out} holds an unfinished (interrupted?) training run: continue it with "
            f"`train --resume {out}` (Ray STFPM runs) or pass --overwrite to start again"
        )


def _fit_or_interrupt(model, cfg, tcfg, fit_records, val, run: Execution, out, progress: bool) -> tuple:
    """fit_model; a Ray STFPM run that stops keeps its checkpoints and says how to continue it."""
    try:
        return fit_model(model, cfg, tcfg, fit_records, val, run, _storage(out, run), progress)
    except RuntimeError as exc:
        if not (cfg.model == "stfpm" and run.uses_ray):
            raise
        raise TrainingInterrupted(
            f"{exc.__cause__ or exc}\nSTFPM training stopped; its checkpoints are kept: "
            f"continue with `distributed-anomaly train --resume {out}`"
        ) from exc


def fit_model(
    model,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    fit_records: list[Record],
    val: list[Record],
    run: Execution,
    storage: str,
    progress: bool,
    **stfpm_ray_options,
) -> tuple:
    """Fit `model` where `run` says (Ray must be up if run.uses_ray); returns (model, info, history or None).

    The one fitting step of `train` and of a `tune` trial: PADIM's Gaussians (Ray Data actors or in process) or
    STFPM's student (Ray Train or in process) followed by the batch-norm recompute; `stfpm_ray_options` go to
    train_stfpm_ray (a search's per-epoch hook and callbacks). A Ray STFPM failure is a RuntimeError.
    """
    start = time.perf_counter()
    if cfg.model in FROZEN_FIT_MODELS:
        model, info = _fit_frozen(model, cfg.model, tcfg, fit_records, run, progress)
        history = None
    else:
        model, info, history = _fit_stfpm(
            model, cfg, tcfg, fit_records, val, run, storage, progress, **stfpm_ray_options
        )
    if cfg.model == "stfpm" and tcfg.bn_recompute:
        info["batchnorm_recomputed_on"] = engine.recompute_batchnorm(model, fit_records, tcfg.batch_size, cfg.seed)
    info["fit_seconds"] = round(time.perf_counter() - start, 3)
    return model, info, history


def _fit_frozen(model, kind: str, tcfg: TrainConfig, records: list[Record], run: Execution, progress: bool) -> tuple:
    """PADIM's Gaussians or PatchCore's memory bank (`kind`): on a Ray Data actor pool, the workers' partial
    results merged here, or in this process; (model, info)."""
    patchcore = kind == "patchcore"
    frozen = {"runtime": run.runtime, "precision": run.precision}
    if run.uses_ray:
        from distributed_anomaly.distributed import padim_fit, patchcore_fit

        fit = patchcore_fit.fit_patchcore_ray if patchcore else padim_fit.fit_padim_ray
        options = dict(workers=max(run.workers, 1), progress=progress, skip_corrupt=run.skip_corrupt, **frozen)
        result, ray_info = fit(model, records, batch_size=tcfg.batch_size, **options)
    else:
        fit = engine.fit_patchcore if patchcore else engine.fit_padim
        result, ray_info = fit(model, records, tcfg.batch_size, progress, **frozen), None
    info = {"coreset": result.summary()} if patchcore else {"images_counted": result.count}
    info["runtime"], info["frozen_precision"] = run.runtime, run.precision
    if ray_info is not None:
        info["ray_fit"] = ray_info
    return model, info


def _fit_stfpm(
    model,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    fit_records: list[Record],
    val: list[Record],
    run: Execution,
    storage: str,
    progress: bool,
    **stfpm_ray_options,
) -> tuple:
    """STFPM's student on Ray Train or in this process; (model, info, history)."""
    if not run.uses_ray:
        result = engine.train_stfpm(
            model,
            fit_records,
            val,
            epochs=tcfg.epochs,
            batch_size=tcfg.batch_size,
            lr=tcfg.lr,
            momentum=tcfg.momentum,
            weight_decay=tcfg.weight_decay,
            patience=tcfg.patience,
            seed=cfg.seed,
            progress=progress,
            runtime=run.runtime,
            precision=run.precision,
        )
        info = {"best_epoch": result.best_epoch, "epochs_run": len(result.history)}
        return model, {**info, "stopped_early": result.stopped_early}, [asdict(h) for h in result.history]
    from distributed_anomaly.distributed.stfpm_train import train_stfpm_ray

    model, ray_info = train_stfpm_ray(
        cfg,
        tcfg,
        fit_records,
        val,
        workers=run.workers,
        model=model,
        storage=storage,
        run_name=run.run_name or "stfpm",
        resume_from=run.resume,
        progress=progress,
        max_failures=run.max_failures,
        runtime=run.runtime,
        precision=run.precision,
        **stfpm_ray_options,
    )
    history = ray_info.pop("history")
    info = {k: ray_info[k] for k in ("best_epoch", "epochs_run", "stopped_early")}
    info["ray_train"] = ray_info
    return model, info, history


def _ray_scorer(model, cfg: ModelConfig, tcfg: TrainConfig, run: Execution, progress: bool) -> Scorer:
    """Scoring as Ray Data batch inference over the same pool size as the fit (PADIM and STFPM alike)."""
    from distributed_anomaly.distributed.scoring import anomaly_maps_ray

    return lambda records, what: anomaly_maps_ray(
        model,
        records,
        cfg.image_size,
        tcfg.batch_size,
        workers=max(run.workers, 1),
        progress=progress,
        what=what,
        runtime=run.runtime,
        precision=run.precision,
    )


def _storage(out: str | os.PathLike, run: Execution) -> str:
    """Where Ray STFPM checkpoints go: RUN_DIR/ray_train, or its counterpart in shared storage (every node
    writes and reads there)."""
    return shared.join(shared.counterpart(run.storage, out) if run.storage else str(Path(out).resolve()), "ray_train")


def _write_request(
    out: str | os.PathLike,
    data: str | os.PathLike,
    layout: DataLayout,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    run: Execution,
) -> None:
    """RUN_DIR/request.json: what `train --resume` needs to start the run again."""
    Path(out).mkdir(parents=True, exist_ok=True)
    request = {"data": str(Path(data).resolve()), "data_layout": layout.to_dict(), "model": to_dict(cfg)}
    write_json(Path(out) / rundir.REQUEST, {**request, "train": to_dict(tcfg), "execution": asdict(run)})


def resume(out: str | os.PathLike, progress: bool = True, report: bool = False, address: str | None = None) -> dict:
    """Continue an interrupted `train` run from its latest checkpoint (Ray STFPM runs keep checkpoints).

    The arguments are those the run was started with (RUN_DIR/request.json); only the cluster `address`
    may change (a restarted cluster). Returns the metrics, as `train`.
    """
    out = Path(out)
    if (out / rundir.CONFIG).exists():
        raise UserError(f"{out} is a finished run (config.json is there): nothing to resume")
    if not (out / rundir.REQUEST).is_file():
        raise UserError(f"{out} holds no interrupted run: {rundir.REQUEST} is missing (is it the --out of a train?)")
    try:
        req = read_json(out / rundir.REQUEST)
        cfg, tcfg = from_dict(ModelConfig, req["model"]), from_dict(TrainConfig, req["train"])
        run = Execution(**req["execution"])
        layout = DataLayout.from_dict(req.get("data_layout"))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"cannot read {out / rundir.REQUEST}: {exc}") from exc
    if cfg.model != "stfpm" or not run.uses_ray or not run.run_name:
        raise UserError(
            f"{out} was a {cfg.model} run {'on Ray' if run.uses_ray else 'in this process'}, which keeps "
            "no checkpoints: start it again with --overwrite (STFPM runs with --workers N >= 1 resume)"
        )
    run = replace(run, address=address or run.address, resume=shared.join(_storage(out, run), run.run_name))
    logger.info(f"resuming {out}: {cfg.model} on {cfg.backbone}, data {req['data']}")
    return train(req["data"], out, cfg, tcfg, progress=progress, report=report, run=run, layout=layout)


def evaluate_run(
    run: str | os.PathLike,
    data: str | os.PathLike | None = None,
    batch_size: int = 32,
    progress: bool = True,
    report: bool = False,
    runtime: str = DEFAULT_RUNTIME,
    layout: DataLayout | None = None,
    skip_corrupt: bool = False,
    precision: str = "f32",
) -> dict:
    """Re-score a saved run on its (or another) dataset's test split with its stored thresholds.

    Without `data`, the run's own dataset read with its recorded layout; with `data`, `layout` (default:
    detected). With skip_corrupt, unreadable test images are left out and listed in metrics.json (as `train`
    does)."""
    cfg, model, post = rundir.load_model(run)
    _, tcfg, info = rundir.load_config(run)
    if not data:
        data, layout = info.get("data"), DataLayout.from_dict(info.get("data_layout"))
    if not data:
        raise UserError(f"{run} does not record its dataset; pass --data")
    _, _, test, skipped = screen_splits([], [], records_of_split(load_dataset(data, layout), "test"), skip_corrupt)
    score = in_process_scorer(model, cfg.image_size, batch_size, progress, runtime, precision)
    metrics, maps, masks = evaluate_model(model, cfg, post, test, batch_size, progress, score)
    metrics["skipped_images"] = {"test": skipped["test"]}
    metrics["calibrated_on"] = "test" if tcfg.calibrate_on_test else ("validation" if tcfg.val_fraction else "none")
    finish_run(run, metrics, test, maps, masks, post, report)
    return metrics
