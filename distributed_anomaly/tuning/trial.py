"""One trial of a search (the Tune function trainable): fit one configuration on Ray, report its objective
(per epoch for STFPM, so ASHA can stop it early), keep its run directory as the trial's checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune

from distributed_anomaly import rundir, storage
from distributed_anomaly.calibration import calibrate
from distributed_anomaly.config import Execution
from distributed_anomaly.errors import UserError
from distributed_anomaly.fileio import write_json
from distributed_anomaly.models.cost import inference_gflops
from distributed_anomaly.training import fit_model
from distributed_anomaly.tuning.objective import EpochObjective
from distributed_anomaly.tuning.request import SEARCH_METRICS, TuneRequest
from distributed_anomaly.tuning.results import COST_COLUMN
from distributed_anomaly.tuning.space import SETTINGS, trial_configs
from distributed_anomaly.tuning.split import prepare_data

OBJECTIVE_KEY = "objective"  # the Tune / Optuna metric; the named objective is reported under its name too
TRAIN_PG_KEY = "train_placement_group"  # an STFPM trial's Ray Train placement group (EpochReport)


def run_trial(config: dict, request: dict, out: str) -> None:
    """The Tune function trainable: fit one configuration on Ray, report the objective, keep the run directory."""
    req = TuneRequest.from_dict(request)
    objective = req.objective  # resolved (never "auto") before the search started
    sample = {k: v for k, v in config.items() if k in SETTINGS}
    cfg, tcfg = trial_configs(
        sample, seed=req.seed, val_fraction=req.val_fraction, pretrained=req.pretrained, weights=dict(req.weights)
    )
    data = prepare_data(req)
    obj_data = data.objective_data(req)
    # Built here, before any Ray work: unavailable weights fail the trial in seconds.
    model = rundir.build_model(cfg, pretrained=tcfg.pretrained, weights_file=tcfg.weights_file)
    trial_id = tune.get_context().get_trial_id()
    info: dict = {
        "data": str(Path(req.data).resolve()),
        "data_layout": req.data_layout.to_dict(),
        "num_train_images": len(data.fit),
        "num_val_images": len(data.val),
        "workers": req.workers,
        "ray": True,
        "tune": {"trial": trial_id, "optuna_trial": config.get("optuna_trial"), "objective": objective},
    }
    # STFPM checkpoints, in the trial's folder of the experiment's storage (get_trial_dir() is only a local
    # staging copy Tune syncs from); a trial restarted after an interruption starts over.
    nested = storage.join(req.experiment(out), f"trial_{trial_id}", "ray_train")
    storage.remove_tree(nested)
    options = _stfpm_options(obj_data, objective, data.fit, cfg, tcfg) if cfg.model == "stfpm" else {}
    # max_failures=0: a trial whose worker dies fails (and the search goes on) rather than restarting its worker
    # group, which would also reserve a new placement group behind TrialProgress's back.
    run = Execution(workers=req.workers, run_name="stfpm", max_failures=0)
    model, fit_info, history = fit_model(model, cfg, tcfg, data.fit, data.val, run, nested, False, **options)
    storage.remove_tree(nested)  # the kept weights are in the run directory below
    if "ray_train" in fit_info:
        fit_info["ray_train"].pop("run_path", None)
    info.update(fit_info)
    post = calibrate(model, cfg, tcfg, data.val, data.fit, progress=False)
    values = obj_data.evaluate(model, tcfg.batch_size)
    if values.get(objective) is None:
        raise UserError(f"the objective {objective} is undefined for this data (values: {values})")
    report = {
        **{k: v for k, v in values.items() if v is not None},
        OBJECTIVE_KEY: values[objective],
        COST_COLUMN: round(inference_gflops(model, cfg.image_size), 6),  # breaks ties between trials
        "final": 1,
        "epochs_run": fit_info.get("epochs_run", 1),
        "fit_seconds": info["fit_seconds"],
    }
    with tempfile.TemporaryDirectory(prefix="trial-run-") as tmp:
        rundir.save_model(tmp, cfg, tcfg, model, post, info)
        write_json(Path(tmp) / SEARCH_METRICS, {"objective": objective, **values})
        if history is not None:
            write_json(Path(tmp) / rundir.HISTORY, history)
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))


def _stfpm_options(obj_data: Any, objective: str, fit: Any, cfg: Any, tcfg: Any) -> dict:
    """What an STFPM trial adds to its Ray Train run: the objective every epoch (ASHA compares trials on it)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    hook = EpochObjective(obj_data, objective, tuple(fit), tcfg.batch_size, cfg.seed, tcfg.bn_recompute)
    return {"epoch_eval": EpochReport(hook), "callbacks": [TuneReportCallback()]}


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
