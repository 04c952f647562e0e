"""What the image reader accepts: the formats and the pixel limit, torch- and Pillow-free so the command line
and the Serve settings read their defaults from here without loading either.

The limit is checked on the image header, before any pixel is decoded: a 13000 x 13000 PNG of a few hundred
bytes would otherwise ask for half a gigabyte. `--max-pixels` (train, evaluate, predict) sets MAX_PIXELS_ENV
for the process, so Ray workers it starts inherit it; Serve takes it as an application argument.
"""

from __future__ import annotations

import os

from distributed_anomaly.errors import UserError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: every industrial camera we know of (a 7920 x 5000 frame fits)
MAX_PIXELS_ENV = "DISTRIBUTED_ANOMALY_MAX_PIXELS"
# Pillow identifiers of the formats we document; no other decoder (EPS runs Ghostscript, PSD, ...) is reachable.
READ_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


def parse_max_pixels(value: object) -> int:
    """A pixel limit from a number or a string ("40000000", "4e7"); UserError unless a positive integer."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"max pixels must be a number, got {value!r}") from None
    if not number >= 1 or number != int(number):
        raise UserError(f"max pixels must be a positive whole number, got {value!r}")
    return int(number)


def max_pixels_setting(value: int | None = None) -> int:
    """The limit in force: `value` if given, else $DISTRIBUTED_ANOMALY_MAX_PIXELS, else the default."""
    if value is not None:
        return parse_max_pixels(value)
    env = os.environ.get(MAX_PIXELS_ENV)
    return parse_max_pixels(env) if env else DEFAULT_MAX_PIXELS
