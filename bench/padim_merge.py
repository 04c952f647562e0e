"""Benchmark: the per-partial costs of a Ray PADIM fit's end (docs/scaling.md takes its constants from here).

    .venv/bin/python bench/padim_merge.py                       # mobilenet_v2 / 100 features at 256 px: P=4096, C=100
    .venv/bin/python bench/padim_merge.py --positions 4096 --features 550

For one node's partial (moments.MomentAccumulator, float32 S2) it measures, in CPU seconds (the machine may be
shared: CPU time, not wall time): the node's copy of its raw chunks (raw_chunk: shift, S1, float32 S2 -- what
serialising them costs) and the driver's padim_fit._merge_chunk over them (moments_to_stats: float32 -> float64
with the mean correction, then the Chan merge GaussianStats.merge_), and prints the bytes each partial sends
(raw, as padim_fit._merge_node pulls it; before 2026-12-02 the node sent float64 statistics).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_anomaly.distributed.padim_fit import _merge_chunk, chunk_bounds
from distributed_anomaly.moments import MomentAccumulator
from distributed_anomaly.stats import GaussianStats, accumulation_dtype


def cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--features", type=int, default=100)
    ap.add_argument("--partials", type=int, default=3, help="partials merged (the first only copies)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    p, c = args.positions, args.features
    dtype = accumulation_dtype(p, c)
    rng = np.random.default_rng(0)
    accs = []
    for _ in range(args.partials):
        acc = MomentAccumulator(p, c)
        acc.add_patches(rng.standard_normal((8, p, c), dtype=np.float32))
        accs.append(acc)
    bounds = chunk_bounds(p, c, dtype)
    total = GaussianStats.empty(p, c, dtype)
    ship, merge = [], []
    buffer = GaussianStats.empty(bounds[0][1] - bounds[0][0], c, dtype)
    for acc in accs:
        raw: list = []
        ship.append(cpu(lambda a=acc, out=raw: out.extend([np.array(x) for x in a.raw_chunk(*b)] for b in bounds)))

        def fold(raw=raw, count=total.count) -> None:  # as the driver does it: convert, then Chan merge
            for (p0, p1), chunk in zip(bounds, raw):
                _merge_chunk(total, count, p0, p1, tuple(chunk), buffer if count else None)

        merge.append(cpu(fold))
        total.count += acc.count
    sent = p * c * c * 4 + p * c * (8 + 4)
    print(
        f"P={p}, C={c}, accumulation {str(dtype).replace('torch.', '')}, {len(bounds)} chunks; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"bytes sent per partial: {sent / 1e6:.0f} MB (S2 held on the node: {p * c * c * 4 / 1e6:.0f} MB float32)")
    print(f"node, copy of its raw chunks into fresh memory: {np.mean(ship):.3f} CPU s (mean of {len(ship)})")
    print(f"driver, the first partial converted into the accumulator: {merge[0]:.3f} CPU s")
    print(f"driver, a later partial converted and merged: {np.mean(merge[1:]):.3f} CPU s (mean of {len(merge) - 1})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
