"""The Ray Tune side of a search: Optuna's define-by-run sampling, ASHA for STFPM, one line per trial."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

# Tune reads these when it is imported: its per-step "operation took 0.6 s" warnings and its boxed console
# output are noise next to our one line per trial (a busy machine trips the 0.5 s default every few steps).
os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "30")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from distributed_anomaly import storage
from distributed_anomaly.tuning import results as R
from distributed_anomaly.tuning.budget import Budget
from distributed_anomaly.tuning.request import EXPERIMENT, TuneRequest
from distributed_anomaly.tuning.space import SETTINGS, SearchSpace
from distributed_anomaly.tuning.study import open_study
from distributed_anomaly.tuning.trial import OBJECTIVE_KEY, TRAIN_PG_KEY, release_placement_group

logger = logging.getLogger(__name__)


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
        if (
            result
            and not error
            and not result.get("final")
            and trial_id in self._ot_trials
            and trial_id not in self._completed_trials
        ):
            ot_trial = self._ot_trials[trial_id]
            try:
                if result.get(self.metric) is not None and result.get("training_iteration") is not None:
                    # The result ASHA stopped on reaches the searcher here, not through on_trial_result.
                    ot_trial.report(result[self.metric], result["training_iteration"])
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            except Exception as exc:  # as OptunaSearch does: bookkeeping never stops the search
                logger.warning(exc)
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
            logger.warning(f"could not remove the checkpoints of trial {trial.trial_id}: {exc}")
        try:
            return release_placement_group(r[TRAIN_PG_KEY])
        except Exception as exc:  # never let cleanup stop the search; say what may now be held
            logger.warning(f"could not release placement group {r[TRAIN_PG_KEY]} of trial {trial.trial_id}: {exc}")
            return False

    @staticmethod
    def _params(trial: Any) -> str:
        return " ".join(f"{k}={v}" for k, v in trial.config.items() if k in SETTINGS)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self.quiet:
            logger.info(f"trial {trial.trial_id} started: {self._params(trial)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.release_train_resources(trial)
        if self.quiet:
            return
        r = trial.last_result or {}
        if r.get("final"):
            logger.info(
                f"trial {trial.trial_id} completed: objective {r.get(OBJECTIVE_KEY, float('nan')):.4f} "
                f"({r.get('time_total_s', 0):.0f} s)"
            )
        elif OBJECTIVE_KEY in r:
            logger.info(
                f"trial {trial.trial_id} stopped after {r.get('training_iteration')} reports "
                f"(objective {r[OBJECTIVE_KEY]:.4f})"
            )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.release_train_resources(trial)
        if self.quiet:
            return
        error = None
        try:
            error = trial.get_pickled_error() or trial.get_error()
        except Exception:  # the error file may not be readable yet; the results table has it
            pass
        logger.info(f"trial {trial.trial_id} failed: {R.short_error(error) or 'see ' + str(trial.path)}")


def new_tuner(request: TuneRequest, space: SearchSpace, out: Path, budget: Budget, trainable: Any, quiet: bool):
    study = open_study(out, create=True)
    for key, value in (
        ("objective", request.objective),
        ("space", request.space_file),
        ("data", request.data),
        ("fixes", list(request.fixes)),
        ("samples", request.samples),
    ):
        study.set_user_attr(key, value)
    searcher = PrunedAwareOptunaSearch(
        space=DefineByRun(space),
        metric=OBJECTIVE_KEY,
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=request.seed),
        storage=study._storage,
        study_name=study.study_name,
    )
    max_epochs = space.max_epochs()
    if max_epochs:  # STFPM trials report every epoch (+ once at the end); ASHA compares them at the same epoch
        scheduler = ASHAScheduler(
            metric=OBJECTIVE_KEY,
            mode="max",
            time_attr="training_iteration",
            max_t=max_epochs + 1,
            grace_period=request.grace_epochs,
            reduction_factor=request.reduction_factor,
        )
    else:  # PADIM trials report once: nothing to prune
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=budget.concurrent),
            scheduler=scheduler,
            num_samples=request.samples,
            reuse_actors=False,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=request.storage_root(out),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[TrialProgress(quiet, request.experiment(out))],
        ),
    )
