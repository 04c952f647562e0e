"""What a search is: its request (stored in TUNE_DIR/request.json, so --resume needs nothing else) and the
files it writes. Torch- and Ray-free: the command line reads its defaults from TuneRequest."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from distributed_anomaly import storage
from distributed_anomaly.data.layout import DataLayout
from distributed_anomaly.errors import UserError
from distributed_anomaly.tuning.space import SearchSpace
from distributed_anomaly.tuning.space_file import parse_space

REQUEST, STUDY_DB, EXPERIMENT, RESULTS_CSV, SUMMARY, REPORT, BEST = (
    "request.json",
    "study.db",
    "search",
    "results.csv",
    "summary.json",
    "report.html",
    "best",
)
SEARCH_METRICS = "search_metrics.json"  # in each trial's run directory: the objective values it reached
TUNE_INFO = "tune.json"  # in best/: which trial, why, on which images
STUDY_NAME = "distributed-anomaly"
OBJECTIVES = {
    "val_auroc": "image AUROC on the search part of the test split (labelled anomalies)",
    "synthetic_auroc": "image AUROC of held-out normal images vs. copies with synthetic defects (no labels needed)",
}


@dataclass(frozen=True)
class TuneRequest:
    """Everything a search needs, stored in TUNE_DIR/request.json (so --resume needs nothing else)."""

    data: str
    space_file: str
    space_text: str
    samples: int
    fixes: tuple[str, ...] = ()
    objective: str = "auto"
    workers: int = 1
    max_concurrent: int | None = None
    seed: int = 0
    val_fraction: float = 0.2
    search_fraction: float = 0.5
    synthetic_copies: int = 3
    pretrained: bool = True
    weights: tuple[tuple[str, str], ...] = ()  # (backbone, local weights file)
    grace_epochs: int = 2
    reduction_factor: int = 3
    storage: str | None = None  # the shared counterpart of TUNE_DIR (path or URI); None: TUNE_DIR itself
    data_layout: DataLayout = field(
        default_factory=DataLayout
    )  # how `data` is laid out; resolved (never auto) once the search starts

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise UserError(f"--samples must be >= 1, got {self.samples}")
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1 (each trial fits on Ray), got {self.workers}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise UserError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(
                f"--val-fraction must be in (0, 1) for a search: the held-out normal images calibrate "
                f"the thresholds and carry the synthetic defects; got {self.val_fraction}"
            )
        if self.objective not in ("auto", *OBJECTIVES):
            raise UserError(f"unknown objective {self.objective!r}; choose auto, {', '.join(OBJECTIVES)}")
        if self.synthetic_copies < 1:
            raise UserError(f"--synthetic-copies must be >= 1, got {self.synthetic_copies}")
        if self.grace_epochs < 1 or self.reduction_factor < 2:
            raise UserError("--grace-epochs must be >= 1 and --reduction-factor >= 2")
        for backbone, path in self.weights:
            if not Path(path).is_file():
                raise UserError(f"--weights {backbone}={path}: file does not exist")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fixes"], d["weights"] = list(self.fixes), [list(w) for w in self.weights]
        d["data_layout"] = self.data_layout.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TuneRequest:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown keys in {REQUEST}: {', '.join(sorted(unknown))}")
        d = dict(d)
        d["fixes"] = tuple(d.get("fixes", ()))
        d["weights"] = tuple(tuple(w) for w in d.get("weights", ()))
        d["data_layout"] = DataLayout.from_dict(d.get("data_layout"))
        return cls(**d)

    def space(self) -> SearchSpace:
        return parse_space(self.space_text, self.space_file).fix(self.fixes)

    def storage_root(self, out: str | os.PathLike) -> str:
        """Tune's storage_path: where search/ lives (the shared storage, or TUNE_DIR)."""
        return self.storage or str(Path(out).resolve())

    def experiment(self, out: str | os.PathLike) -> str:
        return storage.join(self.storage_root(out), EXPERIMENT)
