"""A search's ranking: trials that tie on the objective go by inference cost (models.cost), cheapest first."""

from __future__ import annotations

import pytest

from distributed_anomaly import rundir
from distributed_anomaly.config import ModelConfig
from distributed_anomaly.models.cost import inference_gflops
from distributed_anomaly.tuning import results as R


def test_ties_on_the_objective_are_ranked_by_inference_cost() -> None:
    rows = [
        {"trial": "a", "status": "completed", "objective": 1.0, "inference_gflops": 2.5},
        {"trial": "b", "status": "completed", "objective": 0.9, "inference_gflops": 0.1},
        {"trial": "c", "status": "completed", "objective": 0.99996, "inference_gflops": 0.4},  # 1.0000 shown: a tie
        {"trial": "d", "status": "completed", "objective": 1.0},  # cost unknown: after the tied ones that have one
        {"trial": "e", "status": "completed", "objective": 1.0, "inference_gflops": 1.2},
        {"trial": "f", "status": "pruned", "objective": 1.0, "inference_gflops": 0.01},
    ]
    table = R.sort_rows(rows)
    assert [r["trial"] for r in table] == ["c", "e", "a", "d", "b", "f"]
    assert [r["rank"] for r in table] == [1, 2, 3, 4, 5, 6]
    assert "inference_gflops" in R.COLUMNS and "inference_gflops" in R.format_table(table, "val_auroc")


def test_inference_cost_is_a_deterministic_function_of_the_configuration() -> None:
    def gflops(layers: tuple[str, ...], size: int) -> float:
        cfg = ModelConfig("padim", "resnet18", layers, 20, size)
        return inference_gflops(rundir.build_model(cfg, pretrained=False), size)

    small = gflops(("layer1", "layer2"), 64)
    # resnet18 up to layer2 at 64 px (convolutions, 0.16187392) + 20x20 Mahalanobis products over 16x16
    # positions (0.0002048) + the map's upsampling and blur as two matrix products (0.00016384)
    assert small == pytest.approx(0.16224256, abs=1e-9)
    assert gflops(("layer1", "layer2"), 64) == small
    assert gflops(("layer1", "layer2"), 128) == pytest.approx(4 * small, rel=1e-2)  # about 4x the pixels
    assert gflops(("layer1", "layer2", "layer3"), 64) > small  # one more stage of the backbone
