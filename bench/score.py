"""`score` on Ray Data (one node, an actor pool of OpenVINO replicas) vs `predict` in one process, same run.

    .venv/bin/python bench/score.py [--work /tmp/da_score_bench] [--images 200] [--size 256] [--actors N]

Makes what it needs under --work if missing (demo washer data with `distributed-anomaly synth`, a PADIM
MobileNetV2 run, its fp32 export) and copies --images of its test and train images (repeated beyond 236) into
one folder. Then, in this order: `predict` (this process, OpenVINO on all cores, a JSON and an overlay per
image, as the command writes them), `score`'s per-batch scorer in this process (the same rows, no Ray, OpenVINO
on all cores) and `score` (a local Ray started here with the machine's CPUs, --actors
replicas of 1 CPU each, one Parquet table, no masks). For each: wall seconds end to end (model load, Ray start
and actor start included) and CPU seconds of this process and every process it started (Ray's included,
sampled every 0.2 s), per image. The load average is printed before and after: on a shared machine compare
the CPU-time ratio, not images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distributed_anomaly import batch_scoring as bs  # noqa: E402
from distributed_anomaly.config import ScoreJob  # noqa: E402
from distributed_anomaly.distributed.batch_score import score  # noqa: E402
from distributed_anomaly.export import export_run  # noqa: E402
from distributed_anomaly.models.backbones import offline_mobilenet_weights  # noqa: E402
from distributed_anomaly.predict import predict  # noqa: E402


def cli(*args: str) -> None:
    print("$ distributed-anomaly " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(
        [sys.executable, "-m", "distributed_anomaly", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )


def prepare(work: Path, size: int, n: int) -> tuple[Path, Path]:
    """(IR folder, a folder of n images)."""
    data = work / "data" / "washer"
    if not (data / "train").is_dir():
        cli("synth", str(work / "data"), "--image-size", str(size), "--n-train", "200", "-q")
    run, ir = work / "run", work / "ir"
    if not (run / "config.json").is_file():
        weights = offline_mobilenet_weights()
        extra = ["--weights", str(weights)] if weights else []
        cli("train", "--data", str(data), "--model", "padim", "--backbone", "mobilenet_v2", "--image-size",
            str(size), "--out", str(run), "--overwrite", "-q", *extra)  # fmt: skip
    if not (ir / "metadata.json").is_file():
        export_run(run, ir)
    images = work / f"images_{n}"
    if not images.is_dir() or len(list(images.iterdir())) != n:
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir()
        pool = sorted(data.glob("test/*/*.png")) + sorted(data.glob("train/good/*.png"))
        for i in range(n):  # the demo's 236 images, repeated as needed (throughput only)
            shutil.copy(pool[i % len(pool)], images / f"{i:05d}.png")
    return ir, images


class TreeCpu:
    """CPU seconds of this process and all its descendants while running, sampled (processes that end between
    two samples lose at most one period)."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.seen, self.stop = period, {}, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                self.seen[p.pid] = t.user + t.system
            except psutil.Error:
                pass

    def _loop(self) -> None:
        while not self.stop.wait(self.period):
            self._sample()

    def __enter__(self) -> TreeCpu:
        self._sample()
        self.start = dict(self.seen)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(v - self.start.get(pid, 0.0) for pid, v in self.seen.items())


def measure(name: str, fn, n: int) -> dict:
    t0 = time.monotonic()
    with TreeCpu() as cpu:
        fn()
    wall = time.monotonic() - t0
    out = {"what": name, "images": n, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 2),
           "cpu_s": round(cpu.seconds, 2), "cpu_ms_per_image": round(1000 * cpu.seconds / n, 1)}  # fmt: skip
    print(json.dumps(out), flush=True)
    return out


def in_process(ir: Path, images: Path, batch_size: int) -> None:
    """score's rows without Ray: its per-batch function in this process, OpenVINO on all cores, same blocks."""
    files = bs.read_ir_files(ir)
    scorer = bs.BatchScorer.from_ir_files(files, None, data=str(images), out="", task="segmentation", masks=False,
                                          model_version="bench", run_id="bench")  # fmt: skip
    paths = bs.list_images(str(images))
    for start in range(0, len(paths), batch_size):
        scorer.score_table(paths[start : start + batch_size])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/da_score_bench"))
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--actors", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)
    ir, images = prepare(a.work, a.size, a.images)
    load_before = os.getloadavg()
    print(f"load average before: {load_before}; cores: {os.cpu_count()}", flush=True)
    out = a.work / "outputs"
    shutil.rmtree(out, ignore_errors=True)
    rows = [
        measure("predict, one process", lambda: predict(ir, [images], out / "predict", batch_size=8), a.images),
        measure(
            "score's per-batch scorer, one process, no Ray", lambda: in_process(ir, images, a.batch_size), a.images
        ),
        measure(
            f"score, Ray Data, {a.actors} actors x 1 CPU",
            lambda: score(
                ScoreJob(str(ir), str(images), str(out / "score"), actors=a.actors, batch_size=a.batch_size),
                progress=False,
            ),
            a.images,
        ),
    ]
    load_after = os.getloadavg()
    ratio = {
        "images_per_s": round(rows[2]["images_per_s"] / rows[0]["images_per_s"], 3),
        "cpu_per_image": round(rows[2]["cpu_ms_per_image"] / rows[0]["cpu_ms_per_image"], 3),
        "vs_in_process_images_per_s": round(rows[2]["images_per_s"] / rows[1]["images_per_s"], 3),
        "vs_in_process_cpu_per_image": round(rows[2]["cpu_ms_per_image"] / rows[1]["cpu_ms_per_image"], 3),
    }
    print(f"load average after: {load_after}; score / predict: {ratio}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"rows": rows, "ratio": ratio, "load_before": load_before,
                                      "load_after": load_after, "cores": os.cpu_count(), "args": vars(a)},
                                     indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
