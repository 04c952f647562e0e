"""The live operating point: thresholds and sensitivity of served models, changed without a re-export (Ray-free).

The model deployment's Serve `user_config` (set by `distributed-anomaly serve-config set`, or under
`deployments: - name: AnomalyModel user_config:` in a `serve deploy` config) is

    {"models": {"washer_padim": {"threshold": 12.5, "pixel_threshold": 12.5, "sensitivity": 1.0},
                "tile_padim": {"target_fpr": 0.01}}}

Per model, all keys optional:
* `threshold`: raw image threshold (on `raw_score`'s scale); the pixel threshold follows it unless
  `pixel_threshold` is given; `target_fpr`: both set at that false-alarm rate on the export's normal calibration
  images (their scores are stored in postprocess.json), instead of `threshold`;
* `sensitivity` (> 0, default 1): moves both thresholds towards the calibration minimum, `norm_min +
  (t - norm_min) / sensitivity`, so 2 flags more, 0.5 fewer, whatever the model's raw scale.

A request may override the image and pixel threshold for itself (`?threshold=X`, raw; sensitivity not applied).
Every answer states the threshold it used and where it came from (`threshold_source`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from distributed_anomaly.errors import UserError
from distributed_anomaly.postprocess import MASK_PEAK_FRACTION, PostProcessor, threshold_for_fpr
from distributed_anomaly.serve.requests import BadRequest

KEYS = ("threshold", "pixel_threshold", "sensitivity", "target_fpr")


def _number(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise UserError(f"{what} must be finite, got {value!r}")
    return x


@dataclass(frozen=True)
class OperatingPoint:
    """One model's live settings (None: the export's)."""

    threshold: float | None = None
    pixel_threshold: float | None = None
    sensitivity: float = 1.0
    target_fpr: float | None = None

    @classmethod
    def parse(cls, d: Mapping[str, Any], model: str) -> OperatingPoint:
        unknown = sorted(set(d) - set(KEYS))
        if unknown:
            raise UserError(f"model {model}: unknown operating point key(s) {', '.join(unknown)}; known: {KEYS}")
        vals = {k: _number(d[k], f"model {model}: {k}") for k in KEYS if d.get(k) is not None}
        if "threshold" in vals and "target_fpr" in vals:
            raise UserError(f"model {model}: give threshold or target_fpr, not both")
        if vals.get("sensitivity", 1.0) <= 0:
            raise UserError(f"model {model}: sensitivity must be > 0, got {vals['sensitivity']}")
        if "target_fpr" in vals and not 0.0 <= vals["target_fpr"] < 1.0:
            raise UserError(f"model {model}: target_fpr must be a share in [0, 1), got {vals['target_fpr']}")
        return cls(**vals)

    def to_dict(self) -> dict[str, float]:
        out = {k: getattr(self, k) for k in KEYS if getattr(self, k) is not None}
        if out.get("sensitivity") == 1.0:
            del out["sensitivity"]
        return out


def parse_user_config(user_config: Mapping[str, Any] | None, names: list[str]) -> dict[str, OperatingPoint]:
    """The deployment's user_config -> {model: OperatingPoint}; unknown models or keys are refused."""
    cfg = dict(user_config or {})
    unknown = sorted(set(cfg) - {"models"})
    if unknown:
        raise UserError(f"AnomalyModel user_config: unknown key(s) {', '.join(unknown)}; expected 'models'")
    models = cfg.get("models") or {}
    if not isinstance(models, Mapping):
        raise UserError("AnomalyModel user_config: 'models' must map model names to settings")
    out = {}
    for name, d in models.items():
        if name not in names:
            raise UserError(f"AnomalyModel user_config: model {name!r} is not served (served: {', '.join(names)})")
        if not isinstance(d, Mapping):
            raise UserError(f"AnomalyModel user_config: model {name}: settings must be a mapping, got {d!r}")
        out[name] = OperatingPoint.parse(d, name)
    return out


def _scaled(t: float | None, post: PostProcessor, sensitivity: float) -> float | None:
    return None if t is None else post.norm_min + (t - post.norm_min) / sensitivity


def live_postprocessor(post: PostProcessor, op: OperatingPoint | None) -> PostProcessor:
    """The export's post-processing with the live operating point applied (see the module docstring)."""
    if op is None or op == OperatingPoint():
        return post
    image_t, pixel_t, source = post.image_threshold, post.pixel_threshold, post.threshold_source
    peak = post.mask_peak_fraction
    if op.target_fpr is not None:
        scores = post.extra.get("normal_scores")
        if not scores:
            raise UserError(
                "this export stores no normal calibration scores (exported before they were kept, or calibrated "
                "without normal images): re-export it to use target_fpr, or set a threshold"
            )
        image_t = pixel_t = threshold_for_fpr(scores, op.target_fpr)
        # a threshold from normal images only: masks keep the pixels near the peak, as at export (postprocess)
        source, peak = f"live:target_fpr={op.target_fpr:g}", MASK_PEAK_FRACTION
    elif op.threshold is not None:
        image_t, source, peak = op.threshold, "live:threshold", 0.0  # as --threshold at training
        pixel_t = op.pixel_threshold if op.pixel_threshold is not None else op.threshold
    elif op.pixel_threshold is not None:
        pixel_t, source = op.pixel_threshold, f"live:pixel_threshold ({source})"
    if op.sensitivity != 1.0:
        image_t, pixel_t = _scaled(image_t, post, op.sensitivity), _scaled(pixel_t, post, op.sensitivity)
        source = f"{source} x sensitivity {op.sensitivity:g}"
    return replace(
        post, image_threshold=image_t, pixel_threshold=pixel_t, threshold_source=source, mask_peak_fraction=peak
    )


def request_postprocessor(post: PostProcessor, threshold: float) -> PostProcessor:
    """One request's own threshold (image and pixel, raw), as --threshold at training does."""
    return replace(
        post,
        image_threshold=float(threshold),
        pixel_threshold=float(threshold),
        threshold_source="request",
        mask_peak_fraction=0.0,
    )


def parse_threshold(value: Any) -> float | None:
    """A request's `threshold` (query or form field) -> float or None; 400 for anything else."""
    if value is None or value == "":
        return None
    try:
        return _number(value, "threshold")
    except UserError as exc:
        raise BadRequest(str(exc)) from None


def operating_summary(post: PostProcessor, sensitivity: float = 1.0) -> dict[str, Any]:
    """What an answer (and /metadata) says about the thresholds in use."""
    return {
        "threshold": post.image_threshold,
        "pixel_threshold": post.pixel_threshold,
        "threshold_source": post.threshold_source,
        "sensitivity": sensitivity,
    }
