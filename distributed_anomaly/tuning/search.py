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

Resources. A trial is a Tune function trainable holding TRIAL_DRIVER_CPUS (it calibrates and scores in its own
process) that starts its fit as separate Ray work: `workers` Ray Data actors (PADIM) or Ray Train workers
(STFPM; a TorchTrainer whose per-epoch metrics reach Tune through TuneReportCallback), 1 CPU each, plus Ray
Data's decode tasks. Those are not inside the trial's reservation, so the number of trials running at once
is capped at what the cluster can hold with their fits (plan_budget): otherwise the trial drivers could take
every CPU while their workers wait for one forever.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

# Tune reads these when it is imported: its per-step "operation took 0.6 s" warnings and its boxed console
# output are noise next to our one line per trial (a busy machine trips the 0.5 s default every few steps).
os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "30")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from distributed_anomaly import rundir, storage
from distributed_anomaly.data.mvtec import Record, load_dataset, records_of_split, split_train_val
from distributed_anomaly.errors import UserError
from distributed_anomaly.fileio import read_json, write_json
from distributed_anomaly.tuning import results as R
from distributed_anomaly.tuning.objective import (OBJECTIVES, EpochObjective, ObjectiveData, resolve_objective,
                                                  split_test)
from distributed_anomaly.tuning.space import SETTINGS, SearchSpace, parse_space, trial_configs

REQUEST, STUDY_DB, EXPERIMENT, RESULTS_CSV, SUMMARY, REPORT, BEST = (
    "request.json", "study.db", "search", "results.csv", "summary.json", "report.html", "best")
SEARCH_METRICS = "search_metrics.json"  # in each trial's run directory: the objective values it reached
TUNE_INFO = "tune.json"  # in best/: which trial, why, on which images
STUDY_NAME = "distributed-anomaly"
TRIAL_DRIVER_CPUS = 1.0
OBJECTIVE_KEY = "objective"  # the Tune / Optuna metric; the named objective is reported under its name too
TRAIN_PG_KEY = "train_placement_group"  # an STFPM trial's Ray Train placement group (EpochReport)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TuneRequest:
    """Everything a search needs, stored in TUNE_DIR/request.json (so --resume needs nothing else)."""

    data: str
    space_file: str
    space_text: str
    samples: int
    fixes: tuple[str, ...] = ()
    objective: str = "auto"
    workers: int = 1
    max_concurrent: int | None = None
    seed: int = 0
    val_fraction: float = 0.2
    search_fraction: float = 0.5
    synthetic_copies: int = 3
    pretrained: bool = True
    weights: tuple[tuple[str, str], ...] = ()  # (backbone, local weights file)
    grace_epochs: int = 2
    reduction_factor: int = 3
    storage: str | None = None  # the shared counterpart of TUNE_DIR (path or URI); None: TUNE_DIR itself

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise UserError(f"--samples must be >= 1, got {self.samples}")
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1 (each trial fits on Ray), got {self.workers}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise UserError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in (0, 1) for a search: the held-out normal images calibrate "
                            f"the thresholds and carry the synthetic defects; got {self.val_fraction}")
        if self.objective not in ("auto", *OBJECTIVES):
            raise UserError(f"unknown objective {self.objective!r}; choose auto, {', '.join(OBJECTIVES)}")
        if self.synthetic_copies < 1:
            raise UserError(f"--synthetic-copies must be >= 1, got {self.synthetic_copies}")
        if self.grace_epochs < 1 or self.reduction_factor < 2:
            raise UserError("--grace-epochs must be >= 1 and --reduction-factor >= 2")
        for backbone, path in self.weights:
            if not Path(path).is_file():
                raise UserError(f"--weights {backbone}={path}: file does not exist")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fixes"], d["weights"] = list(self.fixes), [list(w) for w in self.weights]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TuneRequest":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown keys in {REQUEST}: {', '.join(sorted(unknown))}")
        d = dict(d)
        d["fixes"] = tuple(d.get("fixes", ()))
        d["weights"] = tuple(tuple(w) for w in d.get("weights", ()))
        return cls(**d)

    def space(self) -> SearchSpace:
        return parse_space(self.space_text, self.space_file).fix(self.fixes)

    def storage_root(self, out: str | os.PathLike) -> str:
        """Tune's storage_path: where search/ lives (the shared storage, or TUNE_DIR)."""
        return self.storage or str(Path(out).resolve())

    def experiment(self, out: str | os.PathLike) -> str:
        return storage.join(self.storage_root(out), EXPERIMENT)


