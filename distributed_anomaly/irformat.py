"""The exported OpenVINO IR folder as a format: file names, tensor names, metadata checks, version.

A leaf module: `export` writes this format, `inference`, `predict` and Serve read it, so the names and the
checks live here and nothing has to import the exporter (and its NNCF/calibration dependencies) to read one.

    IR_DIR/model.xml, model.bin  the network: input "image" [-1, 3, H, W] -> output "anomaly_map" [-1, 1, H, W]
    IR_DIR/postprocess.json      thresholds and normalisation (postprocess.PostProcessor)
    IR_DIR/metadata.json         written last by `export` (and last by an upload): its presence marks a complete
                                 folder; it carries model.bin's SHA-256 (`model_bin_sha256`), checked on load
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from distributed_anomaly.errors import RunDirError
from distributed_anomaly.fileio import read_json
from distributed_anomaly.postprocess import POSTPROCESS_FILE

# Export precisions: fp32, fp16 (weights), int8 (NNCF), bf16 (fp32 weights computed in bfloat16 on CPUs that have
# it: avx512_bf16, AMX); "auto" exports bf16 only if the image AUROC it measures on the run's test images moves by at
# most BF16_MAX_AUROC_CHANGE from f32 (and the CPU computes in bf16), else fp32. metadata.json states the choice.
PRECISIONS = ("fp32", "fp16", "int8", "bf16", "auto")
BF16_MAX_AUROC_CHANGE = 0.005
INPUT_NAME, OUTPUT_NAME = "image", "anomaly_map"
XML, BIN, METADATA, POSTPROCESS = "model.xml", "model.bin", "metadata.json", POSTPROCESS_FILE
IR_FILES = (XML, BIN, METADATA, POSTPROCESS)
FORMAT = "distributed_anomaly.openvino_ir"
FORMAT_VERSION = 2  # 2: metadata.json carries model_bin_sha256
BIN_SHA256 = "model_bin_sha256"
MODEL_API_LABELS = ("Normal", "Anomaly")
DEFAULT_CALIBRATION_IMAGES = 300  # int8: normal training images NNCF calibrates on
# What identifies an export without reading model.bin (which can be gigabytes): metadata.json holds its
# SHA-256, so these small files pin the weights too (see model_version).
VERSION_FILES = (METADATA, POSTPROCESS, XML)
DESCRIBED_KEYS = (
    "model",
    "backbone",
    "image_size",
    "precision",
    "task",
    "image_threshold",
    "pixel_threshold",
    "threshold_source",
    "norm_min",
    "norm_max",
    "exported_at",
    "version",
    BIN_SHA256,
)


def inference_precision(metadata: dict[str, Any]) -> str:
    """OpenVINO's inference precision for an export: bf16 for a bf16 export, else f32 (fp16 and int8 IRs too)."""
    return str(metadata.get("inference_precision") or ("bf16" if metadata.get("precision") == "bf16" else "f32"))


def is_ir_dir(path: str | os.PathLike) -> bool:
    """An exported OpenVINO folder (model.xml inside) rather than a run directory."""
    return (Path(path) / XML).is_file()


def check_ir_files(where: str | os.PathLike, present: set[str]) -> None:
    """An export folder (local or in storage) must hold every file `export` writes."""
    missing = [n for n in IR_FILES if n not in present]
    if missing:
        raise RunDirError(
            f"OpenVINO export {where} is missing {', '.join(missing)} "
            "(was the export interrupted or copied partially? re-run `export`)"
        )


def read_metadata(ir_dir: str | os.PathLike) -> dict[str, Any]:
    """metadata.json of an export, checked to be ours (a clear error rather than a KeyError later)."""
    path = Path(ir_dir) / METADATA
    try:
        meta = read_json(path)
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunDirError(f"{path} is not metadata written by `export`")
    return meta


def describe_ir(ir_dir: str | os.PathLike) -> dict[str, Any]:
    """The metadata a client needs to interpret answers (what Serve's /metadata shows)."""
    meta = read_metadata(ir_dir)
    info = {k: meta.get(k) for k in DESCRIBED_KEYS}
    info["package_version"] = info.pop("version")
    return info


def model_version(ir_dir: str | os.PathLike) -> str:
    """12 hex digits of SHA-256 over metadata, thresholds and graph. metadata.json holds model.bin's SHA-256, so
    the version pins the weights as well (checked against model.bin on load: check_model_bin) without start-up
    reading gigabytes; every re-export changes it (exported_at), copies of one export share it."""
    recorded_bin_sha256(read_metadata(ir_dir), ir_dir)
    h = hashlib.sha256()
    for name in VERSION_FILES:
        h.update(name.encode())
        h.update((Path(ir_dir) / name).read_bytes())
    return h.hexdigest()[:12]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (model.bin can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def recorded_bin_sha256(meta: dict[str, Any], where: str | os.PathLike) -> str:
    """model.bin's SHA-256 as metadata.json records it; an export without it (format 1) cannot be verified."""
    value = meta.get(BIN_SHA256)
    if not isinstance(value, str) or len(value) != 64:
        raise RunDirError(
            f"{Path(where) / METADATA} records no {BIN_SHA256} (an export older than format {FORMAT_VERSION}): "
            "re-run `export` so that model.bin can be verified"
        )
    return value


def check_model_bin(ir_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> str:
    """model.bin is the file `export` wrote: its SHA-256 equals metadata.json's; returns it. A clear error
    names both hashes otherwise (a truncated or mixed copy: upload or export it again)."""
    meta = read_metadata(ir_dir) if meta is None else meta
    want = recorded_bin_sha256(meta, ir_dir)
    got = file_sha256(Path(ir_dir) / BIN)
    if got != want:
        raise RunDirError(
            f"{Path(ir_dir) / BIN} is not the model its metadata describes (SHA-256 {got[:12]}…, metadata.json "
            f"says {want[:12]}…): a truncated or mixed copy? copy, upload or export it again"
        )
    return got
