"""The `visa` layout: VisA (Zou et al., 2022) as published, split by its one-class CSV.

    VISA_ROOT/split_csv/1cls.csv   columns object, split (train | test), label (normal | anomaly), image, mask;
                                   image and mask paths relative to VISA_ROOT, e.g.
                                   candle/Data/Images/Normal/0000.JPG, candle/Data/Masks/Anomaly/000.png
    VISA_ROOT/<object>/Data/...    the images and masks (any non-zero mask pixel is anomalous)

`--data VISA_ROOT/candle` reads one object; `--data VISA_ROOT` all of them (each keeps its category). VisA names
no defect types, so every anomalous image has defect "anomaly". The records are those `mvtec.load_category`
makes, so everything downstream is unchanged.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from distributed_anomaly.data.mvtec import GOOD, Record
from distributed_anomaly.errors import DatasetLayoutError

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}
ANOMALY = "anomaly"


def visa_root(root: Path) -> tuple[Path, str | None] | None:
    """(VISA_ROOT, the object asked for or None for all) when `root` is a VisA root or object folder."""
    if (root / SPLIT_CSV).is_file():
        return root, None
    if (root.parent / SPLIT_CSV).is_file():
        return root.parent, root.name
    return None


def _read_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of the split file, its header checked."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetLayoutError(
                    f"{csv_path} lacks the column(s) {', '.join(missing)}: expected {', '.join(COLUMNS)}"
                )
            return [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetLayoutError(f"cannot read {csv_path}: {exc}") from exc


def _record(base: Path, csv_path: Path, line: int, row: dict[str, str]) -> Record:
    where = f"{csv_path} line {line}"
    split, label = row["split"].lower(), row["label"].lower()
    if split not in ("train", "test"):
        raise DatasetLayoutError(f"{where}: split {row['split']!r} is neither train nor test")
    if label not in LABELS:
        raise DatasetLayoutError(f"{where}: label {row['label']!r} is neither normal nor anomaly")
    if split == "train" and label != "normal":
        raise DatasetLayoutError(f"{where}: an anomalous training image; the models learn from normal images only")
    image = base / row["image"]
    if not row["image"] or not image.is_file():
        raise DatasetLayoutError(f"{where}: image {image} does not exist")
    mask = None
    if label == ANOMALY:
        mask = base / row["mask"]
        if not row["mask"] or not mask.is_file():
            raise DatasetLayoutError(f"{where}: anomalous image {image} has no mask: expected {mask}")
    defect = ANOMALY if label == ANOMALY else GOOD
    return Record(str(image), split, LABELS[label], defect, row["object"], str(mask) if mask else None)


def load_visa(root: str | os.PathLike, *, require_test: bool = True) -> list[Record]:
    """The manifest of a VisA object folder (or of every object under VISA_ROOT), checked row by row."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder {root} does not exist")
    found = visa_root(root)
    if found is None:
        raise DatasetLayoutError(
            f"{root} is not a VisA folder: expected {root / SPLIT_CSV} or {root.parent / SPLIT_CSV}"
        )
    base, wanted = found
    csv_path = base / SPLIT_CSV
    rows = _read_rows(csv_path)
    objects = sorted({r["object"] for _, r in rows})
    chosen = [(line, r) for line, r in rows if wanted is None or r["object"] == wanted]
    if not chosen:
        raise DatasetLayoutError(
            f"{csv_path} has no rows for object {wanted!r} (the folder name); objects there: {', '.join(objects)}"
        )
    records = [_record(base, csv_path, line, r) for line, r in chosen]
    for obj in sorted({r.category for r in records}):
        splits = {r.split for r in records if r.category == obj}
        if "train" not in splits:
            raise DatasetLayoutError(f"{csv_path}: object {obj!r} has no training images")
        if require_test and "test" not in splits:
            raise DatasetLayoutError(f"{csv_path}: object {obj!r} has no test images")
    return records
