"""Commands that use a trained model: predict (run directory or OpenVINO IR) and export (run -> IR).

As in run_cmds.py, each command imports its implementation when it runs, so `--help` loads neither torch nor
OpenVINO.
"""

from __future__ import annotations

import argparse
import sys

from distributed_anomaly.cli.common import (
    VERBOSITY,
    add_data_options,
    add_inference_precision,
    add_max_pixels,
    apply_max_pixels,
    layout_with_data,
)
from distributed_anomaly.irformat import DEFAULT_CALIBRATION_IMAGES, PRECISIONS
from distributed_anomaly.postprocess import DEFAULT_TASK, TASKS


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", parents=[VERBOSITY], help="score images: JSON per image plus heatmap/mask/box overlays"
    )
    p.add_argument(
        "--model",
        required=True,
        help="run directory written by train (torch), or an OpenVINO IR "
        "folder written by export (same scores, same post-processing)",
    )
    p.add_argument("--out", required=True, help="folder for <name>.json, <name>_overlay.png, <name>_mask.png")
    p.add_argument("--task", choices=TASKS, default=DEFAULT_TASK)
    p.add_argument("--batch-size", type=int, default=8, help="images per inference call (default %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        help="inference threads (OpenVINO INFERENCE_NUM_THREADS, or torch "
        "threads for a run directory; default: all cores)",
    )
    add_max_pixels(p)
    add_inference_precision(p)
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.set_defaults(func=cmd_predict)


def cmd_predict(a: argparse.Namespace) -> int:
    from distributed_anomaly.predict import predict

    results = predict(
        a.model, a.images, a.out, a.task, a.batch_size, a.threads, apply_max_pixels(a), precision=a.precision
    )
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


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        parents=[VERBOSITY],
        help="export a run to an OpenVINO IR folder (fp32, fp16, int8 or bf16) that scores like torch",
        description="Convert a run directory's model with openvino.convert_model (no ONNX step) into IR_DIR: "
        "model.xml/.bin with input 'image' (float32 [N, 3, H, W], RGB / 255 ImageNet-normalised, dynamic batch) "
        "and output 'anomaly_map' (float32 [N, 1, H, W], raw map), plus postprocess.json and metadata.json. "
        "The thresholds and normalisation also go into the IR's runtime info, so OpenVINO Model API's "
        "AnomalyDetection wrapper loads it directly. Use it with `predict --model IR_DIR`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  distributed-anomaly export --run runs/tile_padim --out ir/tile_padim\n"
        "  distributed-anomaly export --run runs/tile_stfpm --out ir/tile_stfpm_int8 --precision int8",
    )
    p.add_argument("--run", required=True, help="run directory written by train")
    p.add_argument("--out", required=True, metavar="IR_DIR", help="folder to write (replaced if an earlier export)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=PRECISIONS[0],
        help="fp32 (default; same maps as torch), fp16 (fp16 weights, half the size, maps within ~1%% "
        "of their range), int8 (NNCF post-training quantization on the run's training images; "
        "image AUROC within 0.01), bf16 (fp32 weights, computed in bf16 where the CPU has it) or auto "
        "(bf16 if the run's test AUROC moves by at most 0.005 in bf16, else fp32; the measurement is "
        "recorded in metadata.json)",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=DEFAULT_CALIBRATION_IMAGES,
        help="int8: number of training images to calibrate on (default %(default)s)",
    )
    p.add_argument(
        "--data",
        help="int8: dataset folder for calibration (default: the one the run was trained on, read the same way)",
    )
    add_data_options(p)
    p.add_argument(
        "--task", choices=TASKS, default=DEFAULT_TASK, help="task recorded for OpenVINO Model API (default %(default)s)"
    )
    p.set_defaults(func=cmd_export)


def cmd_export(a: argparse.Namespace) -> int:
    from distributed_anomaly.export import export_run

    out = export_run(
        a.run, a.out, a.precision, a.calibration_images, task=a.task, data=a.data, layout=layout_with_data(a)
    )
    print(f"exported {a.run} ({a.precision}) to {out}")
    return 0
