"""The search's Optuna study (TUNE_DIR/study.db, SQLite): the states of its trials, parameter importance,
and trials an interruption left running. What `optuna-dashboard sqlite:///TUNE_DIR/study.db` shows."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from distributed_anomaly.tuning.request import STUDY_DB, STUDY_NAME

logger = logging.getLogger(__name__)


def open_study(out: Path, create: bool = False) -> optuna.Study:
    """The study in TUNE_DIR/study.db (created, maximising, with `create`)."""
    url = f"sqlite:///{out / STUDY_DB}"
    if create:
        return optuna.create_study(
            storage=optuna.storages.RDBStorage(url), study_name=STUDY_NAME, direction="maximize", load_if_exists=True
        )
    return optuna.load_study(study_name=STUDY_NAME, storage=url)


def study_states(out: Path) -> dict[int, str]:
    study = open_study(out)
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def importances(out: Path) -> tuple[dict[str, float] | None, str]:
    """PED-ANOVA parameter importance over the completed trials (Optuna; no extra dependency)."""
    study = open_study(out)
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n < 2:
        return None, f"parameter importance needs at least 2 completed trials ({n} so far)"
    # Here, not at the top: optuna.importance imports scikit-learn (~1 s), which nothing else of a search needs.
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    try:
        with warnings.catch_warnings():  # "some regimes have less than 2 trials": said in the report instead
            warnings.simplefilter("ignore")
            imp = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    except Exception as exc:  # too few trials for the evaluator's quantile, a single value per parameter, ...
        return None, f"parameter importance not computable yet ({type(exc).__name__}: {exc})"
    return (
        {k: float(v) for k, v in imp.items()},
        f"PED-ANOVA importance (Optuna) over {n} completed trials: how much each parameter's distribution "
        "differs between the best trials and the rest",
    )


def fail_orphans(out: Path, why: str) -> None:
    """Optuna trials left RUNNING by an interruption that no Tune trial will finish: recorded as FAIL."""
    if not (out / STUDY_DB).exists():
        return
    study = open_study(out)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        logger.warning(f"Optuna trial {t.number}: marked failed ({why})")
        study.tell(t.number, state=TrialState.FAIL)
