"""anomalib's side of bench/compare_anomalib.py: runs INSIDE the anomalib venv (bench/.anomalib-venv).

Fits anomalib's own PADIM, PatchCore or STFPM (its Lightning module, torch model, loss, optimizer, data module,
pre-processor and Engine) with a torchvision backbone whose weights come from a state-dict file, so both
tools see bit-identical features. Writes OUT/result.json (timings) and OUT/maps.npz (raw anomaly maps of
the test split, keyed by image path) for the orchestrator, which computes every metric the same way for
both tools.

What is swapped in, and why:
* backbone: anomalib builds timm models by name and downloads ImageNet weights from a model hub. Its
  TimmFeatureExtractor also accepts an nn.Module (it then uses torchvision's create_feature_extractor with
  the given node names), so we pass a torchvision network with the shared weights file loaded and the same
  taps as ours (features.3/6/13 or layer1/2/3).
* PADIM's random channel index: its `idx` buffer is overwritten with ours (same subset; order is
  irrelevant to the Mahalanobis distance).
* STFPM's student: anomalib builds it from the same backbone *name* with random timm init; with an
  nn.Module backbone it would share the teacher's parameters, so it is replaced by a torchvision network of
  the same architecture initialised from --student-init (the exact initial weights of our student).
Everything else (training loop, loss, optimizer hyper-parameters, PatchCore's embedding, k-center-greedy coreset
and scoring) is anomalib's own code.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision


def build_backbone(name: str, weights_file: str) -> torch.nn.Module:
    net = getattr(torchvision.models, name)(weights=None)
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("state_dict", state), strict=True)
    return net.eval()


def make_datamodule(data: Path, batch_size: int, workers: int, seed: int):
    from anomalib.data import MVTecAD

    dm = MVTecAD(
        root=str(data.parent),
        category=data.name,
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=workers,
        val_split_mode="none",
        seed=seed,
    )
    dm.setup()
    return dm


def check_features(a: argparse.Namespace, layers: list[str]) -> None:
    """Save the pre-processed first test image and the teacher's feature maps for the orchestrator."""
    from anomalib.models.components import TimmFeatureExtractor
    from anomalib.models.image.padim import Padim

    dm = make_datamodule(Path(a.data), 1, 0, a.seed)
    item = dm.test_data[0]
    pre = Padim.configure_pre_processor((a.image_size, a.image_size))
    image = pre.transform(item.image[None])
    fx = TimmFeatureExtractor(backbone=build_backbone(a.backbone, a.weights), layers=layers, pre_trained=False).eval()
    with torch.no_grad():
        feats = fx(image)
    out = {"input": image.numpy()}
    out.update({f"feat:{k}": v.numpy() for k, v in feats.items()})
    if a.student_init:
        sx = TimmFeatureExtractor(
            backbone=build_backbone(a.backbone, a.student_init), layers=layers, pre_trained=False
        ).eval()
        with torch.no_grad():
            out.update({f"student:{k}": v.numpy() for k, v in sx(image).items()})
    np.savez(Path(a.out) / "features.npz", path=np.array(str(item.image_path)), **out)


