"""One run's commands: train and evaluate (predict and export: cli/inference_cmds.py).

Each command imports its implementation when it runs, so `--help` and the other commands do not load torch,
OpenVINO or Ray; the defaults shown come from the torch-free configuration dataclasses.
"""

from __future__ import annotations

import argparse
import json

from distributed_anomaly.cli.common import (
    VERBOSITY,
    add_data_options,
    add_max_pixels,
    add_patchcore_options,
    apply_max_pixels,
    changed_options,
    data_layout,
    default,
    image_size,
    layers,
    layout_with_data,
    model_config,
)
from distributed_anomaly.config import FROZEN_PRECISIONS, MODELS, RUNTIMES, Execution, ModelConfig, TrainConfig
from distributed_anomaly.errors import UserError
from distributed_anomaly.models.specs import BACKBONES, DEFAULT_BACKBONE, PATCHCORE_DIM

REPORT_HELP = (
    "also write RUN_DIR/report.html: metrics, curves, score distributions, galleries of missed defects "
    "and false alarms (self-contained HTML)"
)
_TRAIN_DEFAULTS: dict = {}


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        parents=[VERBOSITY],
        help="fit a model on the normal training images, calibrate thresholds, evaluate on the test split",
        description="Fit PADIM, STFPM or PatchCore on the normal training images of a category (MVTec, folder or "
        "VisA layout), hold out --val-fraction of them to choose thresholds (and for STFPM's early stopping), "
        "evaluate on the whole test split, and write a self-contained RUN_DIR.",
    )
    p.add_argument("--data", help="dataset folder (layout: --format); required unless --resume")
    add_data_options(p)
    p.add_argument("--model", choices=MODELS, default=default(ModelConfig, "model"))
    p.add_argument("--out", help="run directory to write; required unless --resume")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted STFPM run started with --workers N "
        "from its latest checkpoint, with the arguments it was started with (only --address, --report, --max-pixels "
        "and --quiet may be given again)",
    )
    _model_options(p)
    _training_options(p)
    _execution_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--report", action="store_true", help=REPORT_HELP)
    add_max_pixels(p)
    p.set_defaults(func=cmd_train)
    _TRAIN_DEFAULTS.update(vars(p.parse_args([])))  # to tell which options a --resume call was given


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help=f"feature extractor: {', '.join(BACKBONES)} (default {DEFAULT_BACKBONE})",
    )
    p.add_argument("--no-pretrained", action="store_true", help="random (seeded) backbone weights instead of ImageNet")
    p.add_argument("--weights", metavar="FILE", help="local torchvision state-dict file for the backbone")
    p.add_argument(
        "--layers",
        type=layers,
        default=default(ModelConfig, "layers"),
        help="comma-separated feature taps, e.g. layer1,layer2,layer3 (default: the backbone's; PatchCore: its two "
        "middle ones, layer2,layer3 or features.6,features.13)",
    )
    n_features = ", ".join(f"{s.default_n_features} {name}" for name, s in BACKBONES.items())
    p.add_argument(
        "--n-features",
        type=int,
        help=f"PADIM random channel subset (default: {n_features}); PatchCore: dimension the taps are "
        f"pooled to (default: {PATCHCORE_DIM} or all channels when fewer)",
    )
    add_patchcore_options(p)
    p.add_argument(
        "--image-size",
        type=image_size,
        default=default(ModelConfig, "image_size"),
        help="images are resized to S x S, or to H x W given as HxW (e.g. 256x512 for a wide camera), no crop "
        "(default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=default(ModelConfig, "seed"))


def _training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--epochs",
        type=int,
        default=default(TrainConfig, "epochs"),
        help="STFPM epochs (default 0: 100, early stopping on validation loss)",
    )
    p.add_argument(
        "--lr", type=float, default=default(TrainConfig, "lr"), help="STFPM SGD learning rate (default %(default)s)"
    )
    p.add_argument(
        "--momentum",
        type=float,
        default=default(TrainConfig, "momentum"),
        help="STFPM SGD momentum (default %(default)s)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=default(TrainConfig, "weight_decay"),
        help="STFPM SGD weight decay (default %(default)s, the paper's; anomalib uses 1e-3)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=default(TrainConfig, "patience"),
        help="STFPM early-stopping patience in epochs (default %(default)s)",
    )
    p.add_argument(
        "--no-bn-recompute",
        action="store_true",
        help="STFPM: keep the student's batch-norm running averages from training (as anomalib) instead "
        "of recomputing exact statistics for the kept weights in one extra pass (default)",
    )
    p.add_argument(
        "--batch-size", type=int, default=default(TrainConfig, "batch_size"), help="images per batch (default 0: 32)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=default(TrainConfig, "val_fraction"),
        help="share of train/good held out for thresholds and early stopping (default %(default)s; 0 fits "
        "on all and reports threshold-dependent metrics only with --threshold)",
    )
    p.add_argument("--threshold", type=float, help="fixed raw image-score threshold instead of the adaptive one")
    p.add_argument("--pixel-threshold", type=float, help="fixed raw pixel threshold (default: --threshold)")
    p.add_argument(
        "--target-fpr",
        type=float,
        help="thresholds at this false-alarm rate on the normal calibration images, e.g. 0.01 (source target_fpr)",
    )
    p.add_argument(
        "--calibrate-on-test",
        action="store_true",
        help="fit thresholds on the test images (optimistic metrics; recorded in metrics.json)",
    )