@dataclass(frozen=True)
class SearchData:
    """The dataset split the same way in the driver and in every trial (seeded; paths only)."""

    fit: list[Record]
    val: list[Record]  # held-out normal training images: thresholds, early stopping, synthetic defects
    test: list[Record]
    search_part: list[Record]  # of the test split: val_auroc
    heldout: list[Record]  # of the test split: the best trial's final metrics, nothing else

    def objective_data(self, request: TuneRequest) -> ObjectiveData:
        return ObjectiveData(tuple(self.search_part), tuple(self.val), request.synthetic_copies, request.seed)


def prepare_data(request: TuneRequest) -> SearchData:
    records = load_dataset(request.data, require_test=False)
    fit, val = split_train_val(records, request.val_fraction, request.seed)
    test = records_of_split(records, "test")
    search_part, heldout = split_test(test, request.search_fraction, request.seed)
    if request.objective == "val_auroc":
        labels = {r.label for r in search_part}
        if labels != {0, 1}:
            raise UserError(f"val_auroc needs normal and anomalous images in the search part of the test split "
                            f"(got {len(search_part)} images, labels {sorted(labels)}): add test images or use "
                            "--objective synthetic_auroc")
    return SearchData(fit, val, test, search_part, heldout)


# --------------------------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class Budget:
    cluster_cpus: float
    per_trial: float  # the trial's driver plus its fit's workers and decode tasks
    concurrent: int
    note: str = ""


def fit_cpus(model: str, workers: int) -> float:
    """Logical CPUs one trial's fit holds at most besides its driver (decode tasks as the fit code sizes them)."""
    from distributed_anomaly.distributed import padim_fit, stfpm_train

    if model == "padim":
        return workers * 1.0 + padim_fit.decode_task_count(workers) * padim_fit.DECODE_CPUS
    return workers * 1.0 + stfpm_train.decode_task_count(workers) * stfpm_train.DECODE_CPUS


