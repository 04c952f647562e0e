"""Test-split metrics of a fitted model: threshold-free ones always, threshold-dependent ones given a threshold."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distributed_anomaly import box_metrics, metrics
from distributed_anomaly.data.mvtec import GOOD, Record
from distributed_anomaly.postprocess import PostProcessor

METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "image_f1",
    "pixel_f1",
    "image_f1_max",
    "pixel_f1_max",
    "aupro",
    "box_precision",
    "box_recall",
    "box_f1",
    "num_test_images",
)
AUPRO_FPR_LIMIT = 0.3


def _binary_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def _safe(fn, *args) -> float | None:
    """A metric undefined for this data (one class only) is None, not an exception."""
    try:
        value = float(fn(*args))
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def compute_metrics(maps: np.ndarray, records: Sequence[Record], masks: np.ndarray, post: PostProcessor) -> dict:
    """Metrics of raw maps (N, S, S) against labels and ground-truth masks (N, S, S) at model resolution."""
    labels = np.array([r.label for r in records], dtype=bool)
    scores = maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)
    notes: list[str] = []
    out: dict = dict.fromkeys(METRIC_KEYS)
    out["num_test_images"] = len(records)
    out["num_anomalous_images"] = int(labels.sum())
    out["image_auroc"] = _safe(metrics.auroc, scores, labels)
    out["image_f1_max"] = _safe(lambda s, l: metrics.f1_max(s, l)[0], scores, labels)
    if masks.any():
        flat_maps, flat_masks = maps.ravel(), masks.ravel()
        out["pixel_auroc"] = _safe(metrics.auroc, flat_maps, flat_masks)
        out["pixel_f1_max"] = _safe(lambda s, l: metrics.f1_max(s, l)[0], flat_maps, flat_masks)
        out["aupro"] = _safe(metrics.aupro, maps, masks, AUPRO_FPR_LIMIT)
    else:
        notes.append("no anomalous pixels in the test split: pixel metrics are undefined")
    if labels.all() or not labels.any():
        notes.append("the test split holds only one class: image AUROC/F1 are undefined")

    if post.image_threshold is None:
        notes.append(
            "no threshold: --val-fraction 0 leaves no calibration images and no --threshold was given, "
            "so image_f1, pixel_f1 and box metrics are null (threshold-free metrics are reported)"
        )
    else:
        preds = post.predict_batch(maps)
        pred_labels = np.array([p.label for p in preds], dtype=bool)
        out["image_f1"] = _binary_f1(pred_labels, labels) if labels.any() else None
        if masks.any():
            pred_masks = np.stack([p.mask for p in preds])
            out["pixel_f1"] = _binary_f1(pred_masks, masks)
            box = box_metrics.box_prf([p.boxes for p in preds], [box_metrics.gt_boxes_from_mask(m) for m in masks])
            out["box_precision"], out["box_recall"], out["box_f1"] = box["precision"], box["recall"], box["f1"]
        out["image_threshold"] = post.image_threshold
        out["pixel_threshold"] = post.pixel_threshold
    out["threshold_source"] = post.threshold_source
    out["per_defect"] = _per_defect(scores, records)
    out["notes"] = notes
    return out


def _per_defect(scores: np.ndarray, records: Sequence[Record]) -> dict:
    """Image AUROC of each defect type against the normal test images: where the model is weak."""
    defects = np.array([r.defect for r in records])
    good = defects == GOOD
    table = {}
    for d in sorted(set(defects) - {GOOD}):
        sel = good | (defects == d)
        table[d] = {
            "count": int((defects == d).sum()),
            "image_auroc": _safe(metrics.auroc, scores[sel], defects[sel] == d),
        }
    return table


def format_metrics(m: dict) -> str:
    """A short human-readable table of the headline metrics."""
    rows = [(k, m.get(k)) for k in METRIC_KEYS]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {'n/a' if v is None else (f'{v:.4f}' if isinstance(v, float) else v)}" for k, v in rows]
    for d, v in m.get("per_defect", {}).items():
        auc = v["image_auroc"]
        lines.append(f"  {d:<{width - 2}}  image AUROC {'n/a' if auc is None else f'{auc:.4f}'} ({v['count']} images)")
    lines += [f"note: {n}" for n in m.get("notes", [])]
    return "\n".join(lines)
