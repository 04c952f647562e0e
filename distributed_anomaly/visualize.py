"""Pictures of predictions: the jet heatmap, mask outlines, and the side-by-side overlay `predict` writes."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy import ndimage

from distributed_anomaly.postprocess import Prediction

_JET = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def heatmap_rgb(norm_map: np.ndarray) -> np.ndarray:
    """A [0, 1] map as a jet-coloured uint8 RGB image."""
    return _JET[np.clip((norm_map * 255).round(), 0, 255).astype(np.uint8)]


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask (no new values at the edges)."""
    if mask.shape == shape:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(img) > 127


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The border pixels of a mask's regions, `width` pixels thick."""
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def render_overlay(image: np.ndarray, pred: Prediction, task: str) -> Image.Image:
    """Image | heatmap blend with mask outline and boxes, side by side."""
    # Integer blend (the mean, rounded down): no float64 copy of a large image.
    heat = ((image.astype(np.uint16) + heatmap_rgb(pred.anomaly_map)) // 2).astype(np.uint8)
    if task == "segmentation" and pred.mask is not None and pred.mask.any():
        heat[outline(pred.mask, max(1, image.shape[0] // 256))] = (255, 255, 255)
    right = Image.fromarray(heat)
    if task in ("detection", "segmentation"):
        draw = ImageDraw.Draw(right)
        for x1, y1, x2, y2, s in pred.boxes:
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(255, 0, 0), width=max(1, image.shape[0] // 200))
            draw.text((x1 + 2, y1 + 1), f"{s:.2f}", fill=(255, 0, 0))
    canvas = Image.new("RGB", (image.shape[1] * 2, image.shape[0]))
    canvas.paste(Image.fromarray(image), (0, 0))
    canvas.paste(right, (image.shape[1], 0))
    return canvas
