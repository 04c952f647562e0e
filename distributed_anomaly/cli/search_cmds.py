"""Search commands: `tune` (a hyperparameter search) and `pipeline` (search, export and serve as one job).

The defaults are tuning.request.TuneRequest's; the search modules are imported when a command runs.
"""

from __future__ import annotations

import argparse

from distributed_anomaly.cli.common import (
    VERBOSITY,
    add_api_key,
    add_data_options,
    changed_options,
    data_layout,
    default,
    weights_pairs,
)
from distributed_anomaly.errors import UserError
from distributed_anomaly.irformat import PRECISIONS
from distributed_anomaly.serve.settings import AppConfig, resolve_api_key
from distributed_anomaly.tuning.request import OBJECTIVES, TuneRequest

_TUNE_DEFAULTS: dict = {}


def _search_arguments(p: argparse.ArgumentParser, resumable: bool) -> None:
    """The options of a search, shared by `tune` and `pipeline`."""
    unless = "unless --resume or --dry-run" if resumable else "unless rerunning the same OUT"
    out_help = (
        "TUNE_DIR to write; required unless --dry-run"
        if resumable
        else "folder of the pipeline's outputs: OUT/tune (the search), OUT/model (OpenVINO), OUT/pipeline.json"
    )
    p.add_argument("--data", help="dataset folder (layout: --format); required " + unless)
    add_data_options(p)
    p.add_argument("--space", help="search space YAML, e.g. search_spaces/padim.yaml; required " + unless)
    p.add_argument("--samples", type=int, default=10, help="number of trials (default 10)")
    p.add_argument("--out", help=out_help)
    p.add_argument(
        "--fix",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="pin one dimension of the space (repeatable), e.g. --fix backbone=mobilenet_v2",
    )
    p.add_argument(
        "--objective",
        choices=("auto", *OBJECTIVES),
        default=default(TuneRequest, "objective"),
        help="val_auroc: image AUROC on a seeded, per-defect-type share of the test split (the rest is "
        "held out for the best trial's final metrics); synthetic_auroc: held-out normal images vs. copies "
        "with synthetic defects, no labelled anomalies needed; auto (default): val_auroc when the test "
        "split has anomalies",
    )
    _trial_arguments(p)
    _scheduling_arguments(p, resumable)


def _trial_arguments(p: argparse.ArgumentParser) -> None:
    """How each trial runs: its workers, seed, data splits and weights."""
    p.add_argument(
        "--workers",
        type=int,
        default=default(TuneRequest, "workers"),
        help="Ray workers per trial: PADIM feature actors or STFPM data-parallel trainers (default %(default)s)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        help="trials running at once (default and ceiling: as many as the cluster's CPUs hold with their workers)",
    )
    p.add_argument(
        "--address",
        help="join a running Ray cluster: 'auto' or HOST:PORT (default: a local Ray with its "
        "dashboard on 127.0.0.1:8265)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=default(TuneRequest, "seed"),
        help="TPE sampler, data splits, synthetic defects, models (default %(default)s)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=default(TuneRequest, "val_fraction"),
        help="share of train/good held out for thresholds, early stopping and synthetic defects (default %(default)s)",
    )
    p.add_argument(
        "--search-fraction",
        type=float,
        default=default(TuneRequest, "search_fraction"),
        help="share of each defect type's test images the search may see (val_auroc; default %(default)s)",
    )
    p.add_argument(
        "--synthetic-copies",
        type=int,
        default=default(TuneRequest, "synthetic_copies"),
        help="defective copies per held-out normal image for synthetic_auroc (default %(default)s)",
    )
    p.add_argument("--no-pretrained", action="store_true", help="random (seeded) backbone weights")
    p.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="BACKBONE=FILE",
        help="local torchvision state-dict file for a backbone (repeatable)",
    )


