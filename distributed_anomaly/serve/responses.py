"""What a response says: the JSON of a prediction and of /metadata, the same for HTTP and the handle."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image

from distributed_anomaly.postprocess import TASKS
from distributed_anomaly.serve.registry import ModelEntry

SCORE_THRESHOLD = 0.5  # normalised scores always put the image threshold here (postprocess.py)


def mask_png_base64(mask: np.ndarray) -> str:
    """A bool mask as a base64 PNG (8-bit grey, 255 = anomalous), in the image's own size."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask(b64: str) -> np.ndarray:
    """Inverse of mask_png_base64 (for clients and tests)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) > 127


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def prediction_response(
    pred, task: str, entry: ModelEntry, image_shape: tuple[int, ...], thresholds: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One `postprocess.Prediction` as the JSON answer of /predict (and of the handle).

    `score` is normalised (image threshold at 0.5); `threshold` is the raw image threshold used, on the scale of
    `raw_score`, and `threshold_source` where it came from (`thresholds`, serve.operating: live or per-request;
    default the export's); `mask` (segmentation) is a base64 PNG in the image's own size, null without thresholds.
    """
    used = thresholds or {
        "threshold": entry.info.get("image_threshold"),
        "pixel_threshold": entry.info.get("pixel_threshold"),
        "threshold_source": entry.info.get("threshold_source"),
        "sensitivity": 1.0,
    }
    out: dict[str, Any] = {
        "task": task,
        "model": entry.name,
        "version": entry.version,
        **pred.to_json(task),
        "threshold": _finite(used["threshold"]),
        "pixel_threshold": _finite(used["pixel_threshold"]),
        "threshold_source": used["threshold_source"],
        "sensitivity": used["sensitivity"],
        "score_threshold": SCORE_THRESHOLD,
        "width": int(image_shape[1]),
        "height": int(image_shape[0]),
    }
    out["score"], out["raw_score"] = _finite(out["score"]), _finite(out["raw_score"])
    if task == "segmentation":
        out["mask"] = None if pred.mask is None else mask_png_base64(pred.mask)
        out["mask_format"] = "png;base64"
    return out


def public_location(path: str) -> str:
    """A model's path or URI as /metadata shows it: no user:password@ and no query string or fragment (where
    storage credentials and endpoints travel, e.g. s3://bucket/ir?endpoint_override=...&access_key=...)."""
    if "://" not in path:
        return path
    parts = urlsplit(path)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def metadata_response(entries: Mapping[str, ModelEntry], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The /metadata JSON: each model's description (its location without credentials) and the settings."""
    return {
        "models": [{**e.describe(), "path": public_location(e.path)} for e in entries.values()],
        "tasks": list(TASKS),
        "default_model": next(iter(entries)) if len(entries) == 1 else None,
        **settings,
    }
