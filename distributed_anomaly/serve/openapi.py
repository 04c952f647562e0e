"""The OpenAPI description of /predict (request body, answers, errors): documentation only, Ray-free."""

from __future__ import annotations

from typing import Any

from distributed_anomaly.postprocess import TASKS

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: raw bytes (any Content-Type but multipart, e.g. image/png) or a "
        "multipart/form-data upload with the image in the field `file` (optional text fields `task`, "
        "`model`). PNG, JPEG, BMP, TIFF, WebP; any size and mode (grey, RGBA, 16-bit) is accepted and resized.",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "task": {"type": "string", "enum": list(TASKS)},
                        "model": {"type": "string"},
                    },
                }
            },
        },
    }
}

ERROR_SCHEMA = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {"type": "string"},
                    "status": {"type": "integer"},
                    "request_id": {"type": "string", "description": "also the X-Request-ID header; in the logs"},
                },
            }
        }
    }
}
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "score (normalised: threshold at 0.5), raw_score, label (1 anomalous, 0 normal, null "
        "without thresholds), label_name, threshold (raw), model, version, width, height; boxes "
        "[[x1, y1, x2, y2, score]] (x2, y2 exclusive) for detection and segmentation; mask (base64 PNG, "
        "255 = anomalous, image size) for segmentation"
    },
    400: {
        "description": "not an image, not PNG/JPEG/BMP/TIFF/WebP, truncated, empty, bad task, or no model chosen",
        **ERROR_SCHEMA,
    },
    401: {"description": "API key missing or wrong", **ERROR_SCHEMA},
    404: {"description": "unknown model name", **ERROR_SCHEMA},
    413: {"description": "body over the size limit, or an image over the pixel limit", **ERROR_SCHEMA},
    500: {"description": "scoring failed (details in the server log, under the request id)", **ERROR_SCHEMA},
    503: {"description": "overloaded or no model replica: retry after the Retry-After header", **ERROR_SCHEMA},
}