def _scheduling_arguments(p: argparse.ArgumentParser, resumable: bool) -> None:
    """ASHA's early stopping, and where a multi-node search keeps its results."""
    p.add_argument(
        "--grace-epochs",
        type=int,
        default=default(TuneRequest, "grace_epochs"),
        help="ASHA: epochs every STFPM trial runs before it can be stopped (default %(default)s)",
    )
    p.add_argument(
        "--reduction-factor",
        type=int,
        default=default(TuneRequest, "reduction_factor"),
        help="ASHA reduction factor (default %(default)s)",
    )
    where = "TUNE_DIR" if resumable else "OUT"
    p.add_argument(
        "--storage",
        metavar="PATH_OR_URI",
        help=f"shared storage for a multi-node cluster: a path every node mounts (NFS) or a URI (s3://bucket/"
        f"prefix, gs://, hdfs://; s3 options in the query string, e.g. ?endpoint_override=HOST:PORT&"
        f"scheme=http). Trials write their results and checkpoints to STORAGE/<{where} name>/"
        + ("" if resumable else "tune/")
        + "search directly, from whichever node runs them; the "
        f"driver copies the rest of {where} there when it ends. Default: {where} only (single node)",
    )


def add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        parents=[VERBOSITY],
        help="hyperparameter search: Ray Tune trials sampled by Optuna (TPE), each a distributed fit",
        description="Search a YAML space (search_spaces/*.yaml, format in search_spaces/README.md) with Ray Tune and "
        "Optuna's seeded TPE. Each trial fits on Ray (PADIM: Ray Data actors; STFPM: a Ray Train TorchTrainer that "
        "reports every epoch, pruned by ASHA). A trial that fails (weights unavailable, out of memory, ...) is "
        "recorded with its error and the search goes on. Writes TUNE_DIR/results.csv (also printed), report.html, "
        "study.db (optuna-dashboard sqlite:///TUNE_DIR/study.db), TensorBoard logs under search/, and best/: a "
        "complete run directory of the best trial with metrics on the held-out part of the test split.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  distributed-anomaly tune --data demo_data/washer --space search_spaces/padim.yaml "
        "--samples 20 --out tune/washer --fix backbone=mobilenet_v2\n"
        "  distributed-anomaly tune --out tune/washer --resume\n"
        "  distributed-anomaly tune --space search_spaces/combined.yaml --samples 5 --dry-run",
    )
    _search_arguments(p, resumable=True)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted search in --out (Tuner.restore, searcher state included) with the "
        "arguments it was started with",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print --samples configurations as the seeded sampler proposes them; train nothing",
    )
    p.set_defaults(func=cmd_tune)
    _TUNE_DEFAULTS.update(vars(p.parse_args([])))


def _tune_request(a: argparse.Namespace, storage: str | None = None):
    """The search request of `tune` / `pipeline` options; a bad space or --fix fails here, before anything starts.
    storage: the shared counterpart of the search's folder (tune: STORAGE/<TUNE_DIR name>)."""
    from distributed_anomaly.tuning.space_file import load_space

    space = load_space(a.space).fix(a.fix)
    return TuneRequest(
        data=a.data,
        space_file=a.space,
        space_text=space.text,
        samples=a.samples,
        fixes=tuple(a.fix),
        objective=a.objective,
        workers=a.workers,
        max_concurrent=a.max_concurrent,
        seed=a.seed,
        val_fraction=a.val_fraction,
        search_fraction=a.search_fraction,
        synthetic_copies=a.synthetic_copies,
        pretrained=not a.no_pretrained,
        weights=weights_pairs(a.weights),
        grace_epochs=a.grace_epochs,
        reduction_factor=a.reduction_factor,
        storage=storage,
        data_layout=data_layout(a),
    )


