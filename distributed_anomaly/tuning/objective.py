"""What a search maximises, computed the same way after every STFPM epoch and at the end of every trial.

- `val_auroc`: image AUROC on the *search part* of the test split. When labelled anomalies exist, the test
  split is divided (seeded, stratified by category and defect type) into a search part, which the search may
  look at as often as it likes, and a held-out part, used once, for the final metrics of the best trial only.
- `synthetic_auroc`: image AUROC of the held-out normal training images (the `--val-fraction` of train/good)
  against copies of the same images with one synthetic defect each (CutPaste patches, scars, blended patches:
  data.synthetic.synthetic_anomaly). It needs no labelled anomaly at all, the common case in production.

Both are threshold-free (AUROC of the raw maps), so they do not depend on calibration and can be computed on a
half-trained model. Pixel AUROCs are reported alongside. Whatever the objective, every trial reports all of
them that the data allows, which is how the README measures how well `synthetic_auroc` tracks `val_auroc`.
"""

from __future__ import annotations

import copy
import functools
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distributed_anomaly import engine, metrics
from distributed_anomaly.data.images import read_image, resize_mask, to_tensor
from distributed_anomaly.data.loader import load_masks
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.data.sizes import ImageSize, as_hw, canonical
from distributed_anomaly.data.synthetic import synthetic_anomaly
from distributed_anomaly.errors import UserError
from distributed_anomaly.tuning.request import OBJECTIVES

EPOCH_BN_IMAGES = 128  # batch-norm statistics of the per-epoch scored copy: a sample is enough to rank trials


def split_test(test: Sequence[Record], search_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(search part, held-out part) of the test split, stratified by (category, defect type), seeded.

    Each group of at least two images gives round(fraction * n) images (at least one, never all) to the search
    part; a group of one stays held out. Without anomalous images there is nothing to validate on: everything
    is held out. Both parts keep the test split's order.
    """
    if not 0.0 < search_fraction < 1.0:
        raise UserError(f"the search fraction of the test split must be in (0, 1), got {search_fraction}")
    if not any(r.label for r in test):
        return [], list(test)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(test):
        groups[(r.category, r.defect)].append(i)
    chosen: set[int] = set()
    for key in sorted(groups):
        idx = groups[key]
        if len(idx) < 2:
            continue
        k = min(max(1, round(len(idx) * search_fraction)), len(idx) - 1)
        rng = np.random.default_rng([seed, zlib.crc32("/".join(key).encode())])  # groups independent of each other
        chosen.update(idx[j] for j in rng.permutation(len(idx))[:k])
    return ([r for i, r in enumerate(test) if i in chosen], [r for i, r in enumerate(test) if i not in chosen])


def resolve_objective(requested: str, test: Sequence[Record]) -> str:
    """`auto` -> val_auroc when the test split has labelled anomalies, else synthetic_auroc."""
    has_labels = any(r.label for r in test)
    if requested == "auto":
        return "val_auroc" if has_labels else "synthetic_auroc"
    if requested not in OBJECTIVES:
        raise UserError(f"unknown objective {requested!r}; choose auto, {', '.join(OBJECTIVES)}")
    if requested == "val_auroc" and not has_labels:
        raise UserError(
            "--objective val_auroc needs labelled anomalies (test/<defect> with masks); this dataset "
            "has none: use --objective synthetic_auroc"
        )
    return requested


def synthetic_images(normals: Sequence[Record], copies: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(image, mask, label): each normal image as it is, then `copies` copies with one synthetic defect each.

    Seeded per (seed, image index, copy), so every trial of a search scores exactly the same images.
    """
    for i, r in enumerate(normals):
        image = read_image(r.path)
        yield image, np.zeros(image.shape[:2], dtype=bool), 0
        for k in range(copies):
            defect, mask = synthetic_anomaly(image, np.random.default_rng([seed, i, k]))
            yield defect, mask, 1


def _device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def score_images(
    model: torch.nn.Module, images: Sequence[np.ndarray], image_size: ImageSize, batch_size: int = 32
) -> np.ndarray:
    """(N, H, W) raw anomaly maps of RGB uint8 arrays, on the model's device (CPU or a Ray Train worker's GPU)."""
    device = _device(model)
    out = np.empty((len(images), *as_hw(image_size)), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = to_tensor(list(images[i : i + batch_size]), image_size).to(device)
            out[i : i + len(x)] = model(x)[:, 0].float().cpu().numpy()
    return out


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    if labels.all() or not labels.any():
        return None
    return float(metrics.auroc(scores.astype(np.float64), labels))


def _scored(maps: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> tuple[float | None, float | None]:
    image = _auroc(maps.reshape(len(maps), -1).max(axis=1), labels)
    pixel = _auroc(maps.ravel(), masks.ravel()) if masks.any() else None
    return image, pixel


@dataclass(frozen=True)
class ObjectiveData:
    """The images a search scores every model on: small, picklable (paths only), the same for every trial."""

    labelled: tuple[Record, ...]  # the search part of the test split
    normals: tuple[Record, ...]  # held-out normal training images (synthetic defects are pasted into copies)
    copies: int = 3
    seed: int = 0

    def evaluate(self, model: torch.nn.Module, batch_size: int = 32) -> dict[str, float | None]:
        """val_auroc / val_pixel_auroc (with labelled images) and synthetic_auroc / synthetic_pixel_auroc."""
        size = canonical(model.image_size)
        out: dict[str, float | None] = {}
        for prefix, (images, labels, masks) in _inputs(self, size).items():
            maps = score_images(model, images, size, batch_size)
            out[f"{prefix}_auroc"], out[f"{prefix}_pixel_auroc"] = _scored(maps, labels, masks)
        return out


@functools.lru_cache(maxsize=2)
def _inputs(data: ObjectiveData, size: ImageSize) -> dict[str, tuple[list[np.ndarray], np.ndarray, np.ndarray]]:
    """What `evaluate` scores, {"val" | "synthetic": (images, labels, masks at `size`)}: decoded and generated
    once per process and image size, not again after every STFPM epoch (only the model changes)."""
    out = {}
    if data.labelled:
        out["val"] = (
            [read_image(r.path) for r in data.labelled],
            np.array([r.label for r in data.labelled], dtype=bool),
            load_masks(data.labelled, size),
        )
    if data.normals:
        items = list(synthetic_images(data.normals, data.copies, data.seed))
        out["synthetic"] = (
            [im for im, _, _ in items],
            np.array([lab for _, _, lab in items], dtype=bool),
            np.stack([resize_mask(m, size) for _, m, _ in items]),
        )
    return out


@dataclass(frozen=True)
class EpochObjective:
    """stfpm_train's `epoch_eval` hook: the objective of the model as it is after an epoch, on rank 0.

    Scores a copy (the training model, its optimizer state and DDP buffers are untouched), whose student batch
    norm is first recomputed on a sample of training images, as the final model's will be: the running
    averages training leaves behind would make every early epoch look like chance (see README, STFPM).
    """

    data: ObjectiveData
    objective: str
    bn_records: tuple[Record, ...]
    batch_size: int = 32
    seed: int = 0
    bn_recompute: bool = True

    def __call__(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
        scored = copy.deepcopy(model)
        if self.bn_recompute:
            engine.recompute_batchnorm(
                scored,
                list(self.bn_records),
                self.batch_size,
                self.seed,
                max_images=EPOCH_BN_IMAGES,
                device=_device(scored),
            )
        values = self.data.evaluate(scored, self.batch_size)
        out = {k: v for k, v in values.items() if v is not None}
        if values.get(self.objective) is not None:
            out["objective"] = values[self.objective]
        return out
