"""STFPM training checkpoints: what one holds, where they are kept in-process, which run to resume (Ray-free).

A checkpoint is a folder with STATE_FILE: the student's weights, the optimizer, the epoch, the early-stopping
state, the history and the torch RNG -- everything a restarted or resumed loop needs to continue as if it had
never stopped. With Ray workers, Ray Train keeps the folders (CheckpointConfig) and records them in
RAY_SNAPSHOT; in-process (workers=0, Ray Train's local mode keeps none) LocalStore keeps them under the run
folder with its own index, LOCAL_INDEX. The two kinds cannot continue each other.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distributed_anomaly import engine
from distributed_anomaly import storage as shared
from distributed_anomaly.errors import UserError
from distributed_anomaly.fileio import write_json
from distributed_anomaly.models.stfpm import Stfpm

STATE_FILE = "state.pt"
LOCAL_INDEX = "local_checkpoints.json"  # workers=0: our own checkpoint index (Ray keeps none in local mode)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


@dataclass
class TrainProgress:
    """Where a training loop stands: saved in every checkpoint, restored after a failure or by a resume."""

    stopper: engine.EarlyStopping
    history: list[dict] = field(default_factory=list)  # engine.EpochResult dicts, each epoch once
    images_per_epoch: list[int] = field(default_factory=list)
    empty_steps_per_epoch: list[int] = field(default_factory=list)  # steps a rank took with no image, all ranks
    # Loop starts from a checkpoint: after a worker failure within this call, or by resume_from (a new call).
    restores: dict[str, int] = field(default_factory=lambda: {"failures": 0, "resumes": 0})
    start_epoch: int = 0
    stopped_early: bool = False

    def record(self, result: engine.EpochResult, images: int, empty_steps: int) -> None:
        self.history.append(asdict(result))
        self.images_per_epoch.append(int(images))
        self.empty_steps_per_epoch.append(int(empty_steps))

    def summary(self, world_size: int) -> dict:
        """What the loop returns to the driver (rank 0's)."""
        has_best = self.stopper.best_epoch >= 0
        return {
            "history": self.history,
            "images_per_epoch": self.images_per_epoch,
            "empty_steps_per_epoch": self.empty_steps_per_epoch,
            "best_epoch": self.stopper.best_epoch if has_best else len(self.history) - 1,
            "best_val_loss": self.stopper.best if has_best else None,
            "stopped_early": self.stopped_early,
            "restores": self.restores,
            "start_epoch": self.start_epoch,
            "world_size": world_size,
        }


def state_dict(
    model: Stfpm, optimizer: torch.optim.Optimizer, progress: TrainProgress, epoch: int, fit_id: str
) -> dict:
    """A checkpoint's content after `epoch` (tensors, numbers, lists: loadable with weights_only=True)."""
    return {
        "student": {k: v.detach().cpu() for k, v in model.student.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "stopper": asdict(progress.stopper),
        "history": progress.history,
        "images_per_epoch": progress.images_per_epoch,
        "empty_steps_per_epoch": progress.empty_steps_per_epoch,
        "restores": progress.restores,
        "fit_id": fit_id,
        "stopped_early": progress.stopped_early,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }


def save_state(folder: str | os.PathLike, state: dict) -> None:
    torch.save(state, Path(folder) / STATE_FILE)


def load_state(checkpoint_dir: str | os.PathLike) -> dict:
    """A checkpoint's state (tensors, numbers, lists: loaded with weights_only=True, nothing arbitrary)."""
    return torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)


def restore(state: dict, model: Stfpm, optimizer: torch.optim.Optimizer, patience: int, fit_id: str) -> TrainProgress:
    """Load a checkpoint's state into the model, optimizer and RNG; count it as a failure restart (same
    fit_id: this call of train_stfpm_ray) or a resume (a later call). Patience is the caller's."""
    model.student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    restores = dict(state["restores"])
    restores["failures" if state["fit_id"] == fit_id else "resumes"] += 1
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return TrainProgress(
        stopper=engine.EarlyStopping(**{**state["stopper"], "patience": patience}),
        history=list(state["history"]),
        images_per_epoch=list(state["images_per_epoch"]),
        empty_steps_per_epoch=list(state["empty_steps_per_epoch"]),
        restores=restores,
        start_epoch=state["epoch"] + 1,
        stopped_early=state["stopped_early"],
    )


class LocalStore:
    """workers=0: checkpoints under RUN/checkpoint_epochNNNN with an index; best `keep` by score + the latest."""

    def __init__(self, root: str | os.PathLike, keep: int, scored: bool) -> None:
        self.root, self.keep, self.scored = Path(root), keep, scored
        self.index_path = self.root / LOCAL_INDEX

    def entries(self) -> list[dict]:
        if not self.index_path.is_file():
            return []
        return json.loads(self.index_path.read_text())["checkpoints"]

    def latest(self) -> Path | None:
        e = self.entries()
        return self.root / max(e, key=lambda d: d["epoch"])["dir"] if e else None

    def of_epoch(self, epoch: int) -> Path | None:
        found = [e for e in self.entries() if e["epoch"] == epoch]
        return self.root / found[0]["dir"] if found else None

    def add(self, src: Path, epoch: int, score: float | None) -> Path:
        """Move the folder `src` in as epoch's checkpoint; drop those no longer kept (index written first)."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"checkpoint_epoch{epoch:04d}"
        dst = self.root / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.move(str(src), dst)
        entries = [e for e in self.entries() if e["dir"] != name] + [{"dir": name, "epoch": epoch, "score": score}]
        latest = max(entries, key=lambda d: d["epoch"])
        key = (
            (lambda d: (d["score"] if d["score"] is not None else math.inf, d["epoch"]))
            if self.scored
            else (lambda d: -d["epoch"])
        )
        kept = sorted(entries, key=key)[: self.keep]
        if latest not in kept:
            kept.append(latest)
        write_json(self.index_path, {"checkpoints": kept})  # index first: it never names a deleted folder
        for e in entries:
            if e not in kept:
                shutil.rmtree(self.root / e["dir"], ignore_errors=True)
        return dst


def find_run(resume_from: str, local: bool) -> str:
    """The run folder to resume: RESUME itself, or one run folder directly inside it (or in RESUME/ray_train)."""
    marker = LOCAL_INDEX if local else RAY_SNAPSHOT
    if shared.exists(shared.join(resume_from, marker)):
        return resume_from
    if not shared.is_uri(resume_from):
        for parent in (Path(resume_from), Path(resume_from) / "ray_train"):
            found = sorted(p for p in parent.glob(f"*/{marker}")) if parent.is_dir() else []
            if len(found) == 1:
                return str(found[0].parent)
            if len(found) > 1:
                raise UserError(
                    f"{parent} holds several training runs ({', '.join(p.parent.name for p in found)}); "
                    "pass the one to resume"
                )
    other = RAY_SNAPSHOT if local else LOCAL_INDEX
    if shared.exists(shared.join(resume_from, other)):
        raise UserError(
            f"{resume_from} was trained {'on Ray workers' if local else 'in-process (workers=0)'}; "
            f"resume it with {'workers >= 1' if local else 'workers=0'}"
        )
    raise UserError(f"nothing to resume in {resume_from}: no {marker} (is it a training run folder?)")


def best_state(result: Any, run_path: str, best_epoch: int, store: LocalStore | None) -> dict:
    """The state of the best epoch's checkpoint: from `store` (workers=0) or Ray Train's Result."""
    if store is not None:
        folder = store.of_epoch(best_epoch)
        if folder is None:
            raise RuntimeError(f"the checkpoint of the best epoch {best_epoch} is missing from {run_path}")
        return load_state(folder)
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m.get("epoch") == best_epoch]
    if not candidates:
        kept = sorted(m.get("epoch") for _, m in (result.best_checkpoints or []))
        raise RuntimeError(f"the checkpoint of the best epoch {best_epoch} was not kept (kept epochs: {kept})")
    with candidates[-1][0].as_directory() as d:
        return load_state(d)