def _execution_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=default(Execution, "workers"),
        help="Ray workers: PADIM/PatchCore feature-extraction actors or STFPM data-parallel trainers (default 0: "
        "in this process, no Ray). With N >= 1 and no --address a local single-node Ray is started",
    )
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (token auth: set RAY_AUTH_TOKEN)")
    add_runtime(p)
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="skip undecodable images with a warning instead of stopping: training images (in process or on "
        "Ray, PADIM and STFPM) and calibration/test images; metrics.json lists them (skipped_images)",
    )
    p.add_argument(
        "--storage",
        metavar="PATH_OR_URI",
        help="shared storage for a multi-node cluster: a path every node mounts (NFS) or a URI (s3://bucket/"
        "prefix, gs://, hdfs://). Ray STFPM checkpoints go to STORAGE/<RUN_DIR name>/ray_train (written "
        "and read by every node) and the finished run directory is copied to STORAGE/<RUN_DIR name>. "
        "Default: RUN_DIR only (checkpoints in RUN_DIR/ray_train)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=default(Execution, "max_failures"),
        help="Ray STFPM: restarts of the worker group from the latest checkpoint after a worker dies, "
        "before the run stops (it can then be continued with --resume; default %(default)s)",
    )


def add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=default(Execution, "runtime"),
        help="where the frozen backbone (PADIM, PatchCore) runs during the fit and scoring: openvino (the CPU's "
        "fast path; converted once per backbone, taps, image size and weights, cached under "
        "$DISTRIBUTED_ANOMALY_CACHE or ~/.cache/distributed_anomaly) or torch (eager, the reference). Statistics "
        "agree within 1e-4 relative (default %(default)s)",
    )
    p.add_argument(
        "--precision",
        choices=FROZEN_PRECISIONS,
        default=default(Execution, "precision"),
        help="OpenVINO's inference precision for that frozen network: f32 (the reference) or bf16 (CPUs with "
        "avx512_bf16 or AMX: about twice the backbone's throughput; others compute in f32). Recorded in the "
        "run's config.json; docs/benchmarks.md has the AUROC change measured on the demo data "
        "(default %(default)s)",
    )


def cmd_train(a: argparse.Namespace) -> int:
    from distributed_anomaly.evaluation import format_metrics
    from distributed_anomaly.training import resume, train

    apply_max_pixels(a)
    if a.resume:
        given = changed_options(a, _TRAIN_DEFAULTS, ("resume", "address", "report", "max_pixels"))
        if given:
            raise UserError(f"--resume continues a run with the arguments it was started with; drop {', '.join(given)}")
        metrics = resume(a.resume, progress=not a.quiet, report=a.report, address=a.address)
        a.out = a.resume
    else:
        if not a.data or not a.out:
            raise UserError("train needs --data and --out (or --resume RUN_DIR)")
        cfg = model_config(a)
        tcfg = TrainConfig(
            epochs=a.epochs,
            lr=a.lr,
            momentum=a.momentum,
            weight_decay=a.weight_decay,
            patience=a.patience,
            batch_size=a.batch_size,
            val_fraction=a.val_fraction,
            pretrained=not a.no_pretrained,
            weights_file=a.weights,
            threshold=a.threshold,
            pixel_threshold=a.pixel_threshold,
            target_fpr=a.target_fpr,
            calibrate_on_test=a.calibrate_on_test,
            bn_recompute=not a.no_bn_recompute,
        )
        run = Execution(
            a.workers,
            a.address,
            a.skip_corrupt,
            a.storage,
            max_failures=a.max_failures,
            runtime=a.runtime,
            precision=a.precision,
        )
        metrics = train(
            a.data,
            a.out,
            cfg,
            tcfg,
            progress=not a.quiet,
            overwrite=a.overwrite,
            report=a.report,
            run=run,
            layout=data_layout(a),
        )
    print(format_metrics(metrics))
    print(f"run written to {a.out}" + (f"; report: {metrics['report']}" if a.report else ""))
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", parents=[VERBOSITY], help="score a run's test split with its stored thresholds; writes metrics.json"
    )
    p.add_argument("--run", required=True, help="run directory written by train")
    p.add_argument("--data", help="dataset folder (default: the one the run was trained on, read the same way)")
    add_data_options(p)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--report", action="store_true", help=REPORT_HELP)
    add_runtime(p)
    add_max_pixels(p)
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave undecodable test images out with a warning (listed in metrics.json) instead of stopping",
    )
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from distributed_anomaly.evaluation import format_metrics
    from distributed_anomaly.training import evaluate_run

    apply_max_pixels(a)
    metrics = evaluate_run(
        a.run,
        a.data,
        a.batch_size,
        progress=not a.quiet,
        report=a.report,
        layout=layout_with_data(a),
        runtime=a.runtime,
        precision=a.precision,
        skip_corrupt=a.skip_corrupt,
    )
    print(json.dumps(metrics, indent=2) if a.json else format_metrics(metrics))
    if a.report and not a.json:
        print(f"report: {metrics['report']}")
    return 0