def plan_budget(cluster_cpus: float, workers: int, models: set[str], requested: int | None) -> Budget:
    """How many trials may run at once so that every running trial's fit can be scheduled."""
    per_trial = TRIAL_DRIVER_CPUS + max(fit_cpus(m, workers) for m in models)
    if cluster_cpus < per_trial:
        raise UserError(f"the Ray cluster has {cluster_cpus:g} logical CPUs; one trial needs {per_trial:g} "
                        f"({TRIAL_DRIVER_CPUS:g} for the trial, the rest for its {workers} worker(s) and decoding): "
                        "use fewer --workers or a bigger cluster")
    fits = int(cluster_cpus // per_trial)
    if requested is None:
        return Budget(cluster_cpus, per_trial, fits)
    if requested > fits:
        return Budget(cluster_cpus, per_trial, fits,
                      f"--max-concurrent {requested} lowered to {fits}: {fits} trials x {per_trial:g} CPUs fill the "
                      f"cluster's {cluster_cpus:g}; more would wait for CPUs their own drivers hold")
    return Budget(cluster_cpus, per_trial, requested)


# --------------------------------------------------------------------------------------------- trial side


def run_trial(config: dict, request: dict, out: str) -> None:
    """The Tune function trainable: fit one configuration on Ray, report the objective, keep the run directory."""
    from ray import tune

    req = TuneRequest.from_dict(request)
    objective = req.objective  # resolved (never "auto") before the search started
    sample = {k: v for k, v in config.items() if k in SETTINGS}
    cfg, tcfg = trial_configs(sample, seed=req.seed, val_fraction=req.val_fraction, pretrained=req.pretrained,
                              weights=dict(req.weights))
    data = prepare_data(req)
    obj_data = data.objective_data(req)
    # The trial's folder in the experiment's storage (get_trial_dir() is a local staging copy Tune syncs from).
    trial_dir = storage.join(req.experiment(out), f"trial_{tune.get_context().get_trial_id()}")
    # Built here, before any Ray work: unavailable weights fail the trial in seconds.
    model = rundir.build_model(cfg, pretrained=tcfg.pretrained, weights_file=tcfg.weights_file)
    info: dict = {"data": str(Path(req.data).resolve()), "num_train_images": len(data.fit),
                  "num_val_images": len(data.val), "workers": req.workers, "ray": True,
                  "tune": {"trial": tune.get_context().get_trial_id(), "optuna_trial": config.get("optuna_trial"),
                           "objective": objective}}
    from distributed_anomaly.training import Execution, calibrate, fit_model

    nested = storage.join(trial_dir, "ray_train")  # STFPM checkpoints; a trial restarted after an interruption starts over
    storage.remove_tree(nested)
    stfpm_options: dict = {}
    if cfg.model == "stfpm":
        from ray.tune.integration.ray_train import TuneReportCallback

        stfpm_options = {"epoch_eval": EpochReport(EpochObjective(obj_data, objective, tuple(data.fit),
                                                                  tcfg.batch_size, cfg.seed, tcfg.bn_recompute)),
                         "callbacks": [TuneReportCallback()]}
    # max_failures=0: a trial whose worker dies fails (and the search goes on) rather than restarting its worker
    # group, which would also reserve a new placement group behind TrialProgress's back.
    model, fit_info, history = fit_model(model, cfg, tcfg, data.fit, data.val,
                                         Execution(workers=req.workers, run_name="stfpm", max_failures=0),
                                         nested, False, **stfpm_options)
    storage.remove_tree(nested)  # the kept weights are in the run directory below
    if "ray_train" in fit_info:
        fit_info["ray_train"].pop("run_path", None)
    info.update(fit_info)
    epochs_run = fit_info.get("epochs_run", 1)
    post = calibrate(model, cfg, tcfg, data.val, data.fit, progress=False)
    values = obj_data.evaluate(model, tcfg.batch_size)
    if values.get(objective) is None:
        raise UserError(f"the objective {objective} is undefined for this data (values: {values})")
    report = {**{k: v for k, v in values.items() if v is not None}, OBJECTIVE_KEY: values[objective], "final": 1,
              "epochs_run": epochs_run, "fit_seconds": info["fit_seconds"]}
    with tempfile.TemporaryDirectory(prefix="trial-run-") as tmp:
        rundir.save_model(tmp, cfg, tcfg, model, post, info)
        write_json(Path(tmp) / SEARCH_METRICS, {"objective": objective, **values})
        if history is not None:
            write_json(Path(tmp) / rundir.HISTORY, history)
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))


class EpochReport:
    """The per-epoch objective, plus the placement group of the Train worker that computed it (rank 0).

    When ASHA stops an STFPM trial, Tune kills the trial's process, and with it the Ray Train controller it
    started, before the controller can release its workers' placement group: the group is scoped to the job,
    not to the controller, and Ray Train's own cleaner needs the state API (the dashboard, and a single Ray
    instance per machine), which a test cluster or a shared machine may not have. Left there, it holds
    `workers` CPUs until the search ends, and the next trials' decode tasks can wait for them forever.
    Reporting its id lets TrialProgress remove it.
    """

    def __init__(self, hook: EpochObjective) -> None:
        self.hook = hook

    def __call__(self, model: Any, epoch: int) -> dict:
        import ray

        out = self.hook(model, epoch)
        pg = ray.get_runtime_context().get_placement_group_id()
        if pg:
            out[TRAIN_PG_KEY] = pg
        return out


def release_placement_group(pg_hex: str) -> bool:
    """Remove a placement group by its hex id unless it is already gone; True if this call removed it."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    pg = PlacementGroup(PlacementGroupID.from_hex(pg_hex))
    if placement_group_table(pg).get("state", "REMOVED") == "REMOVED":
        return False
    remove_placement_group(pg)
    return True


# --------------------------------------------------------------------------------------------- driver side


class DefineByRun:
    """The space as OptunaSearch's define-by-run function, plus the Optuna trial number (to join the study and
    Tune's results). A module-level class: the searcher's state is pickled for --resume."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> dict:
        sample = self.space.sample(trial)
        trial.set_user_attr("config", sample)  # fixed settings too: the dashboard shows what each trial ran
        return {**sample, "optuna_trial": trial.number}


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records a trial ASHA stopped early as PRUNED (with its last value), not COMPLETE."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and not error and not result.get("final") and trial_id in self._ot_trials \
                and trial_id not in self._completed_trials:
            ot_trial = self._ot_trials[trial_id]
            try:
                if result.get(self.metric) is not None and result.get("training_iteration") is not None:
                    # The result ASHA stopped on reaches the searcher here, not through on_trial_result.
                    ot_trial.report(result[self.metric], result["training_iteration"])
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            except Exception as exc:  # as OptunaSearch does: bookkeeping never stops the search
                logging.getLogger(__name__).warning(exc)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


