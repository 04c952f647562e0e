"""Decoding images and masks into one canonical form (RGB uint8, bool masks), and the model-input transform.

Users bring grayscale, RGBA, palette and 16-bit images of mixed sizes; everything downstream sees RGB
uint8 so that every runtime (torch, OpenVINO, Serve) preprocesses identically. Torch-free (numpy and Pillow
only): a Ray pool actor that runs the frozen network on OpenVINO decodes with this module without loading torch
(tests/test_node_runtime.py); data.images wraps `normalise` as the torch tensor the in-process paths use.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from distributed_anomaly.data.limits import READ_FORMATS, max_pixels_setting
from distributed_anomaly.data.sizes import ImageSize, as_hw
from distributed_anomaly.errors import ImageReadError, ImageTooLargeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Our own limit (check_pixels, on every image read here) replaces the warning Pillow prints above ~89 MP. Set once
# at import: warnings.catch_warnings per call is not thread-safe, and the loader and Serve decode in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module="PIL.Image")
ACCEPTED = "PNG, JPEG, BMP, TIFF or WebP"
DRAFT_MARGIN = 2  # a reduced-scale JPEG decode keeps at least twice the model's side, for the antialiased resize
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


_ROW_BLOCK = 512  # rows rescaled at a time: 16-bit and float images never get a full-size float64 copy


def _scaled_grey(img: Image.Image) -> np.ndarray:
    """16-bit, 32-bit and float grey -> uint8, rescaled (not clipped) block by block."""
    arr = np.asarray(img)
    hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
    if img.mode == "I" and arr.max() <= 255:
        hi = 255.0
    out = np.empty(arr.shape, dtype=np.uint8)
    for start in range(0, arr.shape[0], _ROW_BLOCK):
        block = arr[start : start + _ROW_BLOCK].astype(np.float64)
        out[start : start + _ROW_BLOCK] = np.clip(np.round(block / hi * 255.0), 0, 255)
    return out


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to RGB uint8; 16-bit and float images are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.repeat(_scaled_grey(img)[..., None], 3, axis=2)
    if img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        # Composite on black: transparent regions carry no information about the part.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)  # no extra copy of RGB


def _source_name(source: str | os.PathLike | bytes) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)


def _identify(source: str | os.PathLike | bytes) -> Image.Image:
    """Image.open limited to the documented formats: reads the header only."""
    name = _source_name(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else name
        return Image.open(fp, formats=READ_FORMATS)
    except FileNotFoundError as exc:
        raise ImageReadError(f"image file not found: {name}") from exc
    except Image.DecompressionBombError as exc:  # over Pillow's own hard limit, whatever ours is
        raise ImageTooLargeError(f"image {name} is too large to decode: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"cannot decode image {name}: not a {ACCEPTED} image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot decode image {name}: {exc}") from exc


def check_pixels(name: str, size: tuple[int, int], max_pixels: int | None = None) -> None:
    """Refuse (ImageTooLargeError) an image whose header declares more than the pixel limit."""
    limit = max_pixels_setting(max_pixels)
    width, height = size
    if width * height > limit:
        raise ImageTooLargeError(
            f"image {name} is {width} x {height} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{limit / 1e6:g} megapixels (--max-pixels)",
            pixels=width * height,
            limit=limit,
        )


def _draft_size(img: Image.Image, target_size: ImageSize | None) -> tuple[int, int] | None:
    """The (W, H) to ask a JPEG's decoder for: at least DRAFT_MARGIN x the model size on each side."""
    if target_size is None or img.format != "JPEG":
        return None
    h, w = as_hw(target_size)
    want = (DRAFT_MARGIN * w, DRAFT_MARGIN * h)
    return want if img.size[0] >= 2 * want[0] and img.size[1] >= 2 * want[1] else None


