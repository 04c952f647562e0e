"""The manifest of any supported layout (`--format auto|mvtec|folder|visa`), and auto-detection.

Every layout produces the same records as `mvtec.load_category` (paths, split, label, defect, category, mask),
so fitting, tuning, evaluation, the report and Serve never know which layout the images came from.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from distributed_anomaly.data import mvtec
from distributed_anomaly.data.folder import load_folder
from distributed_anomaly.data.layout import DataLayout
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.data.visa import SPLIT_CSV, load_visa, visa_root
from distributed_anomaly.errors import DatasetLayoutError, UserError

logger = logging.getLogger(__name__)


def detect_format(root: str | os.PathLike, layout: DataLayout | None = None) -> str:
    """mvtec, visa or folder, from what `root` holds; a clear error naming the three layouts otherwise."""
    root, layout = Path(root), layout or DataLayout()
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder {root} does not exist")
    if visa_root(root) is not None:
        return "visa"
    if mvtec.is_category_dir(root) or any(d.is_dir() and mvtec.is_category_dir(d) for d in root.iterdir()):
        return "mvtec"
    if layout.abnormal_dirs or (root / layout.normal_dir).is_dir():
        return "folder"
    raise DatasetLayoutError(
        f"cannot tell the layout of {root}: expected MVTec (train/good and test/, or a folder of such "
        f"categories), a folder of images ({layout.normal_dir}/ plus one folder per defect type), or VisA "
        f"(VISA_ROOT/<object> with VISA_ROOT/{SPLIT_CSV.as_posix()}); choose one with --format"
    )


def resolve_layout(root: str | os.PathLike, layout: DataLayout | None = None) -> DataLayout:
    """The layout with `auto` replaced by the detected format (said in one log line); folder options with
    another format are an error rather than silently ignored."""
    layout = layout or DataLayout()
    if layout.format == "auto":
        layout = replace(layout, format=detect_format(root, layout))
        logger.info(f"data: {layout.format} layout detected in {root} (--format to choose)")
    if layout.format != "folder" and layout.folder_options:
        raise UserError(f"{', '.join(layout.folder_options)} apply to --format folder, not {layout.format}")
    return layout


def load_dataset(
    root: str | os.PathLike, layout: DataLayout | None = None, *, require_test: bool = True
) -> list[Record]:
    """The manifest of `root` read as `layout` (default: auto-detected), its layout checked as it is built.

    require_test=False accepts data without a test split (a `synthetic_auroc` search needs normal images only).
    """
    layout = resolve_layout(root, layout)
    if layout.format == "mvtec":
        return mvtec.load_dataset(root, require_test=require_test)
    if layout.format == "visa":
        return load_visa(root, require_test=require_test)
    return load_folder(root, layout, require_test=require_test)
