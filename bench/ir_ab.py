"""Two or more exported IRs of the same model side by side: images/s at one batch size, and whether their maps agree.

    .venv/bin/python bench/ir_ab.py NAME=IR_DIR NAME=IR_DIR [...] [--batch 8] [--threads 2] [--rounds 5] [--iters 10]

For a change to the exported graph (e.g. PADIM's head): export the same run directory with the code before and
after (`git worktree add /tmp/before REV`, then `distributed-anomaly export` from each tree), and time both here.
Each IR is compiled with --threads threads and f32 inference precision; the IRs take turns within each round, so
that load from other processes hits all alike; the best round counts. The first IR's map is the reference for the
largest difference of each other's, relative to the reference's largest value.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def images_per_second(request, x: np.ndarray, iters: int) -> float:
    for _ in range(2):
        request.infer({0: x})
    start = time.perf_counter()
    for _ in range(iters):
        request.infer({0: x})
    return iters * x.shape[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("irs", nargs="+", metavar="NAME=IR_DIR")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": str(args.threads), "INFERENCE_PRECISION_HINT": "f32"}
    requests = {}
    for item in args.irs:
        name, _, path = item.partition("=")
        requests[name] = core.compile_model(core.read_model(f"{path}/model.xml"), "CPU", config).create_infer_request()
    size = tuple(requests[next(iter(requests))].model_inputs[0].get_partial_shape()[2:].to_shape())
    x = np.random.default_rng(0).standard_normal((args.batch, 3, *size)).astype(np.float32)
    rates: dict[str, list[float]] = {name: [] for name in requests}
    for _ in range(args.rounds):
        for name, request in requests.items():
            rates[name].append(images_per_second(request, x, args.iters))
    maps = {name: request.infer({0: x})[0].copy() for name, request in requests.items()}
    reference = maps[next(iter(maps))]
    print(f"batch {args.batch}, {args.threads} threads, {args.rounds} rounds x {args.iters} calls, input {size}")
    for name, rate in rates.items():
        diff = float(np.abs(maps[name] - reference).max() / np.abs(reference).max())
        print(f"{name:12s} best {max(rate):7.1f} img/s  rounds {[round(r) for r in rate]}  max rel diff {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
