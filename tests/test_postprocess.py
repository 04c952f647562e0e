"""Thresholds, normalisation, masks and boxes: the one post-processing every runtime shares."""

from __future__ import annotations

import numpy as np
import pytest

from distributed_anomaly.postprocess import (
    PostProcessor,
    boxes_from_mask,
    fit_postprocessor,
    no_threshold_postprocessor,
    remove_small_regions,
)


def test_boxes_from_hand_made_mask() -> None:
    mask = np.zeros((10, 12), bool)
    mask[1:3, 1:4] = True  # component A: x 1..3, y 1..2
    mask[6:9, 8:12] = True  # component B
    mask[3, 4] = True  # touches A diagonally: same component under 8-connectivity
    values = np.zeros((10, 12))
    values[2, 2] = 0.7
    values[7, 9] = 0.9
    boxes = boxes_from_mask(mask, values)
    np.testing.assert_array_equal(boxes, [[8, 6, 12, 9, 0.9], [1, 1, 5, 4, 0.7]])  # sorted by score
    assert boxes_from_mask(np.zeros((4, 4), bool), np.zeros((4, 4))).shape == (0, 5)


def test_remove_small_regions() -> None:
    mask = np.zeros((10, 10), bool)
    mask[0, 0] = True
    mask[5:8, 5:8] = True
    out = remove_small_regions(mask, 4)
    assert not out[0, 0] and out[5:8, 5:8].all() and out.sum() == 9


def test_normal_only_calibration_uses_three_sigma_and_same_pixel_threshold() -> None:
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    maps = np.random.default_rng(0).uniform(0, 4, size=(4, 8, 8))
    post = fit_postprocessor(scores, np.zeros(4, bool), maps)
    expected = scores.mean() + 3 * scores.std(ddof=1)
    assert post.threshold_source == "normal_3sigma"
    assert post.image_threshold == pytest.approx(expected) and post.pixel_threshold == post.image_threshold
    assert (post.norm_min, post.norm_max) == (float(maps.min()), float(maps.max()))


def test_labelled_calibration_is_f1_optimal() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1], bool)
    maps = np.zeros((5, 4, 4))
    masks = np.zeros((5, 4, 4), bool)
    maps[3:, 0, 0] = 5.0
    masks[3:, 0, 0] = True
    post = fit_postprocessor(scores, labels, maps, masks)
    assert post.threshold_source == "f1_optimal"
    assert post.image_threshold == pytest.approx(0.8) and post.pixel_threshold == pytest.approx(5.0)


def test_user_threshold_wins() -> None:
    post = fit_postprocessor(np.array([1.0, 2.0]), np.zeros(2, bool), np.ones((2, 2, 2)), user_threshold=7.0)
    assert (post.image_threshold, post.pixel_threshold, post.threshold_source) == (7.0, 7.0, "user")


def test_prediction_threshold_maps_to_half_and_labels_agree_with_masks() -> None:
    post = PostProcessor(
        image_threshold=2.0,
        pixel_threshold=2.0,
        norm_min=0.0,
        norm_max=4.0,
        threshold_source="user",
        min_region_fraction=0.0,
    )
    raw = np.zeros((16, 16), np.float32)
    raw[4:8, 4:8] = 3.0
    pred = post(raw)
    assert pred.raw_score == 3.0 and pred.score == pytest.approx(0.75) and pred.label == 1
    assert pred.anomaly_map[0, 0] == pytest.approx(0.0) and pred.anomaly_map[5, 5] == pytest.approx(0.75)
    assert pred.mask.sum() == 16 and pred.boxes.tolist() == [[4, 4, 8, 8, 0.75]]
    at = post(np.full((4, 4), 2.0, np.float32))
    assert at.score == pytest.approx(0.5) and at.label == 1
    below = post(np.ones((16, 16), np.float32))
    assert below.label == 0 and not below.mask.any() and len(below.boxes) == 0
    assert post(np.full((4, 4), 100.0, np.float32)).score == 1.0  # clipped


def test_without_threshold_only_normalises() -> None:
    post = no_threshold_postprocessor(np.array([[[0.0, 10.0]]]))
    pred = post(np.array([[5.0]], np.float32))
    assert pred.label is None and pred.mask is None and pred.score == pytest.approx(0.5)
    assert pred.to_json("detection")["boxes"] == [] and pred.to_json("classification").keys() >= {"score", "label"}


def test_round_trip_dict() -> None:
    post = fit_postprocessor(np.array([1.0, 2.0, 3.0]), np.zeros(3, bool), np.ones((3, 2, 2)))
    assert PostProcessor.from_dict(post.to_dict()) == post


def test_normal_only_masks_keep_the_core_of_the_response() -> None:
    post = fit_postprocessor(np.array([1.0, 1.2, 0.8]), np.zeros(3, bool), np.ones((3, 4, 4)))
    assert post.mask_peak_fraction == pytest.approx(0.7)
    post.min_region_fraction = 0.0
    raw = np.zeros((9, 9), np.float32)
    raw[2:7, 2:7] = 5.0  # broad shoulder above the threshold ...
    raw[4, 4] = 10.0  # ... around a sharp peak
    pred = post(raw)
    assert pred.label == 1 and pred.mask.sum() == 1 and pred.boxes[:, :4].tolist() == [[4, 4, 5, 5]]
    labelled = fit_postprocessor(np.array([0.1, 0.9]), np.array([0, 1], bool), np.ones((2, 4, 4)))
    assert labelled.mask_peak_fraction == 0.0  # F1-optimal thresholds already say where to cut


def test_scored_once_answers_each_split_from_one_pass() -> None:
    """Calibration and test maps from one scoring pass (one Ray pool start): each path scored once, any subset
    answered in its own order, an unscored record refused."""
    from distributed_anomaly.calibration import scored_once
    from distributed_anomaly.data.mvtec import Record

    records = [Record(f"/img/{i}.png", "test", i % 2, "good", "c") for i in range(5)]
    calls = []

    def score(recs, what):
        calls.append(([r.path for r in recs], what))
        return np.stack([np.full((2, 2), float(r.path[5]), np.float32) for r in recs])

    answer = scored_once(score, [*records[:2], *records[1:]])  # records[1] in both splits: scored once
    assert calls == [([r.path for r in records], "score")]
    assert answer([records[3], records[0]], "evaluate")[:, 0, 0].tolist() == [3.0, 0.0]
    in_order = answer(records[1:4], "evaluate")
    assert in_order[:, 0, 0].tolist() == [1.0, 2.0, 3.0] and in_order.base is not None  # a view of the pass
    assert answer([], "evaluate").shape == (0, 2, 2)
    with pytest.raises(KeyError, match="/img/9.png"):
        answer([Record("/img/9.png", "test", 0, "good", "c")], "evaluate")
    assert len(calls) == 1
