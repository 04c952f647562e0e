"""The model input size: one int S for S x S (what every saved config before H x W holds), or (H, W).

Line-scan and wide cameras give images far wider than tall; squashing them to a square loses the defects, so
the size is (height, width) throughout. A square size stays an int everywhere it is stored (config.json,
metadata.json), so runs and exports written before non-square sizes load unchanged and new square ones read
the same as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from distributed_anomaly.errors import UserError

ImageSize = int | tuple[int, int]  # S (square) or (H, W)
MIN_SIZE, MAX_SIZE = 32, 2048
_TEXT = re.compile(r"^\s*(\d+)\s*(?:[xX×,]\s*(\d+)\s*)?$")


def as_hw(size: ImageSize | Sequence[int]) -> tuple[int, int]:
    """(H, W) of a size given as S, (H, W) or [H, W] (JSON)."""
    if isinstance(size, bool):
        raise UserError(f"image size must be an int or (height, width), got {size!r}")
    if isinstance(size, int):
        return size, size
    if (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        return int(size[0]), int(size[1])
    raise UserError(f"image size must be an int or (height, width), got {size!r}")


def canonical(size: ImageSize | Sequence[int]) -> ImageSize:
    """The stored form: an int when square (as every earlier config), else the (H, W) tuple."""
    h, w = as_hw(size)
    return h if h == w else (h, w)


def check_size(size: ImageSize | Sequence[int]) -> ImageSize:
    """canonical(size), each side within [MIN_SIZE, MAX_SIZE]: a clear error otherwise."""
    h, w = as_hw(size)
    if not (MIN_SIZE <= h <= MAX_SIZE and MIN_SIZE <= w <= MAX_SIZE):
        raise UserError(f"image size must be between {MIN_SIZE} and {MAX_SIZE} on each side, got {size_text(size)}")
    return canonical(size)


def parse_size(text: str) -> ImageSize:
    """Command-line form: `256` (256 x 256) or `HxW`, e.g. `256x512` (height 256, width 512)."""
    m = _TEXT.match(text)
    if not m:
        raise UserError(f"--image-size {text!r}: expected S (square) or HxW, e.g. 256 or 256x512")
    h = int(m.group(1))
    return check_size((h, int(m.group(2))) if m.group(2) else h)


def size_text(size: ImageSize | Sequence[int]) -> str:
    """`256` or `256x512` (height x width): how the command line takes it and the report shows it."""
    h, w = as_hw(size)
    return str(h) if h == w else f"{h}x{w}"
