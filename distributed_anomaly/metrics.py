"""Evaluation metrics for anomaly detection: image/pixel AUROC, PR/F1, AUPRO and box-level P/R/F1.

Pixel-level metrics see tens of millions of values (MVTec test sets at 256 px), so everything here is
sort-based and vectorised: no Python loop runs over thresholds or pixels. Two design points keep it fast:

* ``np.sort`` of the raw scores is an order of magnitude faster than ``np.argsort`` (SIMD sorting networks,
  no index gather), so the curves are built from sorted values plus ``np.searchsorted`` instead of from a
  permutation of the labels.
* float32 inputs are sorted as float32. Converting to float64 preserves order and ties exactly, so it buys
  no exactness for sorting and would cost twice the memory; comparisons against a caller's threshold are
  done in float64 (see :func:`f1_at_threshold`).

Tie handling matches scikit-learn: all samples with equal score cross a threshold together, so the ROC/PR
curves have one point per distinct score value, and AUROC counts a positive/negative tie as one half.
Only numpy and scipy.ndimage are used, so the module loads without torch or scikit-learn. Box-level detection
metrics live in `box_metrics`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "aupro",
    "auroc",
    "f1_at_threshold",
    "f1_max",
    "precision_recall_curve",
    "roc_curve",
]

# 8-connectivity in 2-D; per-image 8-connectivity for an (N, H, W) stack (no links across images).
EIGHT_CONNECTED_2D = np.ones((3, 3), dtype=bool)
_EIGHT_CONNECTED_STACK = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_STACK[1] = True


# --------------------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------------------


def _as_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    """Scores as a float32/float64 array (other dtypes go to float64); rejects NaN/inf.

    Non-finite scores would sort inconsistently (NaN) or collide with the +inf sentinel threshold of
    :func:`roc_curve`, and scikit-learn rejects them too.
    """
    arr = np.asarray(scores)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def as_bool(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Labels/masks as bool; only bool or values in {0, 1} are accepted.

    Being strict catches masks that were resized with interpolation (0.5 values) or stored as 0/255.
    """
    arr = np.asarray(labels)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be bool or numeric 0/1, got dtype {arr.dtype}")
    if arr.size and not ((arr == 0) | (arr == 1)).all():
        raise ValueError(f"{name} must contain only 0 and 1 (or be boolean)")
    return arr != 0


def _scores_and_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated, flattened (scores, bool labels) of equal shape; any input shape (e.g. pixel maps) works."""
    s = _as_scores(scores)
    y = as_bool(labels)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same shape, got {s.shape} and {y.shape}")
    if s.size == 0:
        raise ValueError("scores and labels are empty")
    return s.ravel(), y.ravel()


# --------------------------------------------------------------------------------------------------------
# ranking curves
# --------------------------------------------------------------------------------------------------------


def _group_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal values in an ascending array."""
    change = np.empty(sorted_values.size, dtype=bool)
    change[:1] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=change[1:])
    return np.flatnonzero(change)