class TrialProgress(Callback):
    """One line per trial start, completion, early stop or failure (Tune's own status table is off); and the
    Train placement group of a trial stopped before its end released (see EpochReport)."""

    def __init__(self, quiet: bool, experiment: str) -> None:
        self.quiet = quiet
        self.experiment = experiment

    def release_train_resources(self, trial: Any) -> bool:
        r = trial.last_result or {}
        if r.get("final") or not r.get(TRAIN_PG_KEY):
            return False
        try:  # its student checkpoints: the trial did not get to remove them
            storage.remove_tree(storage.join(self.experiment, trial_dirname(trial), "ray_train"))
        except Exception as exc:
            log(f"warning: could not remove the checkpoints of trial {trial.trial_id}: {exc}")
        try:
            return release_placement_group(r[TRAIN_PG_KEY])
        except Exception as exc:  # never let cleanup stop the search; say what may now be held
            log(f"warning: could not release placement group {r[TRAIN_PG_KEY]} of trial {trial.trial_id}: {exc}")
            return False

    @staticmethod
    def _params(trial: Any) -> str:
        return " ".join(f"{k}={v}" for k, v in trial.config.items() if k in SETTINGS)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self.quiet:
            log(f"trial {trial.trial_id} started: {self._params(trial)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.release_train_resources(trial)
        if self.quiet:
            return
        r = trial.last_result or {}
        if r.get("final"):
            log(f"trial {trial.trial_id} completed: objective {r.get(OBJECTIVE_KEY, float('nan')):.4f} "
                f"({r.get('time_total_s', 0):.0f} s)")
        elif OBJECTIVE_KEY in r:
            log(f"trial {trial.trial_id} stopped after {r.get('training_iteration')} reports "
                f"(objective {r[OBJECTIVE_KEY]:.4f})")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.release_train_resources(trial)
        if self.quiet:
            return
        error = None
        try:
            error = trial.get_pickled_error() or trial.get_error()
        except Exception:  # the error file may not be readable yet; the results table has it
            pass
        log(f"trial {trial.trial_id} failed: {R.short_error(error) or 'see ' + str(trial.path)}")


def _new_tuner(request: TuneRequest, space: SearchSpace, out: Path, budget: Budget, trainable: Any, quiet: bool):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    storage = optuna.storages.RDBStorage(f"sqlite:///{out / STUDY_DB}")
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize", load_if_exists=True)
    for key, value in (("objective", request.objective), ("space", request.space_file), ("data", request.data),
                       ("fixes", list(request.fixes)), ("samples", request.samples)):
        study.set_user_attr(key, value)
    searcher = PrunedAwareOptunaSearch(space=DefineByRun(space), metric=OBJECTIVE_KEY, mode="max",
                                       sampler=optuna.samplers.TPESampler(seed=request.seed), storage=storage,
                                       study_name=STUDY_NAME)
    max_epochs = space.max_epochs()
    if max_epochs:  # STFPM trials report every epoch (+ once at the end); ASHA compares them at the same epoch
        scheduler = ASHAScheduler(metric=OBJECTIVE_KEY, mode="max", time_attr="training_iteration",
                                  max_t=max_epochs + 1, grace_period=request.grace_epochs,
                                  reduction_factor=request.reduction_factor)
    else:  # PADIM trials report once: nothing to prune
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=budget.concurrent),
                                    scheduler=scheduler, num_samples=request.samples, reuse_actors=False,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=request.storage_root(out), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  callbacks=[TrialProgress(quiet, request.experiment(out))]))


