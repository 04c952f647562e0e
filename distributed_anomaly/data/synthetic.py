"""Defects pasted into real images, where real anomalies are missing: int8 calibration data (export) and the
`synthetic_auroc` objective of hyperparameter search (tuning.objective). They are deliberately NOT the demo
categories' own defect painters (data.demo_defects), so that searching on them does not learn the demo's
generator."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def paste_patches(image: np.ndarray, rng: np.random.Generator, n_patches: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A copy of an RGB uint8 image with a few random rectangles of flat colour or noise, and their mask.

    (export's int8 calibration defects; the random stream is consumed exactly as it always was.)
    """
    out = image.copy()
    h, w = out.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(n_patches):
        ph, pw = int(rng.integers(max(1, h // 16), max(2, h // 4))), int(rng.integers(max(1, w // 16), max(2, w // 4)))
        y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        out[y : y + ph, x : x + pw] = (
            rng.integers(0, 256, 3) if rng.random() < 0.5 else rng.integers(0, 256, (ph, pw, 3))
        )
        mask[y : y + ph, x : x + pw] = True
    return out, mask


SYNTHETIC_KINDS = ("cutpaste", "scar", "patch")


def _rect(rng: np.random.Generator, h: int, w: int, min_area: float, max_area: float) -> tuple[int, int]:
    """Height and width of a rectangle covering [min_area, max_area] of the image, aspect ratio 0.3-3.3."""
    area = rng.uniform(min_area, max_area) * h * w
    aspect = float(np.exp(rng.uniform(np.log(0.3), np.log(3.3))))
    ph = int(np.clip(round(np.sqrt(area * aspect)), 2, max(2, h // 2)))
    pw = int(np.clip(round(np.sqrt(area / aspect)), 2, max(2, w // 2)))
    return ph, pw


def synthetic_anomaly(
    image: np.ndarray, rng: np.random.Generator, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic defect pasted into a normal RGB uint8 image; returns (image, bool mask of changed pixels).

    kinds (one drawn at random unless given):
    - cutpaste: a rectangle of the image itself (0.5-3 % of its area), colour-jittered, pasted elsewhere
      (CutPaste, Li et al., CVPR 2021): locally plausible texture in the wrong place;
    - scar: a thin rotated stroke of a random colour, partly transparent (CutPaste-scar-like scratches);
    - patch: a rectangle of flat colour or noise, blended (0.5-1 opacity).
    The mask is never empty, so every defective copy is a real anomaly at pixel level too.
    """
    kind = kind or SYNTHETIC_KINDS[int(rng.integers(len(SYNTHETIC_KINDS)))]
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic defect kind {kind!r}; choose one of {SYNTHETIC_KINDS}")
    out = image.astype(np.float32)
    h, w = out.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    if kind == "cutpaste":
        ph, pw = _rect(rng, h, w, 0.005, 0.03)
        sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        for _ in range(10):  # a destination that does not overlap the source much
            dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
            if abs(dy - sy) >= ph // 2 or abs(dx - sx) >= pw // 2:
                break
        patch = out[sy : sy + ph, sx : sx + pw] * rng.uniform(0.8, 1.2, 3).astype(np.float32)
        out[dy : dy + ph, dx : dx + pw] = patch + rng.uniform(-20, 20)
        mask[dy : dy + ph, dx : dx + pw] = True
    elif kind == "scar":
        side = min(h, w)
        length = rng.uniform(0.1, 0.25) * side
        width = rng.uniform(max(1.5, 0.01 * side), max(2.5, 0.03 * side))
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        angle = rng.uniform(0, np.pi)
        d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
        n = np.array([-np.sin(angle), np.cos(angle)]) * width / 2
        corners = [
            (cx + sx * d[0] + sn * n[0], cy + sx * d[1] + sn * n[1]) for sx, sn in ((-1, -1), (1, -1), (1, 1), (-1, 1))
        ]
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon(corners, fill=255)
        mask = np.asarray(canvas) > 0
        if not mask.any():  # sub-pixel stroke: mark its centre
            mask[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))] = True
        alpha = rng.uniform(0.6, 1.0)
        out[mask] = (1 - alpha) * out[mask] + alpha * rng.uniform(0, 255, 3).astype(np.float32)
    else:
        ph, pw = _rect(rng, h, w, 0.005, 0.03)
        y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        fill = (rng.uniform(0, 255, 3) if rng.random() < 0.5 else rng.uniform(0, 255, (ph, pw, 3))).astype(np.float32)
        alpha = rng.uniform(0.5, 1.0)
        out[y : y + ph, x : x + pw] = (1 - alpha) * out[y : y + ph, x : x + pw] + alpha * fill
        mask[y : y + ph, x : x + pw] = True
    return np.clip(np.round(out), 0, 255).astype(np.uint8), mask
