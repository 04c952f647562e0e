"""Tests for distributed_anomaly.metrics: ranking metrics against scikit-learn, AUPRO against brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn import metrics as skm

from distributed_anomaly.box_metrics import box_iou, box_prf, gt_boxes_from_mask
from distributed_anomaly.metrics import (
    aupro,
    auroc,
    f1_at_threshold,
    f1_max,
    precision_recall_curve,
    roc_curve,
)

TOL = 1e-9


def _random_case(seed: int, n: int, decimals: int, pos_frac: float, dtype=np.float64):
    """Scores rounded to `decimals` (many ties, including across classes) and labels with both classes."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < pos_frac
    labels[0], labels[1] = True, False
    scores = np.round(rng.random(n) + 0.3 * labels, decimals).astype(dtype)
    return scores, labels


case_params = dict(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 300),
    decimals=st.integers(0, 3),
    pos_frac=st.floats(0.05, 0.95),
)


# ----------------------------------------------------------------------------------------------------------
# ranking metrics vs scikit-learn
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(**case_params)
def test_auroc_matches_sklearn(seed, n, decimals, pos_frac):
    scores, labels = _random_case(seed, n, decimals, pos_frac)
    assert abs(auroc(scores, labels) - skm.roc_auc_score(labels, scores)) <= TOL


@settings(max_examples=100, deadline=None)
@given(**case_params)
def test_roc_curve_matches_sklearn(seed, n, decimals, pos_frac):
    scores, labels = _random_case(seed, n, decimals, pos_frac)
    fpr, tpr, thr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    assert fpr.shape == sk_fpr.shape
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=TOL)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=TOL)
    np.testing.assert_array_equal(thr, sk_thr)


@settings(max_examples=100, deadline=None)
@given(**case_params)
def test_precision_recall_curve_matches_sklearn(seed, n, decimals, pos_frac):
    scores, labels = _random_case(seed, n, decimals, pos_frac)
    p, r, t = precision_recall_curve(scores, labels)
    sk_p, sk_r, sk_t = skm.precision_recall_curve(labels, scores)
    assert p.shape == sk_p.shape and r.shape == sk_r.shape and t.shape == sk_t.shape
    np.testing.assert_allclose(p, sk_p, rtol=0, atol=TOL)
    np.testing.assert_allclose(r, sk_r, rtol=0, atol=TOL)
    np.testing.assert_array_equal(t, sk_t)


@settings(max_examples=150, deadline=None)
@given(**case_params)
def test_f1_max_matches_sklearn_curve(seed, n, decimals, pos_frac):
    scores, labels = _random_case(seed, n, decimals, pos_frac)
    sk_p, sk_r, _ = skm.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        sk_f1 = np.where(sk_p + sk_r > 0, 2 * sk_p * sk_r / (sk_p + sk_r), 0.0)
    best, threshold = f1_max(scores, labels)
    assert abs(best - sk_f1.max()) <= TOL
    assert threshold in set(scores.tolist())
    # the returned threshold really achieves it, and no threshold does better
    assert abs(skm.f1_score(labels, scores >= threshold) - best) <= TOL
    assert abs(f1_at_threshold(scores, labels, threshold) - best) <= TOL


@settings(max_examples=150, deadline=None)
@given(**case_params, t=st.floats(-0.5, 1.5))
def test_f1_at_threshold_matches_sklearn(seed, n, decimals, pos_frac, t):
    scores, labels = _random_case(seed, n, decimals, pos_frac)
    t = float(np.round(t, decimals))  # often lands exactly on a tied score value
    expected = skm.f1_score(labels, scores >= t, zero_division=0.0)
    assert abs(f1_at_threshold(scores, labels, t) - expected) <= TOL


def test_f1_at_threshold_no_positive_anywhere_is_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = skm.f1_score([0, 0, 0], [False, False, False])
    assert f1_at_threshold(np.array([0.1, 0.2, 0.3]), np.array([0, 0, 0]), 0.9) == expected == 0.0


