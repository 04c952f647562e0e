"""Helper: crafted image bytes that must be refused (tests/ is on sys.path, as for ray_cluster.py)."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height RGB, with a tiny IDAT (a few hundred bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def psd_bytes() -> bytes:
    """A minimal Photoshop header (Pillow's PSD plugin opens it), 8 x 8 RGB."""
    header = b"8BPS" + struct.pack(">H6sHIIHH", 1, b"\0" * 6, 3, 8, 8, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + b"\0" * 192


def eps_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="EPS")
    return buf.getvalue()
