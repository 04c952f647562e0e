"""`export`: a run directory as an OpenVINO IR folder that scores exactly like the torch model.

The torch module rebuilt by `rundir.load_model` goes straight to `openvino.convert_model` (traced with
TorchScript; no ONNX detour, so no 2 GiB protobuf limit for PADIM's per-position inverse covariances).

IR_DIR layout (every file written into a temp folder next to IR_DIR, then renamed into place):

    IR_DIR/model.xml, model.bin  the network
    IR_DIR/postprocess.json      thresholds and normalisation (the run's; int8: refitted), read by `inference`
    IR_DIR/metadata.json         model type, task, thresholds, normalisation, image size, backbone, layers,
                                 precision, source run, package version, input/output description,
                                 model_bin_sha256 (checked by every reader: irformat.check_model_bin)

Model I/O (the contract of every precision):

    input  "image"        float32 [-1, 3, H, W], layout NCHW, dynamic batch: RGB scaled to [0, 1], resized to
                          H x W and ImageNet-normalised ((x - mean) / std), exactly what `data.images.to_tensor`
                          produces;
    output "anomaly_map"  float32 [-1, 1, H, W]: the raw (un-normalised) anomaly map. The image score is its
                          maximum; thresholds and normalisation are applied outside the network by
                          `postprocess.PostProcessor`, identical for torch and OpenVINO.

Precisions and tolerances (shares of the range of the torch maps over a test set; tests/test_export.py):

    fp32  the same float32 graph; maps agree with torch to rounding (measured ~2e-6; tested <= 1e-3 per pixel),
          labels, masks and boxes identical, image AUROC within 0.001. `inference` asks OpenVINO for f32
          inference precision, so CPUs whose default is bf16 (AMX) do not change this.
    fp16  weights stored as fp16 (`save_model(compress_to_fp16=True)`, half the .bin), computed in f32:
          measured 0.1-0.6 % per pixel; tested <= 2 % per pixel, <= 1 % per image score, image AUROC within
          0.01 (beyond pairs of images whose torch scores are closer than the score tolerance).
    int8  NNCF post-training quantization of the backbone only, thresholds refitted on the quantised model's own
          maps: see `export_int8`.

OpenVINO Model API (`openvino-model-api`, `model_api.models.AnomalyDetection`) reads the IR's runtime info
under `model_info`: model_type, task, labels, image_threshold, pixel_threshold, normalization_scale (and
min/max for older releases), mean_values, scale_values, reverse_input_channels, resize_type. With these it
embeds its own preprocessing (uint8 BGR HWC image -> resize to H x W -> RGB -> (x - 255 mean) / (255 std)),
which gives the same input tensor as ours up to the resize filter (ours is antialiased bilinear, Model API's
is plain bilinear: identical when the image is already H x W). Its normalisation
clip((x - threshold) / normalization_scale + 0.5, 0, 1) with normalization_scale = norm_max - norm_min is
ours. Documented differences: Model API labels an image anomalous when score > threshold (ours >=), reports
1 - normalised score for images it labels normal, and its mask is simply map >= pixel_threshold (no small-region
removal, no peak-relative cut for normal-only thresholds), so its masks and boxes can be larger than ours;
labels and scores agree.

Model API on CPUs whose default precision is bf16 (avx512_bf16 / AMX): it compiles without our f32 hint, so
its maps differ from ours (measured on an AMD EPYC with avx512_bf16, demo washer: image scores by up to 0.038,
maps by up to 36/255, labels equal). For f32 maps pass the hint through the adapter's plugin configuration:
    adapter = OpenvinoAdapter(create_core(), xml, device="CPU",
                              plugin_config={**get_user_config("CPU", "1", None), "INFERENCE_PRECISION_HINT": "f32"})
    model = Model.create_model(adapter)
(`Model.create_model(path, configuration=...)` cannot: `configuration` is the wrapper's own settings.) With it,
scores agree to ~1e-6 and maps to 1/255 (tests/test_export.py tests both paths).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from distributed_anomaly import __version__, rundir
from distributed_anomaly import export_int8 as int8
from distributed_anomaly.data.images import IMAGENET_MEAN, IMAGENET_STD
from distributed_anomaly.data.layout import DataLayout
from distributed_anomaly.data.sizes import ImageSize, as_hw
from distributed_anomaly.errors import UserError
from distributed_anomaly.fileio import write_json
from distributed_anomaly.irformat import (
    BIN,
    BIN_SHA256,
    DEFAULT_CALIBRATION_IMAGES,
    FORMAT,
    FORMAT_VERSION,
    INPUT_NAME,
    IR_FILES,
    METADATA,
    MODEL_API_LABELS,
    OUTPUT_NAME,
    POSTPROCESS,
    PRECISIONS,
    XML,
    file_sha256,
)
from distributed_anomaly.postprocess import TASKS


def _num(x: float) -> str:
    """Full-precision text (OpenVINO would round a float rt_info value to 6 digits)."""
    return repr(float(x))


def model_api_info(post, image_size: ImageSize, task: str) -> dict[str, str]:
    """The `model_info` runtime-info entries OpenVINO Model API's AnomalyDetection wrapper reads."""
    info = {
        "model_type": "AnomalyDetection",
        "task": task,
        "labels": " ".join(MODEL_API_LABELS),
        "image_shape": " ".join(map(str, as_hw(image_size))),  # height width, as anomalib writes it
        # Model API feeds uint8 BGR HWC: reverse to RGB, then (x - 255 mean) / (255 std) == ImageNet normalisation
        # of x / 255, i.e. data.images.to_tensor.
        "mean_values": " ".join(_num(255.0 * m) for m in IMAGENET_MEAN),
        "scale_values": " ".join(_num(255.0 * s) for s in IMAGENET_STD),
        "reverse_input_channels": "True",
        "resize_type": "standard",  # plain H x W resize, no crop or letterbox (as ours)
        "normalization_scale": _num(post._scale),
        "min": _num(post.norm_min),  # pre-0.3 Model API releases normalise with (max - min)
        "max": _num(post.norm_max),
    }
    if post.image_threshold is not None:
        info["image_threshold"] = _num(post.image_threshold)
    if post.pixel_threshold is not None:
        info["pixel_threshold"] = _num(post.pixel_threshold)
    return info