def test_float32_int_labels_and_maps():
    """float32 pixel maps of any shape with 0/1 integer labels give the same result as float64 flat."""
    rng = np.random.default_rng(7)
    maps = np.round(rng.random((4, 16, 16)), 2).astype(np.float32)
    masks = (rng.random((4, 16, 16)) < 0.2).astype(np.uint8)
    ref = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(auroc(maps, masks) - ref) <= TOL
    assert auroc(maps, masks) == auroc(maps.ravel().astype(np.float64), masks.ravel().astype(bool))
    best, thr = f1_max(maps, masks)
    assert abs(f1_at_threshold(maps, masks, thr) - best) <= TOL
    assert abs(skm.f1_score(masks.ravel(), maps.ravel() >= thr) - best) <= TOL


def test_f1_at_threshold_compares_in_float64():
    scores = np.array([0.1, 0.3, 0.7], dtype=np.float32)
    labels = np.array([0, 1, 1])
    t = float(np.float32(0.3)) + 1e-12  # rounds back to float32(0.3), but is above it
    assert f1_at_threshold(scores, labels, t) == skm.f1_score(labels, scores.astype(np.float64) >= t)


def test_auroc_large_with_ties():
    rng = np.random.default_rng(3)
    labels = rng.random(200_000) < 0.1
    scores = np.round(rng.normal(size=labels.size) + labels, 1).astype(np.float32)
    assert abs(auroc(scores, labels) - skm.roc_auc_score(labels, scores)) <= TOL


def test_auroc_known_values():
    assert auroc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.4, 0.3, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert auroc(np.array([3, 1, 2, 2]), np.array([1, 0, 1, 0])) == pytest.approx(0.875)


@pytest.mark.parametrize("labels", [np.zeros(5), np.ones(5, dtype=bool)])
def test_single_class_raises(labels):
    scores = np.linspace(0, 1, 5)
    with pytest.raises(ValueError, match="one class"):
        auroc(scores, labels)
    with pytest.raises(ValueError, match="one class"):
        roc_curve(scores, labels)


def test_pr_and_f1_max_need_positives_but_not_negatives():
    with pytest.raises(ValueError, match="no positive"):
        precision_recall_curve(np.arange(3.0), np.zeros(3))
    with pytest.raises(ValueError, match="no positive"):
        f1_max(np.arange(3.0), np.zeros(3))
    assert f1_max(np.arange(3.0), np.ones(3)) == (1.0, 0.0)


def test_input_validation():
    with pytest.raises(ValueError, match="same shape"):
        auroc(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="only 0 and 1"):
        auroc(np.arange(3.0), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="empty"):
        auroc(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="threshold"):
        f1_at_threshold(np.arange(2.0), np.array([0, 1]), float("nan"))


# ----------------------------------------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------------------------------------


