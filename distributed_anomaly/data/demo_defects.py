"""The demo dataset's defects, painted onto a clean scene through an alpha map; the mask is exactly the pixels
the alpha touches, and every defect covers between MIN_DEFECT_FRACTION and MAX_DEFECT_FRACTION of the image."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from distributed_anomaly.data.demo_scenes import (
    SHADOW_DEPTH,
    TILE_BASE,
    Scene,
    colourise_tile,
    grid,
    sample_texture,
    shadow,
)

# Defect area bounds as fractions of the image: large enough to see, small enough to be realistic.
MIN_DEFECT_FRACTION = 0.002
MAX_DEFECT_FRACTION = 0.05


# --------------------------------------------------------------------------- shapes


def _blob(
    rng: np.random.Generator,
    size: int,
    center: np.ndarray,
    radius: float,
    aspect: float = 1.0,
    feather: float = 1.0,
    wobble: float = 0.12,
) -> np.ndarray:
    """Soft irregular blob: an ellipse whose radius is modulated by a few low-order harmonics."""
    yy, xx = grid(size)
    theta = rng.uniform(0, np.pi)
    dx, dy = xx - center[0], yy - center[1]
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    a = np.sqrt(aspect)
    rho = np.hypot(u / a, v * a)
    ang = np.arctan2(v, u)
    edge = np.ones_like(rho)
    for k in range(2, 6):
        edge += rng.uniform(0, wobble) / np.sqrt(k - 1) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    return np.clip((radius * edge - rho) / feather, 0.0, 1.0)


def _polyline_distance(points: np.ndarray, size: int, pad: float) -> np.ndarray:
    """Exact distance from each pixel to a polyline (inf far from it, to keep it cheap)."""
    dist = np.full((size, size), np.inf, np.float32)
    lo = np.clip(np.floor(points.min(axis=0) - pad), 0, size - 1).astype(int)
    hi = np.clip(np.ceil(points.max(axis=0) + pad), 0, size - 1).astype(int)
    if np.any(hi < lo):
        return dist
    ys, xs = np.mgrid[lo[1] : hi[1] + 1, lo[0] : hi[0] + 1].astype(np.float32)
    p = np.stack([xs.ravel(), ys.ravel()], axis=1)
    a, b = points[:-1].astype(np.float32), points[1:].astype(np.float32)
    ab = b - a
    best = np.full(len(p), np.inf, np.float32)
    for ai, abi in zip(a, ab):
        t = np.clip(((p - ai) @ abi) / max(float(abi @ abi), 1e-6), 0.0, 1.0)
        best = np.minimum(best, np.hypot(*(p - ai - t[:, None] * abi).T))
    dist[lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] = best.reshape(xs.shape)
    return dist


def _stroke(points: np.ndarray, size: int, width: float) -> np.ndarray:
    """Anti-aliased coverage of a polyline drawn `width` pixels wide."""
    d = _polyline_distance(points, size, width + 2)
    return np.clip(width / 2 + 0.5 - d, 0.0, 1.0)


def _bezier(rng: np.random.Generator, start: np.ndarray, length: float, n: int = 40) -> np.ndarray:
    """A smooth random arc: a quadratic Bezier with its control point pulled sideways."""
    ang = rng.uniform(0, 2 * np.pi)
    end = start + length * np.array([np.cos(ang), np.sin(ang)])
    mid = (start + end) / 2 + rng.uniform(-0.3, 0.3) * length * np.array([-np.sin(ang), np.cos(ang)])
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * mid + t**2 * end


def _crack_path(rng: np.random.Generator, start: np.ndarray, length: float, step: float) -> np.ndarray:
    """A jagged random walk with a drifting heading, like a crack through ceramic."""
    n = max(int(length / step), 3)
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.35, n))
    heading = heading * 0.5 + np.convolve(heading, np.ones(3) / 3, mode="same") * 0.5
    steps = step * rng.uniform(0.6, 1.4, n)[:, None] * np.stack([np.cos(heading), np.sin(heading)], 1)
    return np.vstack([start, start + np.cumsum(steps, axis=0)])


# --------------------------------------------------------------------------- defects


def _fit(
    rng: np.random.Generator,
    scene: Scene,
    make: Callable[[], np.ndarray],
    allowed: np.ndarray | None = None,
    min_alpha: float = 0.4,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw shapes until one covers a realistic area of the allowed region; return (alpha, mask).

    The mask is the thresholded shape clipped to the region; the alpha is zero outside the mask
    and at least `min_alpha` inside, so every masked pixel is really altered and no other is.
    """
    allowed = scene.surface if allowed is None else allowed
    area = scene.size * scene.size
    lo, hi = MIN_DEFECT_FRACTION * area, MAX_DEFECT_FRACTION * area
    fallback = None
    for _ in range(40):
        soft = make()
        mask = (soft > 0.05) & allowed
        n = int(mask.sum())
        if lo <= n <= hi:
            return np.where(mask, np.maximum(soft, min_alpha), 0.0).astype(np.float32), mask
        if n > 0 and fallback is None:
            fallback = (soft, mask)
    if fallback is None:  # pragma: no cover - shapes are drawn inside the allowed region
        raise RuntimeError("could not place a defect")
    soft, mask = fallback
    return np.where(mask, np.maximum(soft, min_alpha), 0.0).astype(np.float32), mask