def convert(module, image_size: ImageSize):
    """torch module -> openvino.Model with input `image` [-1, 3, H, W] and output `anomaly_map` [-1, 1, H, W]."""
    import openvino as ov

    height, width = as_hw(image_size)
    example = torch.zeros(2, 3, height, width)  # batch 2: a batch-1 example may get specialised
    module = module.eval()
    with torch.no_grad(), _quiet_tracer():
        # Tracing ourselves (without the re-run check) halves conversion time; the graph is the same.
        traced = torch.jit.trace(module, example, check_trace=False)
        ov_model = ov.convert_model(traced, example_input=example, input=[ov.PartialShape([-1, 3, height, width])])
    if len(ov_model.inputs) != 1 or len(ov_model.outputs) != 1:
        raise RuntimeError(f"expected one input and one output, got {len(ov_model.inputs)} and {len(ov_model.outputs)}")
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    ov_model.inputs[0].get_node().set_layout(ov.Layout("NCHW"))
    ov_model.inputs[0].get_node().set_friendly_name(INPUT_NAME)
    return ov_model


@contextlib.contextmanager
def _quiet_tracer():
    """Silence TracerWarnings about shape-dependent Python ints (S is fixed per model, only the batch varies)
    and torch.jit.trace's deprecation notice (OpenVINO's PyTorch frontend traces with it either way)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # trace deprecation
        yield


def export_run(
    run_dir: str | os.PathLike,
    ir_dir: str | os.PathLike,
    precision: str = "fp32",
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    *,
    task: str = "segmentation",
    data: str | os.PathLike | None = None,
    layout: DataLayout | None = None,
) -> Path:
    """Export RUN_DIR to an OpenVINO IR folder IR_DIR (see the module docstring); returns IR_DIR.

    `calibration_images` (int8 only): how many of the run's normal training images NNCF calibrates on;
    `data` (read as `layout`, default detected) overrides the dataset recorded in the run's config.json. `task`
    is recorded for Model API.
    IR_DIR is replaced atomically if it is an earlier export; any other non-empty folder is refused.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    run_dir, ir_dir = Path(run_dir), Path(ir_dir)
    cfg, module, post = rundir.load_model(run_dir)
    _, _, info = rundir.load_config(run_dir)
    if ir_dir.resolve() == run_dir.resolve():
        raise UserError("the IR folder must differ from the run directory")
    if ir_dir.exists() and (not ir_dir.is_dir() or (any(ir_dir.iterdir()) and not (ir_dir / XML).is_file())):
        raise UserError(f"{ir_dir} exists and is not an earlier export; choose another --out or remove it")

    calibration = (
        int8.calibration_batches(run_dir, cfg.image_size, calibration_images, data, layout=layout)
        if precision == "int8"
        else None
    )
    ov_model = convert(module, cfg.image_size)
    if precision == "int8":
        ov_model = int8.quantize_int8(ov_model, calibration)
        post = int8.recalibrate(ov_model, run_dir, cfg, post, data, layout)
    check = int8.bf16_check(ov_model, run_dir, cfg, data, layout) if precision == "auto" else None
    precision = check["chosen"] if check else precision
    for key, value in model_api_info(post, cfg.image_size, task).items():
        ov_model.set_rt_info(value, ["model_info", key])
    for key, value in (
        ("model", cfg.model),
        ("backbone", cfg.backbone),
        ("precision", precision),
        ("version", __version__),
    ):
        ov_model.set_rt_info(str(value), ["distributed_anomaly", key])

    metadata = _metadata(cfg, module, post, task, precision, calibration, run_dir, info.get("data"))
    metadata.update(inference_precision="bf16" if precision == "bf16" else "f32", bf16_check=check)
    _write_ir(ov_model, post, metadata, ir_dir)
    if post.image_threshold is None:
        print(
            f"warning: {run_dir} has no thresholds; the export gives normalised maps and scores but no labels "
            "or masks, and OpenVINO Model API will fall back to its default thresholds",
            file=sys.stderr,
        )
    return ir_dir


