"""A torch module (PADIM, STFPM or PatchCore) as a runner.ModelRunner: `predict` on a run folder and the parity
checks of the export score through the same `runner.predict_images` as the OpenVINO runtimes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from distributed_anomaly import rundir
from distributed_anomaly.data.sizes import ImageSize, canonical
from distributed_anomaly.postprocess import PostProcessor, Prediction
from distributed_anomaly.runner import predict_images


class TorchRunner:
    """A torch module as a ModelRunner: raw_maps takes the normalised batch as numpy or as a tensor."""

    def __init__(self, model: torch.nn.Module, postprocessor: PostProcessor, image_size: ImageSize) -> None:
        self.model = model.eval()
        self.postprocessor = postprocessor
        self.image_size = canonical(image_size)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike) -> TorchRunner:
        cfg, model, post = rundir.load_model(run_dir)
        return cls(model, post, cfg.image_size)

    def raw_maps(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch
        with torch.inference_mode():
            return self.model(x)[:, 0].numpy()


def predict_arrays(
    model: torch.nn.Module, post: PostProcessor, images: Sequence[np.ndarray], image_size: ImageSize
) -> list[Prediction]:
    """Torch predictions in each image's own coordinates (see runner.predict_images)."""
    return predict_images(TorchRunner(model, post, image_size), images)
