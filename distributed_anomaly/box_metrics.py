"""Box-level detection metrics: ground-truth boxes from masks, IoU, and dataset precision/recall/F1 with greedy
one-to-one matching. Boxes are ``[x1, y1, x2, y2]`` with exclusive x2/y2; predictions add a score column."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from distributed_anomaly.metrics import EIGHT_CONNECTED_2D, as_bool


def gt_boxes_from_mask(mask: np.ndarray) -> np.ndarray:
    """Bounding boxes (K, 4) int64 ``[x1, y1, x2, y2]`` of the 8-connected regions of an (H, W) mask.

    x2/y2 are exclusive (last column/row + 1), so area = (x2 - x1) * (y2 - y1). Boxes are ordered by
    region label (raster order of each region's first pixel). An empty mask gives shape (0, 4).
    """
    m = as_bool(mask, "mask")
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    regions, n = ndimage.label(m, structure=EIGHT_CONNECTED_2D)
    boxes = np.zeros((n, 4), dtype=np.int64)
    for i, (rows, cols) in enumerate(ndimage.find_objects(regions)):  # loop over regions, not pixels
        boxes[i] = (cols.start, rows.start, cols.stop, rows.stop)
    return boxes


def _as_boxes(boxes: np.ndarray, n_cols: int, name: str) -> np.ndarray:
    """(K, n_cols) float64 array; any empty input becomes (0, n_cols) so images without boxes are easy."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, n_cols)
    if arr.ndim != 2 or arr.shape[1] != n_cols:
        raise ValueError(f"{name} must have shape (K, {n_cols}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (A, B) of boxes ``[x1, y1, x2, y2]`` with exclusive x2/y2 (area = (x2-x1)*(y2-y1)).

    Degenerate boxes have area 0; a pair whose union is empty gets IoU 0 rather than NaN.
    """
    a = _as_boxes(a, 4, "a")
    b = _as_boxes(b, 4, "b")
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_prf(
    pred_boxes: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """Detection precision/recall/F1 over a dataset, with greedy one-to-one matching per image.

    ``pred_boxes[i]`` is (K, 5) ``[x1, y1, x2, y2, score]`` and ``gt_boxes[i]`` is (M, 4) for image i (any
    empty array means none). Predictions are visited in descending score (stable for equal scores); each
    takes the still-unmatched GT box of highest IoU (lowest index on IoU ties) if that IoU >= threshold
    (a TP), else it is a FP. Unmatched GT boxes are FN. So duplicates on one GT give one TP + FPs.

    Returns {"precision", "recall", "f1", "tp", "fp", "fn"} (counts as ints). Empty cases:
    precision = tp / (tp + fp), or, with no prediction at all, 1.0 if there was nothing to find (fn == 0)
    else 0.0; recall = tp / (tp + fn), or, with no GT at all, 1.0 if nothing was predicted (fp == 0)
    else 0.0; f1 = 2PR / (P + R), 0.0 when P + R == 0. Nothing predicted and nothing to find is a perfect 1.
    """
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(
            f"pred_boxes and gt_boxes must list the same images, got {len(pred_boxes)} and {len(gt_boxes)}"
        )
    thr = float(iou_threshold)
    if not 0.0 < thr <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    tp = fp = fn = 0
    for i, (pred_raw, gt_raw) in enumerate(zip(pred_boxes, gt_boxes)):
        pred = _as_boxes(pred_raw, 5, f"pred_boxes[{i}]")
        gt = _as_boxes(gt_raw, 4, f"gt_boxes[{i}]")
        pred = pred[np.argsort(-pred[:, 4], kind="stable")]
        ious = box_iou(pred[:, :4], gt)
        matched = np.zeros(gt.shape[0], dtype=bool)
        for row in ious:  # loop over predictions of one image: the greedy order matters
            candidates = np.where(matched, -1.0, row)
            j = int(np.argmax(candidates)) if candidates.size else -1
            if j >= 0 and candidates[j] >= thr:
                matched[j] = True
                tp += 1
            else:
                fp += 1
        fn += int(gt.shape[0] - np.count_nonzero(matched))

    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
