"""Several OpenVINO processes on one node, threads pinned to cores (OpenVINO's default) or not.

    .venv/bin/python bench/openvino_pinning.py [--model IR_DIR] [--processes 2] [--threads 1] [--seconds 8]

Each process compiles the IR with --threads threads and scores a batch of 8 images (network only) for
--seconds, all starting together; it prints each process's images/s, pinned and unpinned. This is the Serve
node with two replicas, or a replica beside a Ray worker. Without --model it uses the demo export that
bench/serve_load.py makes (run that first, or pass --model).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(ir: str, threads: int, pin: bool, seconds: float, barrier, out) -> None:
    import numpy as np

    from distributed_anomaly.inference import OpenVINOInferencer

    inf = OpenVINOInferencer(ir, num_threads=threads, config={"ENABLE_CPU_PINNING": pin})
    x = np.random.default_rng(0).standard_normal((8, 3, inf.image_size, inf.image_size)).astype(np.float32)
    inf.anomaly_maps(x)  # warm-up
    barrier.wait()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        inf.anomaly_maps(x)
        n += len(x)
    out.put(n / (time.perf_counter() - t))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/da_bench/ir/padim_256_fp32"))
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OpenVINO threads per process")
    ap.add_argument("--seconds", type=float, default=8.0)
    a = ap.parse_args(argv)
    if not (a.model / "model.xml").is_file():
        ap.error(f"{a.model} is not an export (run bench/serve_load.py once, or pass --model)")
    ctx = mp.get_context("spawn")
    print(f"{a.processes} processes x {a.threads} OpenVINO thread(s), {os.cpu_count()} cores, {a.model}")
    for pin in (True, False):
        barrier, out = ctx.Barrier(a.processes), ctx.Queue()
        procs = [
            ctx.Process(target=worker, args=(str(a.model), a.threads, pin, a.seconds, barrier, out))
            for _ in range(a.processes)
        ]
        for p in procs:
            p.start()
        rates = sorted(out.get() for _ in procs)
        for p in procs:
            p.join()
        print(f"pinned={pin!s:5}  img/s per process: {', '.join(f'{r:.1f}' for r in rates)}  total {sum(rates):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