def add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        parents=[VERBOSITY],
        help="search -> best model -> OpenVINO export -> (optionally) Ray Serve, as one job",
        description="The job for `ray job submit`: run the hyperparameter search of `tune` (same options), take "
        "its best trial (OUT/tune/best, a complete run directory with held-out metrics), export it to OpenVINO "
        "(OUT/model), and with --serve deploy it on the cluster's Ray Serve, where it stays up after the job ends. "
        "A rerun with the same OUT continues an interrupted search and skips finished stages, saying so. Ends by "
        "printing where the model, the metrics, the dashboards and the HTTP endpoint are (also in "
        "OUT/pipeline.json).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ray start --head && distributed-anomaly pipeline --data demo_data/washer --space "
        "search_spaces/padim.yaml --samples 4 --fix backbone=mobilenet_v2 --out runs/washer --address auto --serve\n"
        "  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- distributed-anomaly pipeline "
        "--data /shared/data/washer --space search_spaces/padim.yaml --samples 20 --out /shared/runs/washer "
        "--address auto --serve --host 0.0.0.0  (see cluster/README.md)",
    )
    _search_arguments(p, resumable=False)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=PRECISIONS[0],
        help="OpenVINO precision of the exported model (default fp32: the same scores as torch)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="deploy the model on the cluster's Ray Serve (needs --address: a Ray that outlives the job)",
    )
    p.add_argument("--host", default="127.0.0.1", help="--serve: HTTP address if Serve is not running yet")
    p.add_argument("--port", type=int, default=8000, help="--serve: HTTP port if Serve is not running yet")
    p.add_argument(
        "--replicas",
        type=int,
        default=default(AppConfig, "replicas"),
        help="--serve: model replicas (default %(default)s)",
    )
    p.add_argument(
        "--cpus-per-replica",
        type=float,
        default=default(AppConfig, "cpus_per_replica"),
        help="--serve: CPUs (= OpenVINO threads) per replica (default %(default)s)",
    )
    p.add_argument(
        "--proxy-location",
        choices=("EveryNode", "HeadOnly"),
        help="--serve: where Serve runs HTTP proxies if it is not running yet (default EveryNode; "
        "HeadOnly when several nodes share one machine and port)",
    )
    add_api_key(p, "--serve: require this key on /predict and /metadata")
    p.set_defaults(func=cmd_pipeline)


def cmd_pipeline(a: argparse.Namespace) -> int:
    from distributed_anomaly.pipeline import ServeOptions, format_record, run_pipeline

    if not a.data or not a.space or not a.out:
        raise UserError("pipeline needs --data, --space and --out")
    serve = (
        ServeOptions(
            a.host,
            a.port,
            a.replicas,
            a.cpus_per_replica,
            resolve_api_key(a.api_key, a.api_key_file),
            a.proxy_location,
        )
        if a.serve
        else None
    )
    record = run_pipeline(
        _tune_request(a),
        a.out,
        address=a.address,
        storage=a.storage,
        precision=a.precision,
        serve=serve,
        progress=not a.quiet,
    )
    print(format_record(record))
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    if a.dry_run:
        from distributed_anomaly.tuning.space import preview
        from distributed_anomaly.tuning.space_file import load_space

        if not a.space:
            raise UserError("--dry-run needs --space")
        space = load_space(a.space).fix(a.fix)
        for d in space.dimensions:
            print(f"{d.name}: {d.describe()}")
        for i, cfg in enumerate(preview(space, a.samples, a.seed)):
            print(f"{i}: " + " ".join(f"{k}={v}" for k, v in cfg.items()))
        return 0

    from distributed_anomaly.tuning import results as R
    from distributed_anomaly.tuning.search import tune_search

    if not a.out:
        raise UserError("tune needs --out TUNE_DIR")
    if a.resume:
        given = changed_options(a, _TUNE_DEFAULTS, ("resume", "out", "address"))
        if given:
            raise UserError(
                f"--resume continues a search with the arguments it was started with; drop {', '.join(given)}"
            )
        summary = tune_search(None, a.out, address=a.address, resume=True, progress=not a.quiet)
    else:
        if not a.data or not a.space:
            raise UserError("tune needs --data and --space (or --resume with --out)")
        from distributed_anomaly import storage

        shared = storage.counterpart(a.storage, a.out) if a.storage else None
        summary = tune_search(_tune_request(a, shared), a.out, address=a.address, progress=not a.quiet)
    rows = summary["rows"]
    print(R.format_table(rows, summary["objective"]))
    print(R.summary_line(rows))
    if summary["interrupted"]:
        print(f"search interrupted: continue it with `distributed-anomaly tune --out {a.out} --resume`")
        return 130
    if summary["best"] is None:
        print(f"no trial completed; results in {a.out}")
        return 1
    held = summary["heldout_metrics"]
    print(
        f"best: trial {summary['best']['trial']} ({summary['objective']} {summary['best']['objective']:.4f})"
        + (f"; held-out image AUROC {held['image_auroc']:.4f}" if held and held.get("image_auroc") is not None else "")
        + f"\nrun directory: {a.out}/best; report: {a.out}/report.html; table: {a.out}/results.csv"
    )
    return 0
