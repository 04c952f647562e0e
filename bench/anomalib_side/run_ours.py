"""Our side of bench/compare_anomalib.py: runs in the project venv, through the package's Python API.

Builds the model with `rundir.build_model` and fits it with `training.fit_model` (PADIM's Gaussians, PatchCore's
streaming coreset bank, STFPM's student: the call `distributed-anomaly train` makes), timing the fit step alone
(wall and CPU); then scores the test split with `engine.anomaly_maps` and writes the raw maps to OUT/maps.npz and
the timings to OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", choices=("padim", "stfpm", "patchcore"), required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--layers", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--n-features", type=int)
    p.add_argument("--coreset-ratio", type=float, help="PatchCore: bank share of the patch embeddings")
    p.add_argument("--num-neighbors", type=int, help="PatchCore: neighbours of the image-score reweighting")
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, help="STFPM weight decay (default: the package default)")
    p.add_argument("--no-bn-recompute", action="store_true", help="STFPM: keep training's BN running averages")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    return p.parse_args()


def configs(a: argparse.Namespace) -> tuple:
    """The ModelConfig and resolved TrainConfig `distributed-anomaly train` would build from these options."""
    from distributed_anomaly.config import ModelConfig, TrainConfig

    layers = tuple(x for x in a.layers.split(",") if x)
    cfg = ModelConfig(
        a.model,
        a.backbone,
        layers,
        a.n_features if a.model == "padim" else None,
        a.image_size,
        a.seed,
        **({"coreset_ratio": a.coreset_ratio, "num_neighbors": a.num_neighbors} if a.model == "patchcore" else {}),
    )
    extra = {} if a.weight_decay is None else {"weight_decay": a.weight_decay}
    tcfg = TrainConfig(
        epochs=a.epochs,
        batch_size=a.batch_size,
        val_fraction=a.val_fraction,
        weights_file=a.weights,
        bn_recompute=not a.no_bn_recompute,
        **extra,
    ).resolved(cfg.model)
    return cfg, tcfg


def main() -> int:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from distributed_anomaly import engine, rundir
    from distributed_anomaly.config import Execution
    from distributed_anomaly.data.mvtec import load_dataset, records_of_split, split_train_val
    from distributed_anomaly.training import fit_model

    # The fit of distributed_anomaly.training.train (what `distributed-anomaly train` runs), minus
    # calibration/evaluation/saving, which would only add inference passes that anomalib's side does not do.
    cfg, tcfg = configs(a)
    records = load_dataset(a.data)
    test = records_of_split(records, "test")
    fit_records, val = split_train_val(records, tcfg.val_fraction, cfg.seed)
    model = rundir.build_model(cfg, pretrained=tcfg.pretrained, weights_file=tcfg.weights_file)
    info: dict = {"num_train_images": len(fit_records)}
    w0, c0 = time.perf_counter(), time.process_time()
    model, fit_info, history = fit_model(model, cfg, tcfg, fit_records, val, Execution(), "", progress=False)
    if history is not None:
        info.update(
            epochs_run=fit_info["epochs_run"],
            best_epoch=fit_info["best_epoch"],
            bn_recompute=tcfg.bn_recompute,
            train_loss=[round(h["train_loss"], 5) for h in history],
        )
    timing = {
        "fit_seconds": time.perf_counter() - w0,
        "fit_cpu_seconds": time.process_time() - c0,
        "fit_peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    w0, c0 = time.perf_counter(), time.process_time()
    maps = engine.anomaly_maps(model, test, cfg.image_size, tcfg.batch_size, progress=False)
    infer_s, infer_cpu = time.perf_counter() - w0, time.process_time() - c0
    np.savez(out / "maps.npz", paths=np.array([str(Path(r.path).resolve()) for r in test]), maps=maps)
    if a.model == "padim":
        np.save(out / "idx.npy", model.idx.numpy())
    result = {
        "tool": "ours",
        "model": a.model,
        "backbone": a.backbone,
        "num_train_images": info.get("num_train_images"),
        "num_test_images": len(test),
        **timing,
        "infer_seconds": infer_s,
        "infer_cpu_seconds": infer_cpu,
        "epochs": info.get("epochs_run", 1),
        "best_epoch": info.get("best_epoch"),
        "bn_recompute": info.get("bn_recompute"),
        "train_loss_per_epoch": info.get("train_loss"),
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "optimizer": {"lr": tcfg.lr, "momentum": tcfg.momentum, "weight_decay": tcfg.weight_decay},
    }
    if a.model == "patchcore":  # the bank's size and the streaming coreset's record (exact or merged, radius bound)
        result.update(bank_size=fit_info["coreset"]["bank_size"], coreset=fit_info["coreset"])
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
