"""`tune`: hyperparameter search on Ray Tune, sampled by Optuna's TPE, each trial a distributed fit.

The glue only: what is sampled is tuning.space, what is maximised tuning.objective, what is fitted the same
Ray code `train --workers N` runs (distributed.padim_fit / distributed.stfpm_train).

    TUNE_DIR/request.json    the search itself, written first: what --resume continues (the space's YAML inside)
    TUNE_DIR/study.db        the Optuna study (SQLite): `optuna-dashboard sqlite:///TUNE_DIR/study.db`
    TUNE_DIR/search/         the Ray Tune experiment: one folder per trial with its TensorBoard events,
                             progress.csv/result.json, error.txt for a failed trial, and its run directory
                             as the trial's checkpoint; Tune's experiment state (Tuner.restore)
    TUNE_DIR/results.csv     one row per trial, best first (also printed)
    TUNE_DIR/summary.json    counts, failure reasons, the best trial, its held-out metrics
    TUNE_DIR/report.html     the search report (tuning.report), linking best/report.html
    TUNE_DIR/best/           a complete run directory (as `train` writes) of the best trial, metrics.json on the
                             held-out part of the test split, report.html, tune.json (how it was chosen)

With `--storage S` (a shared path or URI, see storage.py) the search lives at S/<TUNE_DIR name>: Tune writes
search/ there directly from whichever node runs a trial (nothing of it under TUNE_DIR), STFPM trials keep their
Ray Train checkpoints there, and the driver uploads its own files (the list above) there when the search ends.
TUNE_DIR keeps request.json and study.db (SQLite needs a local disk) and a copy of the rest.

The parts: request (what a search is), budget (how many trials at once), trial (one trial), tuner (Tune +
Optuna + ASHA), study (the Optuna study), results and report (what the user reads); this module drives them.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune

from distributed_anomaly import rundir, storage
from distributed_anomaly.calibration import evaluate_model
from distributed_anomaly.data.dataset import load_dataset, resolve_layout
from distributed_anomaly.data.mvtec import records_of_split
from distributed_anomaly.distributed.ray_setup import dashboard_url, ray_session
from distributed_anomaly.errors import UserError
from distributed_anomaly.fileio import read_json, write_json
from distributed_anomaly.training import finish_run
from distributed_anomaly.tuning import results as R
from distributed_anomaly.tuning.budget import TRIAL_DRIVER_CPUS, fit_cpus, plan_budget
from distributed_anomaly.tuning.objective import resolve_objective
from distributed_anomaly.tuning.report import write_tune_report
from distributed_anomaly.tuning.request import (
    BEST,
    REQUEST,
    RESULTS_CSV,
    SEARCH_METRICS,
    STUDY_DB,
    SUMMARY,
    TUNE_INFO,
    TuneRequest,
)
from distributed_anomaly.tuning.space import SETTINGS
from distributed_anomaly.tuning.split import SearchData, prepare_data
from distributed_anomaly.tuning.study import fail_orphans, importances, study_states
from distributed_anomaly.tuning.trial import OBJECTIVE_KEY, run_trial
from distributed_anomaly.tuning.tuner import new_tuner

logger = logging.getLogger(__name__)


def _rows(grid: Any, states: Mapping[int, str]) -> list[dict]:
    rows = []
    for res in grid:
        m = dict(res.metrics or {})
        cfg = dict(res.config or {})
        n = cfg.get("optuna_trial")
        if res.error is not None:
            status = "failed"
        elif m.get("final"):
            status = "completed"
        elif states.get(n) in (None, "RUNNING", "WAITING"):
            status = "interrupted"
        else:
            status = "pruned"
        row = {
            "trial": Path(res.path).name.removeprefix("trial_"),
            "optuna_trial": n,
            "status": status,
            "objective": m.get(OBJECTIVE_KEY),
            **{k: m.get(k) for k in (*R.METRIC_COLUMNS, R.COST_COLUMN)},
            **{k: cfg.get(k) for k in SETTINGS},
            "seconds": round(m["time_total_s"], 1) if "time_total_s" in m else None,
            "error": R.short_error(res.error) if res.error is not None else "",
            "finished_at": m.get("timestamp"),
            "path": res.path,
        }
        row["epochs_run"] = m.get("epochs_run") or (m["epoch"] + 1 if "epoch" in m else None)
        rows.append(row)
    return R.sort_rows(rows)


def _write_best(out: Path, request: TuneRequest, data: SearchData, row: dict, result: Any, progress: bool) -> dict:
    """TUNE_DIR/best: the best trial's run directory, evaluated on the held-out part of the test split."""
    tmp = out / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result.checkpoint.to_directory(str(tmp))
    cfg, model, post = rundir.load_model(tmp)
    _, tcfg, _ = rundir.load_config(tmp)
    search_metrics = read_json(tmp / SEARCH_METRICS)
    metrics: dict | None = None
    if data.heldout:
        metrics, maps, masks = evaluate_model(model, cfg, post, data.heldout, tcfg.batch_size, progress)
        metrics["calibrated_on"] = "validation"
        metrics["evaluated_on"] = (
            f"held-out part of the test split: {len(data.heldout)} of {len(data.test)} test "
            f"images (the search scored its objective on the other {len(data.search_part)})"
        )
        finish_run(tmp, metrics, data.heldout, maps, masks, post, report=True)
    write_json(
        tmp / TUNE_INFO,
        {
            "trial": row["trial"],
            "optuna_trial": row["optuna_trial"],
            "objective": request.objective,
            "search_metrics": search_metrics,
            "params": {k: row.get(k) for k in SETTINGS if row.get(k) is not None},
            "heldout_images": [r.path for r in data.heldout],
            "search_images": [r.path for r in data.search_part],
            "note": "metrics.json is on heldout_images only; `evaluate --run` re-scores the whole test split",
        },
    )
    best = out / BEST
    if best.exists():
        shutil.rmtree(best)
    os.replace(tmp, best)
    return metrics or {}


