"""PatchCore's coreset: exact greedy vs the streaming (chunked + merged) coreset on real patch embeddings.

Embeds the demo category's training images with PatchCore's frozen backbone, then selects a bank of ratio x N
patches (a) by one exact greedy pass over every patch and (b) by StreamingCoreset at several chunk sizes.
Reports, for each: the bank's coverage radius over all patches (max distance to the nearest bank entry, in
the metric the greedy pass uses and in the full embedding space), its ratio to the exact one, the a-posteriori
bound the streaming fit computes, the rows held at most, and CPU seconds of the selection (process CPU time,
so a loaded machine inflates it less than wall time).

    .venv/bin/python bench/patchcore_coreset.py --n 40 --image-size 256 --chunks 8192,32768
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from distributed_anomaly import engine
from distributed_anomaly.data.dataset import load_dataset
from distributed_anomaly.data.demo import generate
from distributed_anomaly.data.loader import iter_batches
from distributed_anomaly.data.mvtec import records_of_split
from distributed_anomaly.models.backbones import offline_mobilenet_weights
from distributed_anomaly.models.coreset import StreamingCoreset, bank_size, coverage_radius, greedy_coreset, start_index
from distributed_anomaly.models.patchcore import PatchCore


def embeddings(model: PatchCore, data: Path, n: int) -> torch.Tensor:
    records = records_of_split(load_dataset(data), "train")[:n]
    embed = engine.patchcore_embedder(model, "openvino")
    out = []
    with torch.inference_mode():
        for _, x in iter_batches(records, model.image_size, 16):
            out.append(embed(x).reshape(-1, model.n_features).clone())
    return torch.cat(out)


def radii(x: torch.Tensor, bank: torch.Tensor, proj: torch.Tensor | None) -> tuple[float, float]:
    """Coverage radius in the greedy pass's metric (projected) and in the full space."""
    projected = coverage_radius(x @ proj, bank @ proj) if proj is not None else None
    full = coverage_radius(x, bank)
    return (projected if projected is not None else full), full


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40, help="training images")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--chunks", default="8192,32768", help="streaming chunk sizes in patches")
    p.add_argument("--backbone", default="mobilenet_v2", help="mobilenet_v2 (offline weights) or resnet18 (random)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="pc_coreset_"))
    generate(work, seed=0, image_size=a.image_size, n_train=a.n, n_test_good=1, n_per_defect=1)
    weights = offline_mobilenet_weights() if a.backbone == "mobilenet_v2" else None
    model = PatchCore(a.backbone, image_size=a.image_size, pretrained=False, weights_file=weights)
    x = embeddings(model, work / "washer", a.n)
    proj = model.projection()
    k = bank_size(a.ratio, x.shape[0])
    print(
        f"# {a.backbone} {a.image_size} px, {a.n} images: {x.shape[0]} patches x {x.shape[1]} dims, "
        f"projection {'none' if proj is None else tuple(proj.shape)}, bank {k} (ratio {a.ratio}), "
        f"threads {a.threads}, load average {os.getloadavg()[0]:.1f}"
    )
    t0 = time.process_time()
    xp = x @ proj if proj is not None else x
    idx, _ = greedy_coreset(xp, k, start_index(xp))
    exact_cpu = time.process_time() - t0
    exact = radii(x, x[idx], proj)
    print(
        f"exact greedy      : radius {exact[0]:.4f} (full space {exact[1]:.4f}), rows held {x.shape[0]}, "
        f"CPU {exact_cpu:.1f} s"
    )
    for chunk in [int(c) for c in a.chunks.split(",")]:
        t0 = time.process_time()
        stream = StreamingCoreset(a.ratio, proj, chunk_patches=chunk)
        for part in x.split(model.n_positions * 16):
            stream.add(part)
        result = stream.finish()
        cpu = time.process_time() - t0
        r = radii(x, result.bank, proj)
        held = chunk + math.ceil(result.candidates)
        print(
            f"stream chunk {chunk:6d}: radius {r[0]:.4f} ({r[0] / exact[0]:.3f} x exact; full space "
            f"{r[1] / exact[1]:.3f} x), bound {result.radius_bound:.4f}, candidates {result.candidates}, "
            f"rows held <= {held}, CPU {cpu:.1f} s ({exact_cpu / cpu:.2f} x less)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
