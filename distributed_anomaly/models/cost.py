"""What a model costs at inference: floating-point operations of one image's forward pass.

Counted by torch's FlopCounterMode on a blank image at the model's input size (convolutions, matrix products:
PADIM's Mahalanobis distances and PatchCore's nearest-neighbour search included), so it depends on the
configuration — backbone, taps, n_features, image size; for PatchCore also its bank's size, which the coreset
ratio and the number of training patches set — never on the weights' values, the machine or its load. A
search ranks trials that tie on its objective by it (tuning.results.sort_rows): of two equally good models,
the cheaper one is served.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from distributed_anomaly.data.sizes import ImageSize, as_hw


def inference_gflops(model: torch.nn.Module, image_size: ImageSize) -> float:
    """GFLOPs (1e9 floating-point operations; a multiply-add counts 2) of `model` on one image."""
    height, width = as_hw(image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, height, width))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
