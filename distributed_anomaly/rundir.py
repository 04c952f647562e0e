"""The run directory: everything needed to use a trained model, and nothing that needs unpickling.

RUN_DIR/config.json        model + training configuration, package version
RUN_DIR/model.safetensors  all weights and buffers (backbone included, so no download at load time)
RUN_DIR/postprocess.json   thresholds and normalisation
RUN_DIR/metrics.json       test-split metrics
RUN_DIR/history.json       per-epoch losses (STFPM)
RUN_DIR/request.json       the train call itself, written first: what `train --resume RUN_DIR` continues
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distributed_anomaly import __version__
from distributed_anomaly.config import ModelConfig, TrainConfig, from_dict, to_dict
from distributed_anomaly.errors import RunDirError
from distributed_anomaly.fileio import atomic_write, read_json, write_json
from distributed_anomaly.models.padim import Padim
from distributed_anomaly.models.patchcore import PatchCore
from distributed_anomaly.models.stfpm import Stfpm
from distributed_anomaly.postprocess import POSTPROCESS_FILE, PostProcessor

CONFIG, WEIGHTS, METRICS, HISTORY, REQUEST = (
    "config.json",
    "model.safetensors",
    "metrics.json",
    "history.json",
    "request.json",
)
POSTPROCESS = POSTPROCESS_FILE


def build_model(
    cfg: ModelConfig, *, pretrained: bool = True, weights_file: str | None = None
) -> Padim | Stfpm | PatchCore:
    weights = {"pretrained": pretrained, "weights_file": weights_file, "seed": cfg.seed}
    features = (cfg.backbone, cfg.layers, cfg.n_features, cfg.image_size)
    if cfg.model == "patchcore":
        return PatchCore(*features, coreset_ratio=cfg.coreset_ratio, num_neighbors=cfg.num_neighbors, **weights)
    if cfg.model == "padim":
        return Padim(*features, **weights)
    return Stfpm(cfg.backbone, cfg.layers, cfg.image_size, **weights)


def save_weights(path: str | os.PathLike, module: torch.nn.Module) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def save_model(
    run_dir: str | os.PathLike,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    module: torch.nn.Module,
    post: PostProcessor,
    info: dict | None = None,
) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(run_dir / WEIGHTS, module)
    write_json(run_dir / POSTPROCESS, post.to_dict())
    # config last: its presence marks a complete run directory.
    write_json(
        run_dir / CONFIG,
        {"version": __version__, "model": to_dict(model_cfg), "train": to_dict(train_cfg), "info": info or {}},
    )
    return run_dir


def load_config(run_dir: str | os.PathLike) -> tuple[ModelConfig, TrainConfig, dict]:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory: {CONFIG} is missing (was training interrupted?)")
    try:
        d = read_json(path)
        return from_dict(ModelConfig, d["model"]), from_dict(TrainConfig, d["train"]), d.get("info", {})
    except (KeyError, ValueError, TypeError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from exc


def load_model(run_dir: str | os.PathLike) -> tuple[ModelConfig, Padim | Stfpm | PatchCore, PostProcessor]:
    """Rebuild the module from config.json and model.safetensors (no pretrained download needed)."""
    run_dir = Path(run_dir)
    cfg, _, _ = load_config(run_dir)
    for name in (WEIGHTS, POSTPROCESS):
        if not (run_dir / name).is_file():
            raise RunDirError(f"run directory {run_dir} is missing {name}")
    module = build_model(cfg, pretrained=False)
    try:
        module.load_state_dict(load_file(run_dir / WEIGHTS), strict=True)
    except (RuntimeError, OSError) as exc:
        raise RunDirError(f"weights in {run_dir / WEIGHTS} do not match config.json: {exc}") from exc
    module.eval()
    return cfg, module, PostProcessor.from_dict(read_json(run_dir / POSTPROCESS))
