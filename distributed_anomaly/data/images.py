"""Decoding images and masks into one canonical form (RGB uint8, bool masks), and the tensor transform.

Users bring grayscale, RGBA, palette and 16-bit images of mixed sizes; everything downstream sees RGB
uint8 so that every runtime (torch, OpenVINO, Serve) preprocesses identically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from distributed_anomaly.data.sizes import ImageSize, as_hw
from distributed_anomaly.errors import ImageReadError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to RGB uint8; 16-bit and float images are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode == "I" and arr.max() <= 255:
            hi = 255.0
        arr = np.clip(np.round(arr / hi * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        # Composite on black: transparent regions carry no information about the part.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _open(source: str | os.PathLike | bytes) -> Image.Image:
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else name)
        img.load()  # force a full decode so truncated files fail here, not later
        return img
    except FileNotFoundError as exc:
        raise ImageReadError(f"image file not found: {name}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot decode image {name}: {exc}") from exc


def read_image(source: str | os.PathLike | bytes) -> np.ndarray:
    """Decode a file path or encoded bytes to an (H, W, 3) uint8 RGB array."""
    img = _open(source)
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        return _to_rgb_uint8(img)
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"cannot decode image {source!r}: {exc}") from exc


def image_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) from the header alone, without decoding pixels."""
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageReadError(f"cannot decode image {os.fspath(path)}: {exc}") from exc


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a ground-truth mask to an (H, W) bool array: any non-zero pixel is anomalous."""
    img = _open(path)
    arr = np.asarray(img.convert("L") if img.mode not in ("I;16", "I", "F", "1", "L") else img)
    return arr > 0


def to_tensor(images: np.ndarray | Sequence[np.ndarray], image_size: ImageSize) -> torch.Tensor:
    """RGB uint8 image(s) -> (B, 3, H, W) float32, resized (bilinear, antialiased) and ImageNet-normalised.

    Resizing to H x W with no crop follows anomalib's default, so results compare like for like.
    """
    hw = as_hw(image_size)
    batch = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
    out = torch.empty((len(batch), 3, *hw), dtype=torch.float32)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i, img in enumerate(batch):
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
        if t.shape[1:] != hw:
            t = F.interpolate(t[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
        out[i] = (t - mean) / std
    return out


def resize_mask(mask: np.ndarray, image_size: ImageSize) -> np.ndarray:
    """Resize a bool mask to H x W with nearest neighbour, so pixel metrics compare at model resolution."""
    hw = as_hw(image_size)
    if mask.shape == hw:
        return mask
    t = torch.from_numpy(mask.astype(np.uint8))[None, None].float()
    return F.interpolate(t, size=hw, mode="nearest")[0, 0].numpy() > 0.5


def decode_batch(batch: dict[str, np.ndarray], image_size: ImageSize) -> dict[str, np.ndarray]:
    """A batch of paths -> normalised (B, 3, H, W) float32 pixels, one row each: a file that cannot be read
    becomes an error row (ok False, its message in error) instead of failing the batch. The decode step of the
    Ray Data pipelines (distributed/), kept here, away from torchvision and Ray, so their decode workers start fast."""
    paths = [str(p) for p in batch["path"]]
    ok = np.zeros(len(paths), dtype=bool)
    errors = [""] * len(paths)
    images = []
    for i, path in enumerate(paths):
        try:
            images.append(read_image(path))
            ok[i] = True
        except ImageReadError as exc:
            errors[i] = str(exc)
        except Exception as exc:  # e.g. PIL's DecompressionBombError: still one bad file, named
            errors[i] = f"cannot decode image {path}: {type(exc).__name__}: {exc}"
    pixels = np.zeros((len(paths), 3, *as_hw(image_size)), dtype=np.float32)
    if images:
        pixels[ok] = to_tensor(images, image_size).numpy()
    return {
        "idx": np.asarray(batch["idx"], dtype=np.int64),
        "pixels": pixels,
        "ok": ok,
        "error": np.asarray(errors, dtype=str),
    }
