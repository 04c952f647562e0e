"""How a `--data` folder is laid out (`--format` and the folder options), as a small serialisable value.

Torch-free and filesystem-free, so the command line and a search request (TuneRequest) can hold it; it is
stored beside the data path in RUN_DIR/config.json and TUNE_DIR/request.json, so `evaluate`, `export` and a
resumed search read the data the way training did. `data.dataset` detects the format and builds the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from distributed_anomaly.errors import UserError

FORMATS = ("auto", "mvtec", "folder", "visa")
DEFAULT_NORMAL_DIR = "good"
DEFAULT_MASK_DIR = "masks"  # `folder`: used when present and no --mask-dir is given
DEFAULT_HOLDOUT = 0.2


@dataclass(frozen=True)
class DataLayout:
    """`format` and, for `folder`, which sub-folders hold what and how many normal images go to the test split.

    folder: `normal_dir` (default good/) holds normal images; `abnormal_dirs` (default: every other sub-folder
    but the mask folder) one defect type each; `mask_dir` optional masks; `holdout` the share of normal images
    held out (seeded) as the normal part of the test split. Paths are relative to the data folder or absolute.
    """

    format: str = "auto"
    normal_dir: str = DEFAULT_NORMAL_DIR
    abnormal_dirs: tuple[str, ...] = ()
    mask_dir: str | None = None
    holdout: float = DEFAULT_HOLDOUT

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"unknown data format {self.format!r}; choose one of: {', '.join(FORMATS)}")
        if not 0.0 <= self.holdout < 1.0:
            raise UserError(f"--holdout must be in [0, 1), got {self.holdout}")
        object.__setattr__(self, "abnormal_dirs", tuple(self.abnormal_dirs))

    @property
    def folder_options(self) -> list[str]:
        """The folder-only options set away from their defaults (an error with any other format)."""
        given = {
            "--normal-dir": self.normal_dir != DEFAULT_NORMAL_DIR,
            "--abnormal-dir": bool(self.abnormal_dirs),
            "--mask-dir": self.mask_dir is not None,
            "--holdout": self.holdout != DEFAULT_HOLDOUT,
        }
        return [name for name, set_ in given.items() if set_]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["abnormal_dirs"] = list(self.abnormal_dirs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DataLayout:
        """From to_dict's form; None (a run or search written before --format existed) means auto-detection."""
        if d is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown data layout keys: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if k == "abnormal_dirs" else v for k, v in d.items()})