class FitTimer:
    """Lightning callback: wall time from the first training batch setup to the end of fitting."""

    def __init__(self) -> None:
        from lightning.pytorch import Callback

        class _CB(Callback):
            def on_train_start(cb, trainer, pl_module) -> None:
                self.start, self.cpu_start = time.perf_counter(), time.process_time()

            def on_train_end(cb, trainer, pl_module) -> None:
                self.end, self.cpu_end = time.perf_counter(), time.process_time()

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if isinstance(outputs, dict) and "loss" in outputs:
                    epoch = trainer.current_epoch
                    tot, n = self.losses.get(epoch, (0.0, 0))
                    self.losses[epoch] = (tot + float(outputs["loss"]), n + len(batch.image))

        self.start = self.end = self.cpu_start = self.cpu_end = None
        self.losses: dict[int, tuple[float, int]] = {}
        self.callback = _CB()

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_end - self.cpu_start


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", choices=("padim", "stfpm", "patchcore"), required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--weights", required=True, help="torchvision state dict of the (teacher) backbone")
    p.add_argument("--layers", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--n-features", type=int)
    p.add_argument("--idx", help=".npy with PADIM's channel index to use instead of anomalib's randperm")
    p.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore's coreset_sampling_ratio")
    p.add_argument("--num-neighbors", type=int, default=9, help="PatchCore's num_neighbors")
    p.add_argument("--student-init", help="torchvision state dict of the initial STFPM student")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--check-features", action="store_true")
    return p.parse_args()


def build_model(a: argparse.Namespace, layers: list[str]):
    """anomalib's Lightning module for --model with the shared backbone swapped in; (model, max_epochs)."""
    from anomalib.models import Padim, Patchcore, Stfpm
    from anomalib.models.components import TimmFeatureExtractor

    # PADIM's pre-processor (resize + ImageNet normalisation) for every model: ours' too. PatchCore's own default
    # is the same without a center crop, so this changes nothing there; it is named to make that explicit.
    pre = Padim.configure_pre_processor((a.image_size, a.image_size))
    common = dict(pre_processor=pre, post_processor=False, evaluator=False, visualizer=False)
    teacher = build_backbone(a.backbone, a.weights)
    if a.model == "padim":
        model = Padim(backbone=teacher, layers=layers, pre_trained=False, n_features=a.n_features, **common)
        if a.idx:
            idx = torch.from_numpy(np.load(a.idx)).long()
            if idx.numel() != model.model.idx.numel():
                raise SystemExit(f"--idx has {idx.numel()} entries, model expects {model.model.idx.numel()}")
            model.model.idx = idx
        return model, 1
    if a.model == "patchcore":
        model = Patchcore(
            backbone=teacher,
            layers=layers,
            pre_trained=False,
            coreset_sampling_ratio=a.coreset_ratio,
            num_neighbors=a.num_neighbors,
            **common,
        )
        return model, 1
    model = Stfpm(backbone=teacher, layers=layers, **common)
    student = (
        build_backbone(a.backbone, a.student_init)
        if a.student_init
        else getattr(torchvision.models, a.backbone)(weights=None)
    )
    # Train mode, as anomalib's own timm student is created. Lightning >= 2.2 no longer calls .train() on
    # the module at fit start (it only warns about submodules in eval mode), so a student left in eval
    # mode would train with frozen batch-norm statistics: a different algorithm from anomalib's.
    student.train()
    # A fresh torchvision student (see the module docstring); anomalib's own code trains it.
    model.model.student_model = TimmFeatureExtractor(
        backbone=student, layers=layers, pre_trained=False, requires_grad=True
    )
    return model, a.epochs


def fit(a: argparse.Namespace, model, max_epochs: int, dm, out: Path) -> tuple:
    """anomalib's Engine.fit, timed by a callback (train start..end: for PatchCore that holds the coreset
    selection, which MemoryBankMixin runs at the end of the training epoch); (engine, timer, wall s with setup)."""
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.engine import Engine

    timer = FitTimer()
    # save_top_k=0: anomalib's default checkpoint (written at the end of fit) is disk I/O, not fitting.
    no_ckpt = ModelCheckpoint(dirpath=str(out / "anomalib_results"), save_top_k=0)
    engine = Engine(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        callbacks=[timer.callback, no_ckpt],
        default_root_dir=str(out / "anomalib_results"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    engine.fit(model=model, train_dataloaders=dm.train_dataloader())
    return engine, timer, time.perf_counter() - t0


def predict(a: argparse.Namespace, engine, model, dm, out: Path) -> tuple[int, float, float]:
    """Score the test split; write OUT/maps.npz (and anomalib's own image scores where they are not the maps'
    maxima: PatchCore's pred_score). Returns (images, wall s, CPU s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    preds = engine.predict(model=model, dataloaders=dm.test_dataloader(), return_predictions=True)
    infer_s, infer_cpu = time.perf_counter() - t0, time.process_time() - c0
    paths, maps, scores = [], [], []
    for batch in preds:
        paths += [str(Path(p).resolve()) for p in batch.image_path]
        maps.append(
            batch.anomaly_map.detach().reshape(len(batch.image_path), a.image_size, a.image_size).float().numpy()
        )
        scores.append(batch.pred_score.detach().reshape(-1).float().numpy())
    extra = {"scores": np.concatenate(scores)} if a.model == "patchcore" else {}
    np.savez(out / "maps.npz", paths=np.array(paths), maps=np.concatenate(maps).astype(np.float32), **extra)
    return len(paths), infer_s, infer_cpu


def main() -> int:
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    layers = [x for x in a.layers.split(",") if x]
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "anomalib"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if a.check_features:
        check_features(a, layers)
        return 0

    import anomalib
    from lightning.pytorch import seed_everything

    seed_everything(a.seed, workers=True, verbose=False)
    model, max_epochs = build_model(a, layers)
    dm = make_datamodule(Path(a.data), a.batch_size, a.workers, a.seed)
    engine, timer, fit_total = fit(a, model, max_epochs, dm, out)
    fit_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_test, infer_s, infer_cpu = predict(a, engine, model, dm, out)
    result = {
        "tool": f"anomalib {anomalib.__version__}",
        "model": a.model,
        "backbone": a.backbone,
        "num_train_images": len(dm.train_data),
        "num_test_images": n_test,
        "fit_seconds": timer.seconds,
        "fit_cpu_seconds": timer.cpu_seconds,
        "fit_seconds_with_setup": fit_total,
        "infer_seconds": infer_s,
        "infer_cpu_seconds": infer_cpu,
        "epochs": max_epochs,
        "fit_peak_rss_mb_self": fit_rss_kb / 1024,
        "train_loss_per_epoch": [round(t / n, 5) for _, (t, n) in sorted(timer.losses.items())] or None,
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    if a.model == "stfpm":
        opt = model.configure_optimizers()
        result["optimizer"] = {k: v for k, v in opt.defaults.items() if isinstance(v, (int, float, bool))}
    if a.model == "patchcore":
        result["bank_size"] = int(model.model.memory_bank.shape[0])
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