def _study_states(out: Path) -> dict[int, str]:
    import optuna

    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / STUDY_DB}")
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


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
        row = {"trial": Path(res.path).name.removeprefix("trial_"), "optuna_trial": n, "status": status,
               "objective": m.get(OBJECTIVE_KEY), **{k: m.get(k) for k in R.METRIC_COLUMNS},
               **{k: cfg.get(k) for k in SETTINGS}, "seconds": round(m["time_total_s"], 1) if "time_total_s" in m
               else None, "error": R.short_error(res.error) if res.error is not None else "",
               "finished_at": m.get("timestamp"), "path": res.path}
        row["epochs_run"] = m.get("epochs_run") or (m["epoch"] + 1 if "epoch" in m else None)
        rows.append(row)
    return R.sort_rows(rows)


def _importances(out: Path) -> tuple[dict[str, float] | None, str]:
    """PED-ANOVA parameter importance over the completed trials (Optuna; no extra dependency)."""
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / STUDY_DB}")
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n < 2:
        return None, f"parameter importance needs at least 2 completed trials ({n} so far)"
    try:
        with warnings.catch_warnings():  # "some regimes have less than 2 trials": said in the report instead
            warnings.simplefilter("ignore")
            imp = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    except Exception as exc:  # too few trials for the evaluator's quantile, a single value per parameter, ...
        return None, f"parameter importance not computable yet ({type(exc).__name__}: {exc})"
    return ({k: float(v) for k, v in imp.items()},
            f"PED-ANOVA importance (Optuna) over {n} completed trials: how much each parameter's distribution "
            "differs between the best trials and the rest")


def _write_best(out: Path, request: TuneRequest, data: SearchData, row: dict, result: Any, progress: bool) -> dict:
    """TUNE_DIR/best: the best trial's run directory, evaluated on the held-out part of the test split."""
    from distributed_anomaly.training import evaluate_model, finish_run

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
        metrics["evaluated_on"] = (f"held-out part of the test split: {len(data.heldout)} of {len(data.test)} test "
                                   f"images (the search scored its objective on the other {len(data.search_part)})")
        finish_run(tmp, metrics, data.heldout, maps, masks, post, report=True)
    write_json(tmp / TUNE_INFO, {
        "trial": row["trial"], "optuna_trial": row["optuna_trial"], "objective": request.objective,
        "search_metrics": search_metrics, "params": {k: row.get(k) for k in SETTINGS if row.get(k) is not None},
        "heldout_images": [r.path for r in data.heldout], "search_images": [r.path for r in data.search_part],
        "note": "metrics.json is on heldout_images only; `evaluate --run` re-scores the whole test split"})
    best = out / BEST
    if best.exists():
        shutil.rmtree(best)
    os.replace(tmp, best)
    return metrics or {}


def tune_search(request: TuneRequest | None, out: str | os.PathLike, *, address: str | None = None,
                resume: bool = False, progress: bool = True) -> dict:
    """Run (or, with resume=True, continue) a search; returns the summary (also in TUNE_DIR/summary.json)."""
    out = Path(out).resolve()
    if resume:
        if not (out / REQUEST).is_file():
            raise UserError(f"{out} holds no search to resume: {REQUEST} is missing (is it the --out of a tune?)")
        try:
            request = TuneRequest.from_dict(read_json(out / REQUEST))
        except (TypeError, ValueError) as exc:
            raise UserError(f"cannot read {out / REQUEST}: {exc}") from exc
        log(f"resuming the search in {out}: {request.samples} trials over {request.space_file}")
    else:
        if (out / REQUEST).exists():
            raise UserError(f"{out} already holds a search: continue it with `tune --out {out} --resume`, "
                            "or choose another --out")
        request.space()  # refuse a bad space, dataset or objective before writing anything
        test = records_of_split(load_dataset(request.data, require_test=False), "test")
        request = replace(request, data=str(Path(request.data).resolve()),
                          objective=resolve_objective(request.objective, test))
        prepare_data(request)
        if request.storage and storage.exists(request.experiment(out)):
            raise UserError(f"{request.experiment(out)} already holds a search (of another TUNE_DIR with the same name?):"
                            " choose another --out name or --storage")
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / REQUEST, request.to_dict())
    return _run(request, out, resume, address, progress)