def naive_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Brute force: every distinct map value as a threshold, PRO per component by direct counting."""
    components = []
    for i in range(maps.shape[0]):
        lab, k = ndimage.label(masks[i], structure=np.ones((3, 3)))
        components += [(i, lab == c) for c in range(1, k + 1)]
    normal = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        ys.append(np.mean([np.mean(maps[i][comp] >= t) for i, comp in components]))
        xs.append(np.mean(normal >= t))
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < fpr_limit:
                y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
                area += (fpr_limit - x0) * (y0 + y_lim) / 2
            break
    return area / fpr_limit


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 3),
    h=st.integers(1, 7),
    w=st.integers(2, 7),  # >= 2 pixels: one forced anomalous, one forced normal
    levels=st.integers(1, 8),
    anomalous_frac=st.floats(0.05, 0.7),
    fpr_limit=st.one_of(st.sampled_from([0.05, 0.3, 0.5, 1.0]), st.floats(0.01, 1.0)),
)
def test_aupro_matches_naive(seed, n, h, w, levels, anomalous_frac, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = rng.random((n, h, w)) < anomalous_frac
    masks.flat[0] = True
    masks.flat[-1] = False
    maps = (rng.integers(0, levels + 1, size=masks.shape) + masks * rng.integers(0, 3, size=masks.shape)) / levels
    assert abs(aupro(maps, masks, fpr_limit) - naive_aupro(maps, masks, fpr_limit)) <= TOL


def test_aupro_hand_worked_two_regions():
    # regions {0.9} and {0.5}; normal pixels 0.8, 0.1.
    # curve (0,0) -> (0,.5) -> (.5,.5) -> (.5,1) -> (1,1)
    maps = np.array([[[0.9, 0.8, 0.1, 0.5]]])
    masks = np.array([[[1, 0, 0, 1]]], dtype=bool)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.5, abs=1e-12)


def test_aupro_hand_worked_tie_and_interpolation():
    # one region {0.7}; normal pixels 0.7 (tied with it), 0.1, 0.1 -> diagonal (0,0) -> (1/3, 1) -> (1,1)
    maps = np.array([[0.7, 0.7, 0.1, 0.1]], dtype=np.float32)
    masks = np.array([[1, 0, 0, 0]])
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(5 / 6, abs=1e-12)
    # at FPR 0.3 the diagonal is at PRO 0.9: area 0.3 * (0 + 0.9) / 2 = 0.135 -> / 0.3
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.45, abs=1e-12)


def test_aupro_uses_8_connectivity_and_per_region_mean():
    # anomalous: (0,0)=.9 and (1,1)=.1 touch diagonally -> one region half covered at t=.9;
    # (0,3)=.9 alone -> fully covered. PRO = (1/2 + 1)/2 = .75 at every FPR (all normal pixels are 0.5).
    # Under 4-connectivity it would be (1 + 0 + 1)/3.
    maps = np.array([[[0.9, 0.5, 0.5, 0.9], [0.5, 0.1, 0.5, 0.5]]])
    masks = np.array([[[1, 0, 0, 1], [0, 1, 0, 0]]], dtype=bool)
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.75, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75, abs=1e-12)


def test_aupro_regions_do_not_connect_across_images():
    # image 0: region of 2 pixels (both .9); image 1: 1-pixel region (.2) at the same position.
    # Per image: 2 regions, PRO(.9) = (1 + 0)/2 = .5. Linked across images it would be one region, 2/3.
    # normal pixels .5, 0, 0: curve (0,0) -> (0,.5) -> (1/3,.5) -> (1/3,1) -> (1,1)
    maps = np.array([[[0.9, 0.9, 0.5]], [[0.2, 0.0, 0.0]]])
    masks = np.array([[[1, 1, 0]], [[1, 0, 0]]], dtype=bool)
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.5, abs=1e-12)


def test_aupro_perfect_and_edge_cases():
    maps = np.zeros((2, 8, 8))
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:5] = True
    masks[1, 6, 6] = True
    maps[masks] = 1.0
    assert aupro(maps, masks) == 1.0
    assert aupro(1.0 - maps, masks) == 0.0
    assert np.isnan(aupro(maps, np.zeros_like(masks)))
    with pytest.raises(ValueError, match="no normal"):
        aupro(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match="same shape"):
        aupro(maps, masks[:1])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        aupro(maps[None], masks[None])


# ----------------------------------------------------------------------------------------------------------
# boxes
# ----------------------------------------------------------------------------------------------------------


def test_gt_boxes_two_blobs():
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:3, 1:4] = True  # x 1..3, y 1..2
    mask[4:6, 6:8] = True  # x 6..7, y 4..5
    np.testing.assert_array_equal(gt_boxes_from_mask(mask), [[1, 1, 4, 3], [6, 4, 8, 6]])


def test_gt_boxes_diagonal_touch_is_one_component():
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = 1
    boxes = gt_boxes_from_mask(mask)
    np.testing.assert_array_equal(boxes, [[0, 0, 3, 3]])
    assert boxes.dtype == np.int64


def test_gt_boxes_single_pixel_and_empty():
    mask = np.zeros((5, 5), dtype=bool)
    mask[3, 2] = True
    np.testing.assert_array_equal(gt_boxes_from_mask(mask), [[2, 3, 3, 4]])
    empty = gt_boxes_from_mask(np.zeros((5, 5), dtype=bool))
    assert empty.shape == (0, 4)
    with pytest.raises(ValueError):
        gt_boxes_from_mask(np.zeros((2, 5, 5), dtype=bool))


def test_box_iou_known_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 2]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 10]])
    expected = np.array([[1.0, 50 / 150, 0.0, 0.5], [4 / 100, 0.0, 0.0, 4 / 50]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 4)
    np.testing.assert_allclose(iou, expected, rtol=0, atol=1e-12)
    # touching edges (exclusive x2) do not overlap; degenerate boxes give 0, not NaN
    assert box_iou([[0, 0, 5, 5]], [[5, 0, 10, 5]])[0, 0] == 0.0
    assert box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0, 0] == 0.0
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)
    with pytest.raises(ValueError):
        box_iou(np.zeros((2, 3)), b)


def _pred(*boxes_with_scores):
    return np.array(boxes_with_scores, dtype=np.float64).reshape(-1, 5)


def test_box_prf_perfect_match():
    gt = [np.array([[0, 0, 10, 10]]), np.array([[5, 5, 8, 8], [20, 20, 30, 30]])]
    pred = [_pred([0, 0, 10, 10, 0.9]), _pred([20, 20, 30, 30, 0.8], [5, 5, 8, 8, 0.7])]
    assert box_prf(pred, gt) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 3, "fp": 0, "fn": 0}


def test_box_prf_one_false_positive():
    gt = [np.array([[0, 0, 10, 10]])]
    pred = [_pred([0, 0, 10, 10, 0.9], [40, 40, 50, 50, 0.95])]
    r = box_prf(pred, gt)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)
    assert r["precision"] == 0.5 and r["recall"] == 1.0 and r["f1"] == pytest.approx(2 / 3)


def test_box_prf_one_miss():
    gt = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.zeros((0, 4))]
    pred = [_pred([0, 0, 10, 10, 0.9]), np.zeros((0, 5))]
    r = box_prf(pred, gt)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 1)
    assert r["precision"] == 1.0 and r["recall"] == 0.5


def test_box_prf_iou_just_below_threshold():
    gt = [np.array([[0, 0, 10, 10]])]
    # [0,0,10,x2] with x2 < 10: IoU = x2/10; x2=4.99 -> 0.499 (miss), x2=5 -> exactly 0.5 (hit)
    below = box_prf([_pred([0, 0, 4.99, 10, 1.0])], gt)
    assert (below["tp"], below["fp"], below["fn"]) == (0, 1, 1)
    assert below["precision"] == below["recall"] == below["f1"] == 0.0
    at = box_prf([_pred([0, 0, 5, 10, 1.0])], gt)
    assert (at["tp"], at["fp"], at["fn"]) == (1, 0, 0)


def test_box_prf_duplicates_on_one_gt():
    gt = [np.array([[0, 0, 10, 10]])]
    pred = [_pred([0, 0, 10, 10, 0.6], [0, 0, 10, 9, 0.8])]
    r = box_prf(pred, gt)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)


def test_box_prf_greedy_by_score_takes_best_unmatched_gt():
    # the high-score prediction passes 0.5 with both GTs (0.54 with gt 0, 0.82 with gt 1) and must take
    # gt 1; the lower one then finds gt 0. Taking the first GT above threshold would leave it an FP (IoU 0.43).
    gt = [np.array([[0, 0, 10, 10], [4, 0, 14, 10]])]
    pred = [_pred([0, 0, 10, 10, 0.1], [3, 0, 13, 10, 0.9])]
    r = box_prf(pred, gt)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 0)


def test_box_prf_empty_conventions():
    nothing = box_prf([np.zeros((0, 5))], [np.zeros((0, 4))])
    assert nothing == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "fp": 0, "fn": 0}
    missed = box_prf([np.zeros((0, 5))], [np.array([[0, 0, 1, 1]])])
    assert (missed["precision"], missed["recall"], missed["f1"]) == (0.0, 0.0, 0.0)
    false_alarm = box_prf([_pred([0, 0, 1, 1, 0.5])], [np.zeros((0, 4))])
    assert (false_alarm["precision"], false_alarm["recall"], false_alarm["f1"]) == (0.0, 0.0, 0.0)
    assert box_prf([], []) == nothing
    with pytest.raises(ValueError, match="same images"):
        box_prf([np.zeros((0, 5))], [])
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        box_prf([np.zeros((1, 4))], [np.zeros((0, 4))])