def _metadata(
    cfg, module, post, task: str, precision: str, calibration: list | None, run_dir: Path, data: str | None
) -> dict:
    """metadata.json: what a client needs to use the IR without this package (see the module docstring)."""
    import openvino as ov

    size = cfg.image_size
    height, width = as_hw(size)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.model,
        "task": task,
        "backbone": cfg.backbone,
        "layers": list(cfg.layers),
        "n_features": getattr(module, "n_features", None) if cfg.model in ("padim", "patchcore") else None,
        **_patchcore_details(module),
        "image_size": list(size) if isinstance(size, tuple) else size,  # S, or [H, W] when not square
        "precision": precision,
        "image_threshold": post.image_threshold,
        "pixel_threshold": post.pixel_threshold,
        "norm_min": post.norm_min,
        "norm_max": post.norm_max,
        "threshold_source": post.threshold_source,
        "mask_peak_fraction": getattr(post, "mask_peak_fraction", 0.0),
        "min_region_fraction": post.min_region_fraction,
        "normalization": {
            "formula": "clip((x - threshold) / (norm_max - norm_min) + 0.5, 0, 1)",
            "input": "RGB / 255, resized to H x W (bilinear, antialiased), (x - mean) / std",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "input": {"name": INPUT_NAME, "shape": [-1, 3, height, width], "dtype": "float32", "layout": "NCHW"},
        "output": {
            "name": OUTPUT_NAME,
            "shape": [-1, 1, height, width],
            "dtype": "float32",
            "meaning": "raw anomaly map; image score = max",
        },
        "calibration_images": len(calibration) // 2 if calibration is not None else None,
        "source_run": str(run_dir.resolve()),
        "source_data": data,
        "version": __version__,
        "openvino_version": ov.get_version(),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _patchcore_details(module) -> dict:
    """PatchCore's memory bank (a constant of the graph, searched in it) and its settings, for metadata.json."""
    bank = getattr(module, "memory_bank", None)
    if bank is None:
        return {}
    return {
        "memory_bank": {"rows": int(bank.shape[0]), "dim": int(bank.shape[1]), "in_graph": True},
        "coreset_ratio": module.coreset_ratio,
        "num_neighbors": module.num_neighbors,
    }


def _write_ir(ov_model, post, metadata: dict, ir_dir: Path) -> None:
    """Every file into a temp folder beside IR_DIR, fsynced, metadata.json last, then renamed into place."""
    import openvino as ov

    ir_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ir_dir.name}.", suffix=".tmp", dir=ir_dir.parent))
    try:
        ov.save_model(ov_model, tmp / XML, compress_to_fp16=(metadata["precision"] == "fp16"))
        write_json(tmp / POSTPROCESS, post.to_dict())
        # last: its presence marks a complete export; the weights' hash lets every reader verify model.bin
        write_json(tmp / METADATA, {**metadata, BIN_SHA256: file_sha256(tmp / BIN)})
        for name in IR_FILES:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _replace_dir(tmp, ir_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is moved aside first and deleted after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:  # persist the renames
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
