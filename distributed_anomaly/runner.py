"""The runtime-independent prediction core: a model runner gives raw maps, post-processing does the rest.

Every runtime (a torch module, an OpenVINO IR, a Serve replica) scores through `predict_images`, so the
three never disagree on pre-processing, resizing or post-processing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from distributed_anomaly import rundir
from distributed_anomaly.data.images import to_tensor
from distributed_anomaly.data.sizes import ImageSize, canonical
from distributed_anomaly.postprocess import PostProcessor, Prediction


def resize_map(raw_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a model-resolution map back to the original image size."""
    if raw_map.shape == shape:
        return raw_map
    t = torch.from_numpy(np.ascontiguousarray(raw_map))[None, None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


@runtime_checkable
class ModelRunner(Protocol):
    """What scoring needs from a runtime (torch module, OpenVINO IR, ...); post-processing is shared.

    `raw_maps` takes the (B, 3, H, W) float32 ImageNet-normalised batch of `data.images.to_tensor` and
    returns the (B, H, W) float32 raw anomaly maps (`image_size`: S for S x S, or (H, W)).
    """

    image_size: ImageSize
    postprocessor: PostProcessor

    def raw_maps(self, batch: torch.Tensor) -> np.ndarray: ...


class TorchRunner:
    """A torch module (PADIM or STFPM) as a ModelRunner."""

    def __init__(self, model: torch.nn.Module, postprocessor: PostProcessor, image_size: ImageSize) -> None:
        self.model = model.eval()
        self.postprocessor = postprocessor
        self.image_size = canonical(image_size)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike) -> TorchRunner:
        cfg, model, post = rundir.load_model(run_dir)
        return cls(model, post, cfg.image_size)

    def raw_maps(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.model(batch)[:, 0].numpy()


def predict_images(
    runner: ModelRunner,
    images: Sequence[np.ndarray],
    shapes: Sequence[tuple[int, int]] | None = None,
    postprocessors: Sequence[PostProcessor] | None = None,
) -> list[Prediction]:
    """The one scoring path of every runtime: to_tensor -> raw maps -> resize to each image -> post-process.

    Predictions are in each image's own coordinates (maps resized back before masks and boxes): `shapes`
    gives each image's (H, W) when its pixels were decoded smaller (data.images.load_image), else its shape.
    `postprocessors` (one per image) replace the runner's, e.g. Serve's live or per-request thresholds.
    """
    if len(images) == 0:
        return []
    sizes = [tuple(s) for s in shapes] if shapes is not None else [img.shape[:2] for img in images]
    posts = list(postprocessors) if postprocessors is not None else [runner.postprocessor] * len(images)
    maps = runner.raw_maps(to_tensor(list(images), runner.image_size))
    return [post(resize_map(m, size)) for m, size, post in zip(maps, sizes, posts)]


def predict_arrays(
    model: torch.nn.Module, post: PostProcessor, images: Sequence[np.ndarray], image_size: ImageSize
) -> list[Prediction]:
    """Torch predictions in each image's own coordinates (see predict_images)."""
    return predict_images(TorchRunner(model, post, image_size), images)
