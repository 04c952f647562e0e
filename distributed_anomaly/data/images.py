"""The image reader (data.decode) as the torch tensors the in-process paths take, and masks at model size.

Decoding and the model-input transform live in the torch-free data.decode (a Ray pool actor on OpenVINO uses it
without loading torch); this module re-exports them beside the two torch helpers, so callers import from one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distributed_anomaly.data.decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_batch,
    image_shape,
    is_image_file,
    load_image,
    normalise,
    read_image,
    read_mask,
    shrink_to,
)
from distributed_anomaly.data.sizes import ImageSize, as_hw

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "decode_batch",
    "image_shape",
    "is_image_file",
    "load_image",
    "normalise",
    "read_image",
    "read_mask",
    "resize_mask",
    "shrink_to",
    "to_tensor",
]


def to_tensor(images: np.ndarray | Sequence[np.ndarray], image_size: ImageSize) -> torch.Tensor:
    """RGB uint8 image(s) -> (B, 3, H, W) float32 tensor: data.decode.normalise, shared without a copy."""
    return torch.from_numpy(normalise(images, image_size))


def resize_mask(mask: np.ndarray, image_size: ImageSize) -> np.ndarray:
    """Resize a bool mask to H x W with nearest neighbour, so pixel metrics compare at model resolution."""
    hw = as_hw(image_size)
    if mask.shape == hw:
        return mask
    t = torch.from_numpy(mask.astype(np.uint8))[None, None].float()
    return F.interpolate(t, size=hw, mode="nearest")[0, 0].numpy() > 0.5