def _binary_counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending) with #positives and #negatives scoring >= each one.

    Same output as scikit-learn's ``_binary_clf_curve``. Instead of argsorting all samples we sort the
    values, then count the minority class per distinct value by locating its own (sorted, grouped)
    values among the distinct values, and accumulate from the top.
    """
    n = s.size
    values = np.sort(s)
    starts = _group_starts(values)
    thresholds = values[starts]  # ascending, distinct
    n_ge = n - starts  # samples scoring >= each threshold
    del values

    n_pos = int(np.count_nonzero(y))
    minority_is_pos = n_pos <= n - n_pos
    minority = np.sort(s[y] if minority_is_pos else s[~y])
    per_value = np.zeros(thresholds.size, dtype=np.int64)
    if minority.size:
        m_starts = _group_starts(minority)
        m_counts = np.diff(np.append(m_starts, minority.size))
        # every minority value is one of the distinct thresholds, so searchsorted finds it exactly
        per_value[np.searchsorted(thresholds, minority[m_starts])] = m_counts
    minority_ge = np.cumsum(per_value[::-1])  # descending threshold order from here on
    n_ge = n_ge[::-1]
    if minority_is_pos:
        tps, fps = minority_ge, n_ge - minority_ge
    else:
        fps, tps = minority_ge, n_ge - minority_ge
    return thresholds[::-1].astype(np.float64), tps, fps


def _require_both_classes(n_pos: int, n_neg: int, what: str) -> None:
    if n_pos == 0 or n_neg == 0:
        missing = "positive (anomalous)" if n_pos == 0 else "negative (normal)"
        raise ValueError(f"{what} is undefined: labels contain no {missing} samples, only one class is present")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score`` (ties count one half).

    Computed exactly in integers as the Mann-Whitney statistic over groups of equal score,
    sum_g pos_g * (2 * neg_below_g + neg_g) / (2 P N), which is what the trapezoid over the tie-grouped
    ROC curve evaluates to. Any input shape is accepted (flattened). Raises ValueError if only one class
    is present.
    """
    s, y = _scores_and_labels(scores, labels)
    _, tps, fps = _binary_counts(s, y)
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    _require_both_classes(n_pos, n_neg, "AUROC")
    pos_g = np.diff(tps, prepend=0)
    neg_g = np.diff(fps, prepend=0)
    neg_below = n_neg - fps  # negatives strictly below each (descending) threshold
    numerator = int(np.dot(pos_g, 2 * neg_below + neg_g))
    return numerator / (2 * n_pos * n_neg)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) like ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.

    One point per distinct score (descending thresholds, prediction = score >= threshold), preceded by
    the point (0, 0) at threshold +inf. Raises ValueError if only one class is present (scikit-learn
    warns and returns NaN there).
    """
    s, y = _scores_and_labels(scores, labels)
    thresholds, tps, fps = _binary_counts(s, y)
    _require_both_classes(int(tps[-1]), int(fps[-1]), "the ROC curve")
    fpr = np.concatenate(([0.0], fps / fps[-1]))
    tpr = np.concatenate(([0.0], tps / tps[-1]))
    return fpr, tpr, np.concatenate(([np.inf], thresholds))


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) like ``sklearn.metrics.precision_recall_curve``.

    Thresholds are the distinct scores in ascending order; precision/recall have one extra final point
    (1, 0). Needs at least one positive label (ValueError otherwise); no negatives is fine.
    """
    s, y = _scores_and_labels(scores, labels)
    thresholds, tps, fps = _binary_counts(s, y)
    if tps[-1] == 0:
        raise ValueError("precision-recall curve is undefined: labels contain no positive (anomalous) samples")
    precision = tps / (tps + fps)  # tps + fps >= 1: every threshold is some sample's score
    recall = tps / tps[-1]
    return (
        np.concatenate((precision[::-1], [1.0])),
        np.concatenate((recall[::-1], [0.0])),
        thresholds[::-1].copy(),
    )


