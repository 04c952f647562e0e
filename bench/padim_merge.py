"""Benchmark: the per-partial costs of a Ray PADIM fit's end (docs/scaling.md takes its constants from here).

    .venv/bin/python bench/padim_merge.py                       # mobilenet_v2 / 100 features at 256 px: P=4096, C=100
    .venv/bin/python bench/padim_merge.py --positions 4096 --features 550

For one worker's partial (moments.MomentAccumulator, float32 S2) it measures, in CPU seconds (the machine may be
shared: CPU time, not wall time): the node's conversion to statistics chunks (stats_chunk: float32 -> float64,
mean correction), and the driver's Chan merge of those chunks into its accumulator (GaussianStats.merge_), and
prints the bytes each partial sends (in the accumulation dtype, as padim_fit._merge_partials pulls it).
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

from distributed_anomaly.distributed.padim_fit import chunk_bounds
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
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    convert, merge = [], []
    for acc in accs:
        chunks: list = []
        convert.append(cpu(lambda a=acc, out=chunks: out.extend(a.stats_chunk(p0, p1, np_dtype) for p0, p1 in bounds)))

        def fold(chunks=chunks, count=total.count) -> None:
            for (p0, p1), (n, mean, m2) in zip(bounds, chunks):
                part = GaussianStats(n, torch.from_numpy(mean), torch.from_numpy(m2))
                GaussianStats(count, total.mean[p0:p1], total.m2[p0:p1]).merge_(part)

        merge.append(cpu(fold))
        total.count += acc.count
    sent = p * c * c * torch.empty((), dtype=dtype).element_size() + p * c * 8
    print(
        f"P={p}, C={c}, accumulation {str(dtype).replace('torch.', '')}, {len(bounds)} chunks; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"bytes sent per partial: {sent / 1e6:.0f} MB (S2 held on the node: {p * c * c * 4 / 1e6:.0f} MB float32)")
    print(f"node, stats_chunk over one partial: {np.mean(convert):.3f} CPU s (mean of {len(convert)})")
    print(f"driver, Chan merge of one partial: {np.mean(merge[1:]):.3f} CPU s (mean of {len(merge) - 1}; first copies)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
