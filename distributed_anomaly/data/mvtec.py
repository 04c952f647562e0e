"""The MVTec AD folder format as a manifest of records: paths and labels, never pixels.

A category folder holds `train/good`, `test/good`, `test/<defect>` and `ground_truth/<defect>/<stem>_mask.png`.
Users put their own data in the same shape, so every mistake in it gets a message naming the path.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from distributed_anomaly.data.decode import is_image_file
from distributed_anomaly.errors import DatasetLayoutError

GOOD = "good"


@dataclass(frozen=True)
class Record:
    """One image of a category: where it is and what we know about it."""

    path: str
    split: str  # "train" or "test"
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" or the defect folder name
    category: str
    mask_path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def images_in(folder: Path) -> list[Path]:
    """The image files of a folder (not recursive), sorted: hidden files and other extensions ignored."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))


def require_images(folder: Path, what: str) -> list[Path]:
    """images_in, or an error naming the folder when it is missing or holds no image."""
    if not folder.is_dir():
        raise DatasetLayoutError(f"missing folder {folder} ({what})")
    images = images_in(folder)
    if not images:
        raise DatasetLayoutError(f"folder {folder} holds no images ({what}); expected e.g. .png or .jpg files")
    return images


def is_category_dir(path: Path) -> bool:
    return (path / "train").is_dir() or (path / "test").is_dir()


def load_category(root: str | os.PathLike, *, require_test: bool = True) -> list[Record]:
    """Build the manifest of one category folder, checking the layout as it goes."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder {root} does not exist")
    category = root.name
    records = [
        Record(str(p), "train", 0, GOOD, category)
        for p in require_images(root / "train" / GOOD, "normal training images")
    ]
    test_dir = root / "test"
    if not test_dir.is_dir():
        if require_test:
            raise DatasetLayoutError(f"missing folder {test_dir} (test images: test/good and test/<defect>)")
        return records
    defect_dirs = sorted(d for d in test_dir.iterdir() if d.is_dir())
    if not defect_dirs:
        raise DatasetLayoutError(f"folder {test_dir} has no sub-folders; expected test/good and test/<defect>")
    gt_root = root / "ground_truth"
    for d in defect_dirs:
        images = require_images(d, "test images")
        if d.name == GOOD:
            records += [Record(str(p), "test", 0, GOOD, category) for p in images]
            continue
        gt_dir = gt_root / d.name
        masks = {m.name: m for m in images_in(gt_dir)} if gt_dir.is_dir() else {}
        expected = set()
        for p in images:
            mask_name = f"{p.stem}_mask.png"
            expected.add(mask_name)
            if mask_name not in masks:
                raise DatasetLayoutError(f"defect image {p} has no mask: expected {gt_dir / mask_name}")
            records.append(Record(str(p), "test", 1, d.name, category, str(masks[mask_name])))
        orphans = sorted(set(masks) - expected)
        if orphans:
            raise DatasetLayoutError(
                f"mask {gt_dir / orphans[0]} has no image: expected {d / orphans[0].removesuffix('_mask.png')}.<ext>"
                + (f" (and {len(orphans) - 1} more orphan masks)" if len(orphans) > 1 else "")
            )
    if gt_root.is_dir():
        for g in sorted(x for x in gt_root.iterdir() if x.is_dir()):
            if not (test_dir / g.name).is_dir():
                raise DatasetLayoutError(f"masks folder {g} has no matching image folder {test_dir / g.name}")
    return records


def load_dataset(root: str | os.PathLike, *, require_test: bool = True) -> list[Record]:
    """A category folder, or a parent folder holding several categories (records keep their category)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder {root} does not exist")
    if is_category_dir(root):
        return load_category(root, require_test=require_test)
    children = sorted(d for d in root.iterdir() if d.is_dir() and is_category_dir(d))
    if not children:
        raise DatasetLayoutError(
            f"{root} is neither an MVTec category folder (with train/good and test/) nor a folder of them"
        )
    return [r for c in children for r in load_category(c, require_test=require_test)]


def split_train_val(records: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded fraction of the normal training images for thresholds and early stopping.

    With a fraction > 0 at least one image is held out and at least one is kept for fitting.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train = [r for r in records if r.split == "train"]
    if val_fraction == 0.0:
        return train, []
    n_val = max(1, round(len(train) * val_fraction))
    if n_val >= len(train):
        raise DatasetLayoutError(
            f"only {len(train)} training images: too few to hold out {val_fraction:.0%} for validation "
            "(use --val-fraction 0 or add images)"
        )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(train) if i not in val_idx], [r for i, r in enumerate(train) if i in val_idx])


def records_of_split(records: Sequence[Record], split: str) -> list[Record]:
    return [r for r in records if r.split == split]
