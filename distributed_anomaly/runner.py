"""The runtime-independent prediction core: a model runner gives raw maps, post-processing does the rest.

Every runtime (a torch module, an OpenVINO IR, a Serve replica) scores through `predict_images`, so the
three never disagree on pre-processing, resizing or post-processing. Torch-free (numpy and Pillow): Serve's
replicas and the `score` actors, which run OpenVINO, start without loading torch (torch_runner.TorchRunner is
the torch module as a runner).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from distributed_anomaly.data.decode import normalise
from distributed_anomaly.data.sizes import ImageSize
from distributed_anomaly.postprocess import PostProcessor, Prediction


def _axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of one axis, as torch's bilinear interpolate(align_corners=False) takes them."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)


def resize_map(raw_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a model-resolution (H, W) float32 map to `shape` (an image's size): torch's
    interpolate(mode="bilinear", align_corners=False) within float32 rounding (tests/test_runner.py).

    Enlarging (the usual case: a photo larger than the model) runs in Pillow's resampler, which computes the same
    weights there and is fast on multi-megapixel outputs; Pillow antialiases when shrinking, torch does not, so a
    map shrunk on either axis is interpolated here with torch's formula (its output is small)."""
    shape = (int(shape[0]), int(shape[1]))
    if raw_map.shape == shape:
        return raw_map
    m = np.ascontiguousarray(raw_map, dtype=np.float32)
    if shape[0] >= m.shape[0] and shape[1] >= m.shape[1]:
        return np.asarray(Image.fromarray(m, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
    y0, y1, wy = _axis(m.shape[0], shape[0])
    x0, x1, wx = _axis(m.shape[1], shape[1])
    rows = m[y0] + (m[y1] - m[y0]) * wy[:, None]
    return rows[:, x0] + (rows[:, x1] - rows[:, x0]) * wx


@runtime_checkable
class ModelRunner(Protocol):
    """What scoring needs from a runtime (torch module, OpenVINO IR, ...); post-processing is shared.

    `raw_maps` takes the (B, 3, H, W) float32 ImageNet-normalised batch of `data.decode.normalise` (a numpy
    array) and returns the (B, H, W) float32 raw anomaly maps (`image_size`: S for S x S, or (H, W)).
    """

    image_size: ImageSize
    postprocessor: PostProcessor

    def raw_maps(self, batch: np.ndarray) -> np.ndarray: ...


def predict_images(
    runner: ModelRunner,
    images: Sequence[np.ndarray],
    shapes: Sequence[tuple[int, int]] | None = None,
    postprocessors: Sequence[PostProcessor] | None = None,
) -> list[Prediction]:
    """The one scoring path of every runtime: normalise -> raw maps -> resize to each image -> post-process.

    Predictions are in each image's own coordinates (maps resized back before masks and boxes): `shapes`
    gives each image's (H, W) when its pixels were decoded smaller (data.images.load_image), else its shape.
    `postprocessors` (one per image) replace the runner's, e.g. Serve's live or per-request thresholds.
    """
    if len(images) == 0:
        return []
    sizes = [tuple(s) for s in shapes] if shapes is not None else [img.shape[:2] for img in images]
    posts = list(postprocessors) if postprocessors is not None else [runner.postprocessor] * len(images)
    maps = runner.raw_maps(normalise(list(images), runner.image_size))
    return [post(resize_map(m, size)) for m, size, post in zip(maps, sizes, posts)]