def _decode(
    source: str | os.PathLike | bytes, max_pixels: int | None = None, target_size: ImageSize | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """(decoded PIL image, its header's (W, H)), after the header checks: a documented format, at most
    `max_pixels` pixels (default $DISTRIBUTED_ANOMALY_MAX_PIXELS, else 40 MP). With `target_size` (the model's
    input side), a JPEG at least 4x larger on each side is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling), never below twice the model size: the model only ever sees it resized to target_size."""
    name = _source_name(source)
    img = _identify(source)
    size = img.size
    try:
        check_pixels(name, size, max_pixels)
        draft = _draft_size(img, target_size)
        if draft is not None:
            img.draft(None, draft)
        img.load()  # force a full decode so truncated files fail here, not later
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        return img, size
    except ImageReadError:
        img.close()
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        img.close()
        raise ImageReadError(f"cannot decode image {name}: {exc}") from exc


def load_image(
    source: str | os.PathLike | bytes, *, max_pixels: int | None = None, target_size: ImageSize | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """(RGB uint8 pixels, the image's own (H, W)): the pixels are smaller than (H, W) when a JPEG was decoded
    at reduced scale for `target_size` (see _decode); answers in image coordinates use (H, W)."""
    img, (width, height) = _decode(source, max_pixels, target_size)
    try:
        pixels = _to_rgb_uint8(img)
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"cannot decode image {_source_name(source)}: {exc}") from exc
    finally:
        img.close()
    return pixels, (height, width)


def read_image(
    source: str | os.PathLike | bytes, *, max_pixels: int | None = None, target_size: ImageSize | None = None
) -> np.ndarray:
    """Decode a file path or encoded bytes to an (H, W, 3) uint8 RGB array (reduced for a large JPEG when
    `target_size` is given; see _decode)."""
    return load_image(source, max_pixels=max_pixels, target_size=target_size)[0]


def image_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) from the header alone, without decoding pixels."""
    with _identify(path) as img:
        return img.size[1], img.size[0]


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a ground-truth mask to an (H, W) bool array: any non-zero pixel is anomalous."""
    img, _ = _decode(path)
    arr = np.asarray(img.convert("L") if img.mode not in ("I;16", "I", "F", "1", "L") else img)
    return arr > 0


def _resize_plane(plane: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """One float32 channel resized to (H, W): bilinear, antialiased when shrinking (Pillow's float resampler, the
    algorithm torch's interpolate(antialias=True) was ported from: within 2e-5 of it after normalising,
    tests/test_node_runtime.py)."""
    if plane.shape == hw:
        return plane
    return np.asarray(Image.fromarray(plane, mode="F").resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def shrink_to(image: np.ndarray, image_size: ImageSize) -> np.ndarray:
    """An RGB uint8 image at the model's H x W, still uint8, when that has fewer pixels (else unchanged): the
    resize `normalise` applies, rounded. Serve resizes once, in the ingress, and sends this small array instead of
    the photo; scores then differ from resizing in float by the rounding only."""
    hw = as_hw(image_size)
    if image.shape[0] * image.shape[1] <= hw[0] * hw[1]:
        return image
    out = np.empty((*hw, 3), dtype=np.uint8)
    for c in range(3):
        plane = _resize_plane(np.ascontiguousarray(image[:, :, c], dtype=np.float32), hw)
        out[:, :, c] = np.clip(np.rint(plane), 0, 255)
    return out


def normalise(images: np.ndarray | Sequence[np.ndarray], image_size: ImageSize) -> np.ndarray:
    """RGB uint8 image(s) -> (B, 3, H, W) float32, resized (bilinear, antialiased) and ImageNet-normalised.

    Resizing to H x W with no crop follows anomalib's default, so results compare like for like. Pillow and numpy
    release the GIL, so loader threads normalise in parallel.
    """
    hw = as_hw(image_size)
    batch = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
    out = np.empty((len(batch), 3, *hw), dtype=np.float32)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    for i, img in enumerate(batch):
        scaled = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        for c in range(3):
            plane = _resize_plane(np.ascontiguousarray(scaled[:, :, c]), hw)
            np.subtract(plane, mean[c], out=out[i, c])
            out[i, c] /= std[c]
    return out


def decode_batch(batch: dict[str, np.ndarray], image_size: ImageSize) -> dict[str, np.ndarray]:
    """A batch of paths -> normalised (B, 3, H, W) float32 pixels, one row each: a file that cannot be read
    becomes an error row (ok False, its message in error) instead of failing the batch. The decode step of the
    Ray Data pipelines (distributed/), torch-free, so their decode workers and pool actors start fast."""
    paths = [str(p) for p in batch["path"]]
    ok = np.zeros(len(paths), dtype=bool)
    errors = [""] * len(paths)
    images = []
    for i, path in enumerate(paths):
        try:
            images.append(read_image(path, target_size=image_size))
            ok[i] = True
        except ImageReadError as exc:
            errors[i] = str(exc)
        except Exception as exc:  # e.g. PIL's DecompressionBombError: still one bad file, named
            errors[i] = f"cannot decode image {path}: {type(exc).__name__}: {exc}"
    pixels = np.zeros((len(paths), 3, *as_hw(image_size)), dtype=np.float32)
    if images:
        pixels[ok] = normalise(images, image_size)
    return {
        "idx": np.asarray(batch["idx"], dtype=np.int64),
        "pixels": pixels,
        "ok": ok,
        "error": np.asarray(errors, dtype=str),
    }