def tune_search(
    request: TuneRequest | None,
    out: str | os.PathLike,
    *,
    address: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Run (or, with resume=True, continue) a search; returns the summary (also in TUNE_DIR/summary.json)."""
    out = Path(out).resolve()
    if resume:
        if not (out / REQUEST).is_file():
            raise UserError(f"{out} holds no search to resume: {REQUEST} is missing (is it the --out of a tune?)")
        try:
            request = TuneRequest.from_dict(read_json(out / REQUEST))
        except (TypeError, ValueError) as exc:
            raise UserError(f"cannot read {out / REQUEST}: {exc}") from exc
        logger.info(f"resuming the search in {out}: {request.samples} trials over {request.space_file}")
    else:
        if (out / REQUEST).exists():
            raise UserError(
                f"{out} already holds a search: continue it with `tune --out {out} --resume`, or choose another --out"
            )
        request.space()  # refuse a bad space, dataset or objective before writing anything
        layout = resolve_layout(request.data, request.data_layout)
        test = records_of_split(load_dataset(request.data, layout, require_test=False), "test")
        request = replace(
            request,
            data=str(Path(request.data).resolve()),
            data_layout=layout,
            objective=resolve_objective(request.objective, test),
        )
        prepare_data(request)
        if request.storage and storage.exists(request.experiment(out)):
            raise UserError(
                f"{request.experiment(out)} already holds a search (of another TUNE_DIR with the same name?):"
                " choose another --out name or --storage"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / REQUEST, request.to_dict())
    return _run(request, out, resume, address, progress)


def _run(request: TuneRequest, out: Path, resume: bool, address: str | None, progress: bool) -> dict:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = request.space()
    data = prepare_data(request)
    started = time.time()
    # A local Ray (no --address) declares at least one trial's worth of logical CPUs, so a small machine still
    # runs trials one at a time (the trial's driver mostly waits while its fit runs) instead of refusing.
    per_trial = TRIAL_DRIVER_CPUS + max(fit_cpus(m, request.workers) for m in space.models())
    local_cpus = max(os.cpu_count() or 1, math.ceil(per_trial)) if not address else None
    with ray_session(address, num_cpus=local_cpus, dashboard=True):
        grid = _fit_trials(request, space, out, resume, progress)
    rows = _rows(grid, study_states(out))
    interrupted = len(rows) < request.samples or any(r["status"] == "interrupted" for r in rows)
    if not interrupted:
        fail_orphans(out, "asked by a search that was interrupted; never run")
    R.write_csv(rows, out / RESULTS_CSV)
    summary = {
        "objective": request.objective,
        "samples": request.samples,
        "trials": len(rows),
        **R.counts(rows),
        "failures": [{"error": e, "trials": k} for e, k in R.failure_reasons(rows)],
        "interrupted": interrupted,
        "best": None,
        "heldout_metrics": None,
        "seconds": round(time.time() - started, 1),
    }
    completed = [r for r in rows if r["status"] == "completed"]
    if not interrupted and completed:
        best = completed[0]
        result = next(res for res in grid if Path(res.path).name.removeprefix("trial_") == best["trial"])
        heldout = _write_best(out, request, data, best, result, progress)
        keys = ("trial", "optuna_trial", "objective", R.COST_COLUMN, *SETTINGS)
        summary["best"] = {k: best.get(k) for k in keys if best.get(k) is not None}
        summary["heldout_metrics"] = (
            {k: heldout.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1", "num_test_images")}
            if heldout
            else None
        )
    imp, imp_note = importances(out)
    write_json(out / SUMMARY, summary)
    write_tune_report(
        out, rows, request=request, space=space, summary=summary, importances=imp, importance_note=imp_note
    )
    if request.storage:  # search/ is there already (Tune wrote it); now the driver's files beside it
        storage.upload(out, request.storage, marker=SUMMARY)
        if progress:
            logger.info(f"search results uploaded to {request.storage}")
    return {**summary, "rows": rows}


def _fit_trials(request: TuneRequest, space: Any, out: Path, resume: bool, progress: bool) -> Any:
    """Run (or restore and finish) the Tune experiment on the Ray session that is up; its ResultGrid."""
    url = dashboard_url()
    if url and progress:
        logger.info(f"Ray dashboard: {url}")
    budget = plan_budget(
        ray.cluster_resources().get("CPU", 0.0), request.workers, space.models(), request.max_concurrent
    )
    if budget.note:
        logger.warning(f"note: {budget.note}")
    if progress:
        logger.info(
            f"{request.samples} trials of {request.space_file} (objective {request.objective}), at most "
            f"{budget.concurrent} at once ({budget.per_trial:g} of {budget.cluster_cpus:g} CPUs each); "
            f"study: optuna-dashboard sqlite:///{out / STUDY_DB}; TensorBoard: tensorboard --logdir "
            f"{request.experiment(out)}"
        )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, request=request.to_dict(), out=str(out)), {"CPU": TRIAL_DRIVER_CPUS}
    )
    experiment = request.experiment(out)
    if resume and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
        )
    else:
        if resume:  # interrupted before Tune saved anything: nothing finished, start the search afresh
            fail_orphans(out, "the search was interrupted before it saved its state")
            storage.remove_tree(experiment)
        tuner = new_tuner(request, space, out, budget, trainable, quiet=not progress)
    return tuner.fit()
