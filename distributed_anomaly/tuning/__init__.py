"""Hyperparameter search (`distributed-anomaly tune`): Ray Tune trials sampled by Optuna, each a distributed fit.

    space      YAML search spaces -> Optuna define-by-run functions (declarative constraints), --fix
    objective  val_auroc / synthetic_auroc, the test-split division, the per-epoch STFPM hook
    results    the results table (CSV, console), failure summary
    report     TUNE_DIR/report.html
    request    what a search is: TuneRequest, TUNE_DIR's file names, the dataset split every trial sees
    budget     how many trials fit on the cluster at once
    trial      one trial: the Tune function trainable
    tuner      OptunaSearch + ASHA, per-trial progress lines
    study      the Optuna study (SQLite): states, importance, orphaned trials
    search     the driver: run or resume a search, the results table, best/

space, objective, results, report and request are Ray-free.
"""