def _blend(scene: Scene, alpha: np.ndarray, target: np.ndarray) -> None:
    a = alpha[..., None]
    scene.fg = scene.fg * (1 - a) + target * a


def _point_on(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A uniformly random (x, y) pixel of a region: keeps defects on the object."""
    ys, xs = np.nonzero(region)
    i = int(rng.integers(len(ys)))
    return np.array([xs[i], ys[i]], np.float64) + rng.uniform(-0.5, 0.5, 2)


def _defect_crack(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    size = scene.size

    def make() -> np.ndarray:
        start = _point_on(rng, scene.surface)
        path = _crack_path(rng, start, rng.uniform(0.2, 0.45) * size, 0.02 * size)
        return _stroke(path, size, rng.uniform(1.2, 2.2) * size / 256)

    alpha, mask = _fit(rng, scene, make, min_alpha=0.5)
    scene.fg = scene.fg * (1 - alpha[..., None] * rng.uniform(0.5, 0.7))
    return mask


def _defect_oil(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    size = scene.size

    def make() -> np.ndarray:
        return _blob(
            rng,
            size,
            _point_on(rng, scene.surface),
            rng.uniform(0.035, 0.08) * size,
            aspect=rng.uniform(1.0, 2.0),
            feather=0.02 * size,
            wobble=0.15,
        )

    alpha, mask = _fit(rng, scene, make, min_alpha=0.3)
    tint = np.array([0.72, 0.62, 0.42], np.float32) * rng.uniform(0.85, 1.0)
    _blend(scene, alpha * rng.uniform(0.6, 0.85), scene.fg * tint)
    return mask


def _defect_gray_stroke(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    size = scene.size

    def make() -> np.ndarray:
        path = _bezier(rng, _point_on(rng, scene.surface), rng.uniform(0.15, 0.35) * size)
        return _stroke(path, size, rng.uniform(0.025, 0.045) * size)

    alpha, mask = _fit(rng, scene, make, min_alpha=0.5)
    smooth = ndimage.gaussian_filter(scene.fg, (2.0, 2.0, 0))
    grey = TILE_BASE * np.float32(rng.uniform(0.7, 0.85))  # a dull smear of the tile's own hue
    target = grey + 0.35 * (smooth - smooth.mean(axis=(0, 1)))
    _blend(scene, alpha * rng.uniform(0.7, 0.9), target)
    return mask


def _defect_rough(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    size = scene.size

    def make() -> np.ndarray:
        return _blob(
            rng,
            size,
            _point_on(rng, scene.surface),
            rng.uniform(0.05, 0.1) * size,
            aspect=rng.uniform(1.0, 1.8),
            feather=0.015 * size,
            wobble=0.2,
        )

    alpha, mask = _fit(rng, scene, make, min_alpha=0.4)
    other = colourise_tile(sample_texture(rng, "grass", size, fov=0.3), 1.0, contrast=1.4)
    _blend(scene, alpha * 0.95, other)
    return mask


def _defect_scratch(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    size = scene.size

    def make() -> np.ndarray:
        path = _bezier(rng, _point_on(rng, scene.surface), rng.uniform(0.15, 0.35) * size)
        return _stroke(path, size, rng.uniform(1.3, 2.4) * size / 256)

    alpha, mask = _fit(rng, scene, make, min_alpha=0.5)
    if rng.random() < 0.6:  # freshly cut bright groove
        target = np.minimum(scene.fg * 1.25 + 45.0, 255.0)
    else:  # dull dark scuff
        target = scene.fg * 0.45
    _blend(scene, alpha * rng.uniform(0.7, 0.95), target)
    return mask


_STAIN_TINTS = (
    np.array([0.78, 0.86, 1.18], np.float32),  # blue heat tint
    np.array([1.15, 0.88, 0.62], np.float32),  # rust / brass
    np.array([1.05, 0.78, 1.02], np.float32),  # purple anodising
)


def _defect_color(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    size = scene.size

    def make() -> np.ndarray:
        return _blob(
            rng,
            size,
            _point_on(rng, scene.surface),
            rng.uniform(0.035, 0.07) * size,
            aspect=rng.uniform(1.0, 2.2),
            feather=0.02 * size,
            wobble=0.15,
        )

    alpha, mask = _fit(rng, scene, make, min_alpha=0.35)
    tint = _STAIN_TINTS[int(rng.integers(len(_STAIN_TINTS)))]
    _blend(scene, alpha * rng.uniform(0.75, 0.95), np.minimum(scene.fg * tint, 255.0))
    return mask


def _defect_notch(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """A piece broken out of the rim or the hole edge: the table shows through."""
    size = scene.size
    obj = scene.cov > 0
    ys, xs = np.nonzero(obj)
    center = np.array([xs.mean(), ys.mean()])
    r = np.hypot(xs - center[0], ys - center[1])
    r_out, r_in = r.max(), r.min()

    def make() -> np.ndarray:
        ang = rng.uniform(0, 2 * np.pi)
        outer = rng.random() < 0.7
        radius = rng.uniform(0.035, 0.06) * size
        dist = r_out + rng.uniform(-0.4, 0.2) * radius if outer else r_in - rng.uniform(-0.3, 0.2) * radius
        c = center + dist * np.array([np.cos(ang), np.sin(ang)])
        return _blob(rng, size, c, radius, aspect=rng.uniform(1.0, 1.6), feather=0.8, wobble=0.25)

    alpha, mask = _fit(rng, scene, make, allowed=obj, min_alpha=1.0)
    scene.cov = scene.cov * (1 - alpha)
    if scene.table is not None:  # the table seen through the gap is lit where the piece is gone
        shadowed = scene.table * (1 - SHADOW_DEPTH * shadow(scene.cov))[..., None]
        scene.bg = np.where(mask[..., None], shadowed, scene.bg)
    return mask


def _defect_contamination(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    size = scene.size

    def make() -> np.ndarray:
        return _blob(
            rng,
            size,
            _point_on(rng, scene.surface),
            rng.uniform(0.025, 0.045) * size,
            aspect=rng.uniform(1.0, 2.5),
            feather=0.8,
            wobble=0.3,
        )

    alpha, mask = _fit(rng, scene, make, min_alpha=0.6)
    dirt = sample_texture(rng, "gravel", size, fov=0.25)
    colour = np.array([78.0, 60.0, 42.0], np.float32) * rng.uniform(0.7, 1.2)
    target = colour * np.clip(1 + 0.3 * dirt, 0.3, 2.0)[..., None]
    _blend(scene, alpha * 0.95, target)
    return mask


DEFECTS: dict[str, Callable[[np.random.Generator, Scene], np.ndarray]] = {
    "crack": _defect_crack,
    "oil": _defect_oil,
    "gray_stroke": _defect_gray_stroke,
    "rough": _defect_rough,
    "scratch": _defect_scratch,
    "color": _defect_color,
    "notch": _defect_notch,
    "contamination": _defect_contamination,
}
