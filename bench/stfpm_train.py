#!/usr/bin/env python3
"""Benchmark: STFPM training epoch time and images/s -- in process, on Ray Train (0 / 1 / 2 workers), anomalib.

    .venv/bin/python bench/stfpm_train.py                                   # demo washer, 128 px, 3 epochs
    .venv/bin/python bench/stfpm_train.py --data DIR --image-size 256 --epochs 5 --workers 0,1,2,4 --no-anomalib
    .venv/bin/python bench/stfpm_train.py --workers 0 --runtimes openvino,torch --no-anomalib   # the teacher's runtime

Same data (all of train/good, no validation pass, as anomalib's Engine.fit without a val loader), same backbone
(resnet18 layer1-3, seeded random torchvision weights: no download), same initial student, same epochs and
(global) batch size everywhere; the frozen teacher on each of --runtimes (OpenVINO, the default, or torch):

* "engine":      the in-process fit (training.fit_model, engine.train_stfpm; no Ray), torch with all the cores' threads.
* "ray wN":      distributed.stfpm_train.train_stfpm_ray with N Ray Train workers (N=0: Ray Train's local mode,
                 the loop in this process, data still through Ray Data); each worker runs torch with
                 cores // N threads and reserves that many logical CPUs.
* "anomalib":    anomalib's own STFPM (Lightning Engine, its loss/optimizer) in bench/.anomalib-venv, created
                 and cached by bench/compare_setup.py's ensure_anomalib_venv (reused, not duplicated).

Each configuration runs in its own subprocess, --repeat times (the best repetition is reported: on a shared
machine the minimum is the least disturbed). Reported: mean epoch seconds and images/s over the epochs after
the first (the first carries start-up: worker processes, Ray Data, Lightning), the first epoch's seconds, the
wall time of the whole training call (Ray: cluster already up; worker group start included) and the 1-minute
load average around the run (this machine's other users show up there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LAYERS = ("layer1", "layer2", "layer3")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- one configuration (subprocess)


def run_ours(a: argparse.Namespace) -> dict:
    import torch

    from distributed_anomaly import rundir
    from distributed_anomaly.config import Execution, ModelConfig, TrainConfig
    from distributed_anomaly.data.mvtec import load_dataset, records_of_split
    from distributed_anomaly.training import fit_model

    cores = a.cores
    fit = records_of_split(load_dataset(a.data), "train")
    cfg = ModelConfig(model="stfpm", backbone="resnet18", layers=LAYERS, image_size=a.image_size, seed=a.seed)
    tcfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, pretrained=False, val_fraction=0.0)
    tcfg = tcfg.resolved("stfpm")
    model = rundir.build_model(cfg, pretrained=False)
    start = time.perf_counter()
    if a.mode == "engine":
        torch.set_num_threads(cores)
        # training.fit_model in process, without the batch-norm recompute: the epochs alone are timed
        run = Execution(runtime=a.runtime)
        _, _, history = fit_model(model, cfg, replace(tcfg, bn_recompute=False), fit, [], run, "", False)
        wall = time.perf_counter() - start
    else:
        from distributed_anomaly.distributed import ray_session
        from distributed_anomaly.distributed.stfpm_train import train_stfpm_ray

        workers = a.workers
        threads = max(1, cores // max(workers, 1))
        if workers == 0:
            torch.set_num_threads(cores)
        # logical CPUs: the workers' reservation plus room for the decode tasks (0.25 CPU each)
        with ray_session(None, num_cpus=max(workers, 1) * threads + 1):
            start = time.perf_counter()
            _, info = train_stfpm_ray(
                cfg,
                tcfg,
                fit,
                [],
                workers=workers,
                storage=a.storage,
                run_name=f"bench_w{workers}_{os.getpid()}",
                resume_from=None,
                progress=False,
                model=model,
                use_gpu=False,
                cpus_per_worker=float(threads),
                runtime=a.runtime,
            )
            wall = time.perf_counter() - start
        history = info["history"]
    return {"images": len(fit), "history": history, "wall": wall}


# --------------------------------------------------------------------------- orchestration


def summarise(name: str, images: int, epoch_seconds: list[float], wall: float, note: str = "") -> dict:
    later = epoch_seconds[1:] or epoch_seconds
    mean = sum(later) / len(later)
    return {
        "name": name,
        "epoch_s": mean,
        "images_per_s": images / mean,
        "first_epoch_s": epoch_seconds[0],
        "wall_s": wall,
        "note": note,
        "load": os.getloadavg()[0],
    }


def best_of(repeat: int, fn, *args) -> dict:
    rows = []
    for _ in range(repeat):
        load = os.getloadavg()[0]
        row = fn(*args)
        row["load"] = f"{load:.0f}–{row['load']:.0f}" if round(load) != round(row["load"]) else f"{load:.0f}"
        rows.append(row)
    return min(rows, key=lambda r: r["epoch_s"])


def ours(a: argparse.Namespace, data: Path, mode: str, workers: int, work: Path, runtime: str) -> dict:
    out = work / f"{mode}_w{workers}_{runtime}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_one",
        mode,
        "--data",
        str(data),
        "--workers",
        str(workers),
        "--image-size",
        str(a.image_size),
        "--epochs",
        str(a.epochs),
        "--batch-size",
        str(a.batch_size),
        "--cores",
        str(a.cores),
        "--seed",
        str(a.seed),
        "--storage",
        str(work / "ray_train"),
        "--_out",
        str(out),
        "--runtimes",
        runtime,
    ]
    subprocess.run(cmd, check=True, cwd=REPO)
    r = json.loads(out.read_text())
    name = (
        "engine (in-process, no Ray)"
        if mode == "engine"
        else ("ray, workers=0 (local mode)" if workers == 0 else f"ray, {workers} worker{'s' if workers > 1 else ''}")
    )
    threads = a.cores if mode == "engine" or workers == 0 else max(1, a.cores // workers)
    return summarise(
        f"{name}, {runtime} teacher",
        r["images"],
        [h["seconds"] for h in r["history"]],
        r["wall"],
        f"{threads} torch thread(s)" + ("" if mode == "engine" or workers < 2 else " each"),
    )


def anomalib(a: argparse.Namespace, data: Path, work: Path) -> dict:
    sys.path.insert(0, str(HERE))
    from compare_setup import ANOMALIB_VERSION, DEFAULT_VENV, backbone_weights, ensure_anomalib_venv, student_init

    py = ensure_anomalib_venv(DEFAULT_VENV, ANOMALIB_VERSION)
    out = work / "anomalib"
    cmd = [
        str(py),
        str(HERE / "anomalib_side" / "run_anomalib.py"),
        "--data",
        str(data),
        "--model",
        "stfpm",
        "--backbone",
        "resnet18",
        "--weights",
        str(backbone_weights("resnet18", work, a.seed)),
        "--student-init",
        str(student_init("resnet18", work, a.seed)),
        "--layers",
        ",".join(LAYERS),
        "--image-size",
        str(a.image_size),
        "--epochs",
        str(a.epochs),
        "--batch-size",
        str(a.batch_size),
        "--threads",
        str(a.cores),
        "--workers",
        "0",
        "--seed",
        str(a.seed),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    r = json.loads((out / "result.json").read_text())
    per_epoch = r["fit_seconds"] / r["epochs"]  # Lightning gives the fit total; first epoch not separable
    row = summarise(
        f"anomalib {r['tool'].split()[-1]} (Lightning)",
        r["num_train_images"],
        [per_epoch],
        r["fit_seconds_with_setup"],
        f"{r['threads']} torch threads; mean over all epochs",
    )
    row["first_epoch_s"] = float("nan")
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| configuration | epoch s | images/s | first epoch s | training call s | load avg | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        first = "–" if r["first_epoch_s"] != r["first_epoch_s"] else f"{r['first_epoch_s']:.1f}"
        lines.append(
            f"| {r['name']} | {r['epoch_s']:.2f} | {r['images_per_s']:.1f} | {first} | "
            f"{r['wall_s']:.1f} | {r['load']} | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="MVTec category folder (default: demo washer, generated)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (split over the workers)")
    p.add_argument("--n-train", type=int, default=64, help="demo data only: training images")
    p.add_argument("--workers", default="0,1,2", help="Ray Train worker counts to run")
    p.add_argument("--runtimes", default="openvino", help="the teacher's runtimes to run (openvino, torch)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU cores to use in total")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest is reported")
    p.add_argument("--no-anomalib", action="store_true")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--_one", choices=("engine", "ray"), help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--storage", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._one:
        a.mode = a._one
        a.workers = int(a.workers)
        a.runtime = a.runtimes
        a._out.write_text(json.dumps(run_ours(a)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_stfpm_"))
    data = a.data
    if data is None:
        from distributed_anomaly.data.demo import generate

        generate(
            work / "demo",
            seed=0,
            categories=["washer"],
            image_size=max(a.image_size, 64),
            n_train=a.n_train,
            n_test_good=2,
            n_per_defect=1,
        )
        data = work / "demo" / "washer"
    data = data.resolve()
    log(
        f"data {data}, resnet18 {','.join(LAYERS)} at {a.image_size} px, {a.epochs} epochs, global batch "
        f"{a.batch_size}, {a.cores} cores, best of {a.repeat}; work folder {work}"
    )
    rows = []
    configs = [("engine", 0)] + [("ray", int(x)) for x in a.workers.split(",") if x != ""]
    for (mode, w), runtime in [(c, r) for c in configs for r in a.runtimes.split(",")]:
        log(f"[{time.strftime('%H:%M:%S')}] {mode} workers={w} teacher {runtime}")
        rows.append(best_of(a.repeat, ours, a, data, mode, w, work, runtime))
        log(f"    epoch {rows[-1]['epoch_s']:.2f} s, {rows[-1]['images_per_s']:.1f} images/s")
    if not a.no_anomalib:
        log(f"[{time.strftime('%H:%M:%S')}] anomalib")
        rows.append(best_of(a.repeat, anomalib, a, data, work))
        log(f"    epoch {rows[-1]['epoch_s']:.2f} s, {rows[-1]['images_per_s']:.1f} images/s")
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