def _run(request: TuneRequest, out: Path, resume: bool, address: str | None, progress: bool) -> dict:
    import optuna
    import ray
    from ray import tune

    from distributed_anomaly.distributed.ray_setup import dashboard_url, ray_session

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = request.space()
    data = prepare_data(request)
    started = time.time()
    # A local Ray (no --address) declares at least one trial's worth of logical CPUs, so a small machine still
    # runs trials one at a time (the trial's driver mostly waits while its fit runs) instead of refusing.
    per_trial = TRIAL_DRIVER_CPUS + max(fit_cpus(m, request.workers) for m in space.models())
    local_cpus = max(os.cpu_count() or 1, math.ceil(per_trial)) if not address else None
    with ray_session(address, num_cpus=local_cpus, dashboard=True):
        url = dashboard_url()
        if url and progress:
            log(f"Ray dashboard: {url}")
        budget = plan_budget(ray.cluster_resources().get("CPU", 0.0), request.workers, space.models(),
                             request.max_concurrent)
        if budget.note:
            log(f"note: {budget.note}")
        if progress:
            log(f"{request.samples} trials of {request.space_file} (objective {request.objective}), at most "
                f"{budget.concurrent} at once ({budget.per_trial:g} of {budget.cluster_cpus:g} CPUs each); "
                f"study: optuna-dashboard sqlite:///{out / STUDY_DB}; TensorBoard: tensorboard --logdir "
                f"{request.experiment(out)}")
        trainable = tune.with_resources(tune.with_parameters(run_trial, request=request.to_dict(), out=str(out)),
                                        {"CPU": TRIAL_DRIVER_CPUS})
        experiment = request.experiment(out)
        if resume and tune.Tuner.can_restore(experiment):
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            if resume:  # interrupted before Tune saved anything: nothing finished, start the search afresh
                _fail_orphans(out, "the search was interrupted before it saved its state")
                storage.remove_tree(experiment)
            tuner = _new_tuner(request, space, out, budget, trainable, quiet=not progress)
        grid = tuner.fit()
    states = _study_states(out)
    rows = _rows(grid, states)
    interrupted = len(rows) < request.samples or any(r["status"] == "interrupted" for r in rows)
    if not interrupted:
        _fail_orphans(out, "asked by a search that was interrupted; never run")
    R.write_csv(rows, out / RESULTS_CSV)
    summary = {"objective": request.objective, "samples": request.samples, "trials": len(rows),
               **R.counts(rows), "failures": [{"error": e, "trials": k} for e, k in R.failure_reasons(rows)],
               "interrupted": interrupted, "best": None, "heldout_metrics": None,
               "seconds": round(time.time() - started, 1)}
    completed = [r for r in rows if r["status"] == "completed"]
    if not interrupted and completed:
        best = completed[0]
        result = next(res for res in grid if Path(res.path).name.removeprefix("trial_") == best["trial"])
        heldout = _write_best(out, request, data, best, result, progress)
        summary["best"] = {k: best.get(k) for k in ("trial", "optuna_trial", "objective", *SETTINGS) if best.get(k)
                           is not None}
        summary["heldout_metrics"] = {k: heldout.get(k) for k in ("image_auroc", "pixel_auroc", "aupro",
                                                                  "image_f1", "num_test_images")} if heldout else None
    imp, imp_note = _importances(out)
    write_json(out / SUMMARY, summary)
    from distributed_anomaly.tuning.report import write_tune_report

    write_tune_report(out, rows, request=request, space=space, summary=summary, importances=imp,
                      importance_note=imp_note)
    if request.storage:  # search/ is there already (Tune wrote it); now the driver's files beside it
        storage.upload(out, request.storage)
        if progress:
            log(f"search results uploaded to {request.storage}")
    return {**summary, "rows": rows}


def _fail_orphans(out: Path, why: str) -> None:
    """Optuna trials left RUNNING by an interruption that no Tune trial will finish: recorded as FAIL."""
    import optuna

    if not (out / STUDY_DB).exists():
        return
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / STUDY_DB}")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log(f"Optuna trial {t.number}: marked failed ({why})")
        study.tell(t.number, state=TrialState.FAIL)
