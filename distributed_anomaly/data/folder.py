"""The `folder` layout: what a factory exports, one folder of normal images and one per defect type.

    ROOT/good/*.png          normal images (--normal-dir): a seeded share (--holdout) goes to the test split
    ROOT/<defect>/*.png      abnormal images, one folder per defect type (--abnormal-dir, repeatable; default
                             every other sub-folder of ROOT except the mask folder)
    ROOT/masks/...           optional masks (--mask-dir; default masks/ when present): the mask of
                             <defect>/x.png is masks/<defect>/x.<ext> or masks/<defect>/x_mask.<ext> when
                             masks/<defect>/ exists, else masks/x.<ext> or masks/x_mask.<ext>

Without masks, abnormal images carry no mask and pixel metrics are reported as undefined. The manifest has the
records `mvtec.load_category` makes (train / test split, defect = folder name, category = ROOT's name).
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from pathlib import Path

from distributed_anomaly.data.layout import DEFAULT_MASK_DIR, DataLayout
from distributed_anomaly.data.mvtec import GOOD, Record, images_in, require_images
from distributed_anomaly.errors import DatasetLayoutError

HOLDOUT_SEED = 0  # fixed: the test split is a property of the data, the same for every model and --seed


def _resolve(root: Path, name: str) -> Path:
    return Path(name) if Path(name).is_absolute() else root / name


def _abnormal_dirs(root: Path, layout: DataLayout, normal_dir: Path, mask_dir: Path | None) -> list[Path]:
    """The defect folders: those given, or every visible sub-folder but the normal and mask folders."""
    if layout.abnormal_dirs:
        dirs = [_resolve(root, d) for d in layout.abnormal_dirs]
    else:
        skip = {normal_dir.resolve(), *([mask_dir.resolve()] if mask_dir else [])}
        dirs = sorted(
            d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.resolve() not in skip
        )
    names = [d.name for d in dirs]
    for d in dirs:
        if d.name == GOOD:
            raise DatasetLayoutError(f"abnormal folder {d} is named {GOOD!r}, the name of normal images; rename it")
        if names.count(d.name) > 1:
            raise DatasetLayoutError(f"two abnormal folders are named {d.name!r}: defect types need distinct names")
    return dirs


def _split_normals(normals: list[Path], holdout: float, require_test: bool, where: Path) -> tuple[list, list]:
    """(kept for training, held out for the test split): a seeded shuffle, at least one image each way."""
    n_test = max(1, round(len(normals) * holdout)) if holdout > 0 else 0
    if n_test >= len(normals):
        raise DatasetLayoutError(
            f"only {len(normals)} normal images in {where}: too few to hold out {holdout:.0%} for the test split "
            "(lower --holdout or add images)"
        )
    if require_test and n_test == 0:
        raise DatasetLayoutError("--holdout 0 leaves no normal test images: the metrics need some (e.g. --holdout 0.2)")
    order = list(range(len(normals)))
    random.Random(HOLDOUT_SEED).shuffle(order)
    test = set(order[:n_test])
    return [p for i, p in enumerate(normals) if i not in test], [p for i, p in enumerate(normals) if i in test]


class _Masks:
    """Matches each abnormal image to its mask by the stem rule of the module docstring; reports leftovers."""

    def __init__(self, mask_dir: Path) -> None:
        self.mask_dir = mask_dir
        self.used: dict[Path, Path] = {}  # mask -> image
        self.stems: dict[Path, dict[str, list[Path]]] = {}  # folder read -> stem -> masks

    def _index(self, where: Path) -> dict[str, list[Path]]:
        if where not in self.stems:
            self.stems[where] = defaultdict(list)
            for m in images_in(where):
                self.stems[where][m.stem].append(m)
        return self.stems[where]

    def find(self, defect: str, image: Path) -> Path:
        where = self.mask_dir / defect if (self.mask_dir / defect).is_dir() else self.mask_dir
        stems = self._index(where)
        found = stems.get(image.stem, []) + stems.get(f"{image.stem}_mask", [])
        if not found:
            raise DatasetLayoutError(
                f"defect image {image} has no mask: expected {where / image.stem}.png or {where / image.stem}_mask.png"
            )
        if len(found) > 1:
            raise DatasetLayoutError(f"defect image {image} has {len(found)} masks: {', '.join(map(str, found))}")
        if found[0] in self.used:
            raise DatasetLayoutError(
                f"mask {found[0]} matches both {self.used[found[0]]} and {image}: put each defect type's masks "
                f"in {self.mask_dir}/<defect>/"
            )
        self.used[found[0]] = image
        return found[0]

    def check_orphans(self, defects: set[str]) -> None:
        for _, stems in sorted(self.stems.items()):
            orphans = sorted(m for ms in stems.values() for m in ms if m not in self.used)
            if orphans:
                more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
                raise DatasetLayoutError(f"mask {orphans[0]} has no abnormal image{more}")
        for sub in sorted(d for d in self.mask_dir.iterdir() if d.is_dir()):
            if sub.name not in defects:
                raise DatasetLayoutError(f"masks folder {sub} has no matching abnormal image folder")


def load_folder(root: str | os.PathLike, layout: DataLayout, *, require_test: bool = True) -> list[Record]:
    """The manifest of a `folder` dataset, checking the layout as it goes (every mistake names its path)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder {root} does not exist")
    category = root.name
    normal_dir = _resolve(root, layout.normal_dir)
    normals = require_images(normal_dir, "normal images (--normal-dir)")
    mask_dir = _resolve(root, layout.mask_dir) if layout.mask_dir else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise DatasetLayoutError(f"mask folder {mask_dir} (--mask-dir) does not exist")
    if mask_dir is None and (root / DEFAULT_MASK_DIR).is_dir():
        mask_dir = root / DEFAULT_MASK_DIR
    abnormal = _abnormal_dirs(root, layout, normal_dir, mask_dir)
    if require_test and not abnormal:
        raise DatasetLayoutError(
            f"{root} has no abnormal image folder besides {normal_dir.name}/: the metrics need anomalous images "
            "(one sub-folder per defect type, or --abnormal-dir)"
        )
    train, held_out = _split_normals(normals, layout.holdout, require_test, normal_dir)
    records = [Record(str(p), "train", 0, GOOD, category) for p in train]
    records += [Record(str(p), "test", 0, GOOD, category) for p in held_out]
    masks = _Masks(mask_dir) if mask_dir is not None else None
    for d in abnormal:
        for p in require_images(d, "abnormal images (--abnormal-dir)"):
            mask = str(masks.find(d.name, p)) if masks else None
            records.append(Record(str(p), "test", 1, d.name, category, mask))
    if masks:
        masks.check_orphans({d.name for d in abnormal})
    return records