def f1_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """F1 of the positive class for the prediction ``score >= threshold``.

    Matches ``sklearn.metrics.f1_score``: F1 = 2 TP / (2 TP + FP + FN), and 0.0 when that is 0/0 (no
    positive label and no positive prediction). The comparison is done in float64 so a float64
    threshold is not rounded to the dtype of float32 scores.
    """
    s, y = _scores_and_labels(scores, labels)
    t = np.asarray(threshold, dtype=np.float64)
    if t.ndim != 0 or np.isnan(t):
        raise ValueError(f"threshold must be a single non-NaN number, got {threshold!r}")
    pred = s >= t  # 0-d float64 array is not a "weak" scalar: the comparison happens in float64
    n_pred = int(np.count_nonzero(pred))
    n_pos = int(np.count_nonzero(y))
    tp = int(np.count_nonzero(pred & y))
    denominator = n_pred + n_pos  # = 2 TP + FP + FN
    return 0.0 if denominator == 0 else 2.0 * tp / denominator


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(best F1 over all thresholds, a threshold achieving it).

    The threshold is one of the scores, so ``scores >= threshold`` reproduces the best F1 (also via
    :func:`f1_at_threshold`). When several thresholds tie on F1 the highest one is returned. Needs at
    least one positive label (ValueError otherwise).
    """
    s, y = _scores_and_labels(scores, labels)
    thresholds, tps, fps = _binary_counts(s, y)
    n_pos = int(tps[-1])
    if n_pos == 0:
        raise ValueError("F1-max is undefined: labels contain no positive (anomalous) samples")
    f1 = 2.0 * tps / (n_pos + tps + fps)  # 2 TP / (2 TP + FP + FN); equal ratios give equal floats
    best = int(np.argmax(f1))  # first maximum in descending-threshold order = highest threshold
    return float(f1[best]), float(thresholds[best])


# --------------------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------------------


def _aupro_inputs(
    anomaly_maps: np.ndarray, masks: np.ndarray, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """(N, H, W) maps and bool masks of one shape, and the FPR limit, checked."""
    maps = _as_scores(anomaly_maps, "anomaly_maps")
    gt = as_bool(masks, "masks")
    if maps.shape != gt.shape:
        raise ValueError(f"anomaly_maps and masks must have the same shape, got {maps.shape} and {gt.shape}")
    if maps.ndim == 2:
        maps, gt = maps[None], gt[None]
    if maps.ndim != 3:
        raise ValueError(f"anomaly_maps must be (N, H, W) or (H, W), got shape {maps.shape}")
    if maps.size == 0:
        raise ValueError("anomaly_maps is empty")
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return maps, gt, limit


def aupro(anomaly_maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the Per-Region-Overlap curve up to ``fpr_limit`` (Bergmann et al., IJCV 2021).

    For a threshold t: PRO(t) = mean over all ground-truth regions (8-connected components, per image) of
    the fraction of the region with map >= t; FPR(t) = fraction of normal pixels (mask False, pooled over
    all images) with map >= t. The curve (FPR, PRO) is integrated with the trapezoid rule from 0 to
    ``fpr_limit`` (linearly interpolated at exactly ``fpr_limit``) and divided by ``fpr_limit``.

    Exact, not sampled: the curve has a vertex at every distinct map value, equal values move together.
    Only values of normal pixels move the FPR; between two of them the curve is vertical (no area), so
    per distinct normal value v the curve runs straight from (FPR just above v, PRO(> v)) to
    (FPR(v), PRO(>= v)). PRO(>= v) is a suffix sum over anomalous pixels sorted by score, each weighing
    1 / (n_regions * |its region|). Cost: one sort of the normal pixels, one argsort of the anomalous ones.

    ``anomaly_maps`` is (N, H, W) (or a single (H, W) map), ``masks`` of the same shape, bool or 0/1.
    Returns NaN when there is no anomalous pixel at all (PRO undefined, e.g. a category's good-only
    split); raises ValueError when there is no normal pixel (FPR undefined).
    """
    maps, gt, limit = _aupro_inputs(anomaly_maps, masks, fpr_limit)
    normal = np.sort(maps[~gt])
    n_normal = normal.size
    if n_normal == 0:
        raise ValueError("AUPRO is undefined: masks have no normal (False) pixel, so FPR cannot be computed")

    regions, n_regions = ndimage.label(gt, structure=_EIGHT_CONNECTED_STACK)
    if n_regions == 0:
        return float("nan")
    region_of_pixel = regions[gt]
    del regions
    region_size = np.bincount(region_of_pixel)
    weight = 1.0 / (n_regions * region_size[region_of_pixel].astype(np.float64))
    anomalous = maps[gt]
    order = np.argsort(anomalous)
    anomalous = anomalous[order]
    # pro_suffix[i] = PRO mass of anomalous pixels at sorted positions >= i (pro_suffix[-1] = 0)
    pro_suffix = np.zeros(anomalous.size + 1, dtype=np.float64)
    np.cumsum(weight[order][::-1], out=pro_suffix[-2::-1])
    del weight, order, region_of_pixel

    starts = _group_starts(normal)[::-1]  # distinct normal values, descending
    values = normal[starts]
    fpr_hi = (n_normal - starts) / n_normal  # FPR(>= v)
    fpr_lo = np.concatenate(([0.0], fpr_hi[:-1]))  # FPR(> v)
    pro_lo = pro_suffix[np.searchsorted(anomalous, values, side="right")]  # PRO(> v)
    pro_hi = pro_suffix[np.searchsorted(anomalous, values, side="left")]  # PRO(>= v)

    # segments entirely inside [0, limit], then the one crossing it (exists: the last FPR is 1 >= limit)
    full = fpr_hi <= limit
    area = float(np.sum((fpr_hi[full] - fpr_lo[full]) * (pro_lo[full] + pro_hi[full]))) / 2.0
    crossing = np.flatnonzero(~full)
    if crossing.size:
        k = int(crossing[0])
        x0, x1, y0, y1 = fpr_lo[k], fpr_hi[k], pro_lo[k], pro_hi[k]
        y_at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_at_limit) / 2.0
    return min(max(area / limit, 0.0), 1.0)  # clip float round-off only
