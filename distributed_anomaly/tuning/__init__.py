"""Hyperparameter search (`distributed-anomaly tune`): Ray Tune trials sampled by Optuna, each a distributed fit.

    space      YAML search spaces -> Optuna define-by-run functions (declarative constraints), --fix
    objective  val_auroc / synthetic_auroc, the test-split division, the per-epoch STFPM hook
    results    the results table (CSV, console), failure summary
    report     TUNE_DIR/report.html
    search     the Ray Tune glue: trainable, OptunaSearch + ASHA, resources, resume, best/

Everything but `search` is Ray-free.
"""
