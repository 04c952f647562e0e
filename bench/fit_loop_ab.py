"""The in-process PADIM fit loop of two or more code trees, timed in turns (A/B of a change to the fit's hot path).

    .venv/bin/python bench/fit_loop_ab.py TREE [TREE ...] [--images 320] [--rounds 2] [--passes 3]

TREE is a checkout of distributed_anomaly (e.g. `git worktree add /tmp/before REV` and this one). Each round runs
every tree in a fresh process, one after the other; a process builds PADIM (MobileNetV2 ImageNet weights if
cached, 256 px), compiles its OpenVINO frozen network with 2 threads, then times `engine.accumulate` (decoding
threads, OpenVINO streams, the moment update: what `fit_padim` does per image) over --images demo training images
(batch 16) --passes times; the first pass of a process pays first-touch allocations. Prints images/s and process
CPU ms per image of every pass, and each tree's best. The images are bench/padim_profile.py's (generated if
missing under --data).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def child(tree: str, data: str, images: int, passes: int) -> None:
    sys.path.insert(0, tree)
    import torch

    from distributed_anomaly import engine, frozen
    from distributed_anomaly.data.loader import iter_batches
    from distributed_anomaly.data.mvtec import load_category, records_of_split
    from distributed_anomaly.models.backbones import checkpoint_dir, get_spec, weights_filename
    from distributed_anomaly.models.padim import Padim

    torch.set_num_threads(2)
    records = sorted(records_of_split(load_category(Path(data) / "washer"), "train"), key=lambda r: r.path)
    records = records[:images]
    cached = (checkpoint_dir() / weights_filename(get_spec("mobilenet_v2"))).is_file()
    model = Padim("mobilenet_v2", image_size=256, pretrained=cached, seed=0).eval()
    runtime = frozen.OpenVinoPatches(model, threads=2)
    out = []
    for _ in range(passes):
        with torch.inference_mode(), frozen.torch_beside(runtime):
            batches = (x for _, x in iter_batches(records, 256, 16))
            wall, cpu = time.perf_counter(), time.process_time()
            engine.accumulate(runtime, model, batches, lambda _: None)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out.append({"img_per_s": len(records) / wall, "cpu_ms_per_img": 1e3 * cpu / len(records)})
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--data", default="/tmp/distributed_anomaly_bench", help="where the demo images are generated")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.trees[0], a.data, a.images, a.passes)
        return 0
    if not (Path(a.data) / "washer" / "train" / "good").is_dir():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from distributed_anomaly.data.demo import generate

        generate(a.data, 0, categories=["washer"], image_size=256, n_train=a.images, n_test_good=1)
    best: dict[str, float] = {}
    for r in range(a.rounds):
        for tree in a.trees:
            cmd = [sys.executable, __file__, tree, "--child", "--images", str(a.images), "--passes", str(a.passes)]
            cmd += ["--data", a.data]
            passes = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
            shown = "  ".join(f"{p['img_per_s']:.0f} img/s ({p['cpu_ms_per_img']:.1f} CPU ms/img)" for p in passes)
            print(f"round {r + 1}  {tree}: {shown}", flush=True)
            best[tree] = max(best.get(tree, 0.0), *(p["img_per_s"] for p in passes))
    for tree, rate in best.items():
        print(f"best {tree}: {rate:.0f} img/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
