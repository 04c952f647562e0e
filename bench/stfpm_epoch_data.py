"""Benchmark: STFPM's training data pipeline on Ray Data, its epochs run cold and warm, two ways of reshuffling.

    .venv/bin/python bench/stfpm_epoch_data.py [--images 24] [--epochs 3] [--rounds 2]

"blocks": stfpm_train's pipeline (each block takes its share of the epoch's seeded permutation,
distributed/shards.py). "all-to-all": the same pipeline with Ray Data's random_shuffle of the paths instead
(what it used before), built here as the reference. Each (way, round) runs in a fresh process with a fresh local
Ray of 4 logical CPUs, so the first pass is what a new run on a cold cluster pays (the task processes to start);
the second pass is the same dataset again on the warm cluster. Figures: wall seconds and CPU-seconds over the
pass of the process and its Ray (the local Ray is its child), and the Ray worker processes after it. How many task
processes Ray starts on a cold cluster depends on timing, so run several rounds. Nothing else should run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, math, sys, time
import psutil, ray
from distributed_anomaly.data.decode import decode_batch
from distributed_anomaly.data.mvtec import load_dataset, records_of_split
from distributed_anomaly.distributed import ensure_ray, stfpm_train
from distributed_anomaly.distributed.cpus import STFPM_DECODE_CPUS

way, root, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
ensure_ray(None, num_cpus=4)
time.sleep(3)  # the prestarted workers are up
records = records_of_split(load_dataset(root), "train")

def tree():
    me = psutil.Process()
    return [me, *me.children(recursive=True)]

def cpu():
    total = 0.0
    for p in tree():
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return total

def workers():
    count = 0
    for p in tree():
        try:
            count += p.cmdline()[0].startswith("ray::")
        except (psutil.Error, IndexError):
            pass
    return count

def all_to_all():
    items = [{"idx": i, "path": r.path} for i, r in enumerate(records)]
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / 4))
    ds = ds.random_shuffle(seed=ray.data.RandomSeedConfig(seed=0, reseed_after_execution=True),
                           num_cpus=STFPM_DECODE_CPUS)
    ds = ds.map_batches(decode_batch, fn_kwargs={"image_size": 64}, batch_size=None, batch_format="numpy",
                        num_cpus=STFPM_DECODE_CPUS, concurrency=2)
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return ds

out = []
for run in ("cold", "warm"):
    c0, t0 = cpu(), time.perf_counter()
    ds = stfpm_train._datasets(records, [], 64, 4, 0, 2)["train"] if way == "blocks" else all_to_all()
    for _ in range(epochs):
        n = sum(len(b["idx"]) for b in ds.iter_batches(batch_size=None))
    assert n == len(records)
    out.append({"run": run, "wall_s": time.perf_counter() - t0, "cpu_s": cpu() - c0, "ray_processes": workers()})
print(json.dumps(out))
ray.shutdown()
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24, help="normal training images (demo washer, 64 px)")
    ap.add_argument("--epochs", type=int, default=3, help="executions of the dataset per pass")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of both ways, in turns")
    ap.add_argument("--work", default="/tmp/distributed_anomaly_bench/stfpm_epoch_data")
    a = ap.parse_args(argv)
    from distributed_anomaly.data.demo import generate

    root = Path(a.work) / f"demo_{a.images}"
    if not (root / "washer").is_dir():
        generate(root, seed=0, image_size=64, n_train=a.images, n_test_good=2, n_per_defect=1)
    print(f"{a.images} images, {a.epochs} epochs a pass, fresh local Ray (4 logical CPUs) per row, {time.ctime()}")
    print("| way | round | pass | wall s | CPU-s | Ray processes after |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for rnd in range(a.rounds):
        for way in ("all-to-all", "blocks") if rnd % 2 == 0 else ("blocks", "all-to-all"):
            child = subprocess.run(
                [sys.executable, "-c", CHILD, way, str(root / "washer"), str(a.epochs)],
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode != 0:
                print(child.stderr[-3000:], file=sys.stderr)
                return 1
            for row in json.loads(child.stdout.strip().splitlines()[-1]):
                print(
                    f"| {way} | {rnd} | {row['run']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
                    f"{row['ray_processes']} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
