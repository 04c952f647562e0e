"""The demo dataset's clean scenes: real CC0 texture photographs from scikit-image, cropped, lit and posed.

* ``tile``: a colourised gravel photograph (terrazzo-like), randomly cropped, rotated and flipped.
* ``washer``: a brushed-metal washer rendered at a nearly fixed pose on a dark table, like the aligned
  objects of MVTec AD.

Every image has its own random streams keyed by (seed, category, folder, index), so changing one category,
split size or defect list never changes the other images.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import skimage.data
from scipy import ndimage

SOURCE_SIZE = 512  # the skimage textures are 512x512


# --------------------------------------------------------------------------- random streams


@dataclass(frozen=True)
class Streams:
    """Independent generators, so a defect never shifts the clean render or the sensor noise."""

    base: np.random.Generator
    defect: np.random.Generator
    noise: np.random.Generator


def streams(seed: int, category: str, group: str, index: int) -> Streams:
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(group.encode()), index]
    base, defect, noise = np.random.SeedSequence(key).spawn(3)
    return Streams(np.random.default_rng(base), np.random.default_rng(defect), np.random.default_rng(noise))


# --------------------------------------------------------------------------- textures


@lru_cache(maxsize=4)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row and column coordinates (float32, shared and read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


@lru_cache(maxsize=64)
def _texture(name: str, blur: float = 0.0) -> np.ndarray:
    """A skimage photo texture, flattened (no illumination gradient), zero mean, unit std.

    Flattening removes the photo's slow lighting falloff so random crops share one statistic.
    """
    img = getattr(skimage.data, name)().astype(np.float32)
    img -= ndimage.gaussian_filter(img, 40.0, mode="reflect")
    if blur > 0:
        img = ndimage.gaussian_filter(img, blur)
    img = (img - img.mean()) / img.std()
    img.setflags(write=False)
    return img


@lru_cache(maxsize=4)
def _brushed(name: str) -> np.ndarray:
    """Streaky 'brushed metal' texture: the photo smeared along columns, periodic in columns."""
    img = _texture(name)
    img = ndimage.gaussian_filter(img, (0.8, 60.0), mode="wrap")
    img = (img - img.mean()) / img.std()
    img.setflags(write=False)
    return img


def sample_texture(
    rng: np.random.Generator, name: str, size: int, fov: float = 0.55, max_rot_deg: float = 8.0, extra_blur: float = 0.0
) -> np.ndarray:
    """A randomly posed crop (dihedral flip/rotation, small rotation, scale jitter) of a texture.

    The field of view is a fixed fraction of the photo, so smaller images are downscaled versions
    (with anti-alias blur) of the same content rather than zoomed-in crops.
    """
    scale = fov * SOURCE_SIZE / size * rng.uniform(0.95, 1.05)
    blur = round(0.5 * float(np.sqrt(max(scale * scale - 1.0, 0.0))) + extra_blur, 1)
    src = _texture(name, blur)
    # A quarter turn and a mirror of the photo (its dihedral variants), then a small tilt.
    theta = int(rng.integers(4)) * np.pi / 2 + np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg))
    mirror = np.float32(-1.0 if rng.random() < 0.5 else 1.0)
    half = (size - 1) / 2.0
    reach = half * scale * np.sqrt(2.0) + 2.0
    cy, cx = rng.uniform(reach, SOURCE_SIZE - 1 - reach, size=2)
    yy, xx = grid(size)
    u, v = (xx - half) * np.float32(scale) * mirror, (yy - half) * np.float32(scale)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    coords = np.stack([cy + s * u + c * v, cx + c * u - s * v])
    return ndimage.map_coordinates(src, coords, order=1, mode="reflect")


# --------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    """A clean render as layers: defects edit `fg` (the surface) or `cov` (where the object is)."""

    fg: np.ndarray  # HxWx3 float32, 0..255
    bg: np.ndarray  # HxWx3 float32, 0..255
    cov: np.ndarray  # HxW float32 in [0, 1], object coverage (1 everywhere for a texture)
    surface: np.ndarray  # HxW bool: where surface defects may go (fully on the object)
    table: np.ndarray | None = None  # HxWx3 background before the object's shadow, if it casts one

    @property
    def size(self) -> int:
        return self.cov.shape[0]

    def composite(self) -> np.ndarray:
        cov = self.cov[..., None]
        return self.fg * cov + self.bg * (1.0 - cov)


TILE_BASE = np.array([176.0, 168.0, 154.0], np.float32)  # warm light grey terrazzo
_TILE_CONTRAST = np.array([34.0, 33.0, 31.0], np.float32)


def colourise_tile(tex: np.ndarray, brightness: float, contrast: float = 1.0) -> np.ndarray:
    return TILE_BASE * brightness + tex[..., None] * _TILE_CONTRAST * contrast


def _render_tile(rng: np.random.Generator, size: int) -> Scene:
    """Gravel photo, colourised, with mild brightness and white-balance jitter per image."""
    tex = sample_texture(rng, "gravel", size)
    brightness = rng.uniform(0.96, 1.04)
    fg = colourise_tile(tex, brightness) * rng.uniform(0.985, 1.015, size=3).astype(np.float32)
    ones = np.ones((size, size), np.float32)
    return Scene(fg=fg.astype(np.float32), bg=np.zeros_like(fg, dtype=np.float32), cov=ones, surface=ones.astype(bool))


@dataclass(frozen=True)
class _WasherPose:
    cx: float
    cy: float
    rot: float  # radians
    r_out: float
    r_in: float


def _washer_pose(rng: np.random.Generator, size: int) -> _WasherPose:
    """Nearly fixed pose: a few pixels of shift and a few degrees of rotation, as in MVTec objects."""
    jitter = np.clip(rng.normal(0.0, 0.006 * size, size=2), -0.012 * size, 0.012 * size)
    return _WasherPose(
        cx=(size - 1) / 2 + float(jitter[0]),
        cy=(size - 1) / 2 + float(jitter[1]),
        rot=float(np.deg2rad(rng.uniform(-4.0, 4.0))),
        r_out=0.37 * size * rng.uniform(0.995, 1.005),
        r_in=0.16 * size,
    )


_LIGHT = np.array([-0.45, -0.6, 1.0], np.float32) / np.float32(np.linalg.norm([-0.45, -0.6, 1.0]))
_HALF = (_LIGHT + np.float32([0, 0, 1])) / np.linalg.norm(_LIGHT + np.float32([0, 0, 1]))
_METAL = np.array([156.0, 159.0, 165.0], np.float32)
_TABLE = np.array([46.0, 50.0, 58.0], np.float32)
SHADOW_DEPTH = 0.45


def _washer_coverage(r: np.ndarray, pose: _WasherPose) -> np.ndarray:
    """Anti-aliased annulus: one pixel of linear ramp at each edge."""
    return np.clip(pose.r_out - r + 0.5, 0, 1) * np.clip(r - pose.r_in + 0.5, 0, 1)


def shadow(cov: np.ndarray) -> np.ndarray:
    """Soft drop shadow of a coverage map, cast towards the bottom right."""
    size = cov.shape[0]
    shift = (max(1, round(0.018 * size)), max(1, round(0.014 * size)))
    moved = np.zeros_like(cov)
    moved[shift[0] :, shift[1] :] = cov[: size - shift[0], : size - shift[1]]
    return ndimage.gaussian_filter(moved, 0.02 * size, truncate=3.0)


def _render_washer(rng: np.random.Generator, size: int) -> Scene:
    """Brushed steel washer with rounded edges, lit from the top left, casting a soft shadow."""
    pose = _washer_pose(rng, size)
    yy, xx = grid(size)
    dx, dy = xx - np.float32(pose.cx), yy - np.float32(pose.cy)
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    cov = _washer_coverage(r, pose)

    # Flat face with rounded edges: the height rises at the hole and falls at the rim.
    w = np.float32(0.018 * size)
    slope = 2.2 * (np.exp(-(((r - pose.r_in) / w) ** 2)) - np.exp(-(((pose.r_out - r) / w) ** 2)))
    rr = np.maximum(r, 1e-3)
    nx, ny = -slope * dx / rr, -slope * dy / rr
    norm = np.sqrt(nx * nx + ny * ny + 1)
    diffuse = np.clip((_LIGHT[0] * nx + _LIGHT[1] * ny + _LIGHT[2]) / norm, 0, 1)
    spec = np.clip((_HALF[0] * nx + _HALF[1] * ny + _HALF[2]) / norm, 0, 1) ** 40

    # Concentric brushing: texture rows follow the radius, columns the angle (periodic).
    rows = (r - pose.r_in) * np.float32(90.0 / (pose.r_out - pose.r_in)) + np.float32(rng.uniform(0, 400))
    cols = (phi - np.float32(pose.rot)) * np.float32(SOURCE_SIZE / np.pi) + np.float32(rng.uniform(0, 512))
    brush = ndimage.map_coordinates(_brushed("grass"), np.stack([rows, cols]), order=1, mode="grid-wrap")
    # Brushed metal shows a highlight band across the grooves, perpendicular to the light.
    light_angle = float(np.arctan2(_LIGHT[1], _LIGHT[0]))
    band = (0.5 + 0.5 * np.cos(2 * (phi - np.float32(light_angle + np.pi / 2)))) ** 3

    albedo = _METAL * np.float32(rng.uniform(0.97, 1.03)) * (1 + 0.06 * brush)[..., None]
    shade = 0.6 + 0.42 * diffuse + 0.14 * band
    fg = albedo * shade[..., None] + (60.0 * spec)[..., None]

    # Table: a vignette, a small random lighting gradient and faint mottling; then the shadow.
    grain = sample_texture(rng, "gravel", size, max_rot_deg=180.0, extra_blur=2.5)
    rad2 = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / np.float32(size * size)
    gx, gy = rng.uniform(-0.05, 0.05, size=2).astype(np.float32)
    light = 1.08 - 0.35 * rad2 + gx * (xx / size - 0.5) + gy * (yy / size - 0.5) + 0.02 * grain
    table = _TABLE * light[..., None]
    bg = table * (1 - SHADOW_DEPTH * shadow(cov))[..., None]

    surface = ndimage.binary_erosion(cov >= 0.999, iterations=1)
    return Scene(
        fg=fg.astype(np.float32),
        bg=bg.astype(np.float32),
        cov=cov.astype(np.float32),
        surface=surface,
        table=table.astype(np.float32),
    )


RENDERERS: dict[str, Callable[[np.random.Generator, int], Scene]] = {
    "tile": _render_tile,
    "washer": _render_washer,
}
