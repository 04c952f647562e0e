"""Benchmark: PADIM fit in process (engine.fit_padim) vs on Ray (fit_padim_ray), N and 4N training images.

    .venv/bin/python bench/padim_fit.py                      # default: N=100 at 256 px, 1 and 2 workers
    .venv/bin/python bench/padim_fit.py --n 200 --workers 1,2,4 --num-cpus 8
    .venv/bin/python bench/padim_fit.py --n 250 --workers 2 --decode actors,tasks   # where the Ray fit decodes

Each configuration runs twice, each time in a fresh subprocess: once for speed, once for memory. The speed
pass samples nothing: one sample of a Ray fit's ~12 processes cost the driver ~0.085 CPU-s (~14 % of a core
at one sample per 0.5 s), one of the in-process fit 0.013 CPU-s, so sampling slowed the Ray rows more. The
memory pass samples peak memory every 0.5 s over the process and all its descendants (for Ray: the driver plus
the local cluster it started -- gcs, raylet, agents, pool actors, statistics actors, decode workers): the sum
of RSS (counts shared object-store pages once per process that maps them) and the sum of PSS (shared pages
split between the processes: the honest total). "delta" is the peak minus the same sum just before the fit
call (for Ray: the idle cluster). Throughput: images / seconds of the fit call ("e2e": includes Ray Data start-up,
actor start and model load in the actors) and, for Ray, the steady rate after the first batch is out and the
start-up (the call until the first batch is out, on a running cluster). "torch" says whether any pool actor
loaded torch (the OpenVINO actors should not: distributed/node_fit.py). Speeds are only comparable within one
run (the machine may be shared): read the ratio columns; memory figures do not depend on load.

Images come from the demo generator (distributed_anomaly.data.synthetic), the backbone is mobilenet_v2
with pretrained weights if cached (`distributed-anomaly weights`), else a seeded random resnet18.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_setup import TreeMonitor


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(sum RSS, sum PSS) in bytes over root and its descendants (PSS falls back to RSS where unreadable)."""
    rss = pss = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = [root]
    for p in procs:
        try:
            r = p.memory_info().rss
        except psutil.Error:
            continue
        rss += r
        pss += TreeMonitor._pss(p.pid) or r
    return rss, pss


class PeakSampler(threading.Thread):
    """Peak memory of this process tree, sampled every 0.5 s. Each sample reads every process's memory (a Ray fit
    has ~20 processes); psutil's memory_full_info, which parses the whole smaps file, took half a core at 0.1 s
    and biased the throughput against the Ray runs, so PSS now comes from smaps_rollup."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process()
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            rss, pss = tree_memory(self.root)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(self.interval)

    def finish(self) -> tuple[int, int]:
        self.stop.set()
        self.join()
        rss, pss = tree_memory(self.root)
        return max(self.peak_rss, rss), max(self.peak_pss, pss)


def build_model(image_size: int):
    from distributed_anomaly.models.backbones import checkpoint_dir, get_spec, weights_filename
    from distributed_anomaly.models.padim import Padim

    if (checkpoint_dir() / weights_filename(get_spec("mobilenet_v2"))).is_file():
        return Padim("mobilenet_v2", image_size=image_size, pretrained=True), "mobilenet_v2 (pretrained)"
    return Padim("resnet18", image_size=image_size, pretrained=False, seed=0), "resnet18 (random, seed 0)"


@contextlib.contextmanager
def peak_memory(result: dict, enabled: bool) -> Iterator[None]:
    """In the memory pass, the peak of this process tree over the block, and its baseline before, into `result`;
    in the speed pass nothing (sampling costs the Ray rows more CPU than the in-process ones)."""
    if not enabled:
        yield
        return
    base = tree_memory(psutil.Process())
    sampler = PeakSampler()
    sampler.start()
    try:
        yield
    finally:
        rss, pss = sampler.finish()
    result.update(peak_rss=rss, peak_pss=pss, delta_pss=pss - base[1], base_pss=base[1])


def run_one(args: argparse.Namespace) -> dict:
    """One configuration, in this (fresh) process; returns the measurements."""
    import torch

    from distributed_anomaly import engine
    from distributed_anomaly.data.mvtec import load_category, records_of_split

    torch.set_num_threads(args.threads)
    records = sorted(records_of_split(load_category(args.data), "train"), key=lambda r: r.path)[: args.images]
    model, backbone = build_model(args.image_size)
    result = {"mode": args.one, "images": len(records), "workers": args.workers, "backbone": backbone}
    if args.one == "inproc":
        with peak_memory(result, args.memory):
            t = time.perf_counter()
            stats = engine.fit_padim(model, records, args.batch_size, progress=False)
            seconds = time.perf_counter() - t
        result.update(count=stats.count, seconds=seconds, images_per_s=len(records) / seconds, steady=None)
    else:
        import ray

        from distributed_anomaly.distributed import ensure_ray, fit_padim_ray

        ensure_ray(None, args.num_cpus)
        time.sleep(2)  # let the idle cluster settle before taking its baseline
        with peak_memory(result, args.memory):
            stats, info = fit_padim_ray(
                model,
                records,
                batch_size=args.batch_size,
                workers=args.workers,
                progress=False,
                threads_per_worker=max(1, args.threads // args.workers),
                decode_in_actors={"actors": True, "tasks": False, "auto": None}[args.decode],
            )
        result.update(
            count=stats.count,
            seconds=info["seconds"],
            images_per_s=info["images_per_s"],
            steady=info["steady_images_per_s"],
            startup_s=info["startup_s"],
            decode=("actors" if info["decode_in_actors"] else "tasks"),
            torch_in_actors=any(w["torch_loaded"] for w in info["workers"]),
        )
        ray.shutdown()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="N: the small run; the large run uses 4N images")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", default="1,2", help="comma-separated Ray pool sizes")
    ap.add_argument("--decode", default="auto", help="comma-separated: auto, actors, tasks (where Ray decodes)")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray node (over-declared)")
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads in process; split between the Ray workers",
    )
    ap.add_argument("--data", default="/tmp/distributed_anomaly_bench", help="where the demo images are generated")
    ap.add_argument("--one", choices=["inproc", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.workers = int(args.workers)
        print(json.dumps(run_one(args)), flush=True)
        return 0

    from distributed_anomaly.data.demo import generate

    data = Path(args.data) / "washer"
    train = data / "train" / "good"
    if not train.is_dir() or len(list(train.iterdir())) < 4 * args.n:
        t = time.perf_counter()
        generate(
            args.data,
            seed=0,
            categories=["washer"],
            image_size=args.image_size,
            n_train=4 * args.n,
            n_test_good=1,
            n_per_defect=1,
        )
        print(f"generated {4 * args.n} training images in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    load_start = os.getloadavg()[0]
    decodes = args.decode.split(",")
    configs = [("inproc", 1, "-")] + [("ray", int(w), d) for w in args.workers.split(",") for d in decodes]
    rows = []
    for images in (args.n, 4 * args.n):
        for mode, workers, decode in configs:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                mode,
                "--workers",
                str(workers),
                "--images",
                str(images),
                "--data",
                str(data),
                "--image-size",
                str(args.image_size),
                "--batch-size",
                str(args.batch_size),
                "--num-cpus",
                str(args.num_cpus),
                "--threads",
                str(args.threads),
                "--decode",
                decode if mode == "ray" else "auto",
            ]
            passes = {}
            for name, extra in (("speed", []), ("memory", ["--memory"])):
                out = subprocess.run(cmd + extra, capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                passes[name] = json.loads(out.stdout.strip().splitlines()[-1])
            memory_keys = ("peak_rss", "peak_pss", "delta_pss", "base_pss")
            r = {**passes["speed"], **{k: passes["memory"][k] for k in memory_keys}}
            rows.append(r)
            r["decode_asked"] = decode
            print(f"  {mode} w={workers} {decode} n={images}: {r['images_per_s']:.1f} images/s", file=sys.stderr)
    mib = 1 << 20
    print(
        f"backbone {rows[0]['backbone']}, {args.image_size} px, batch {args.batch_size}, "
        f"{os.cpu_count()} cores, torch threads {args.threads} (split over Ray workers), "
        f"load average at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f}"
    )
    head = (
        f"| {'run':<32} | {'images':>6} | {'img/s e2e':>9} | {'e2e vs in-proc':>14} | {'img/s steady':>12} | "
        f"{'steady vs in-proc':>17} | {'start-up s':>10} | {'peak RSS MiB':>12} | {'peak PSS MiB':>12} | "
        f"{'PSS vs in-proc':>14} | {'delta PSS MiB':>13} | {'PSS vs N':>8} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        name = (
            "in-process"
            if r["mode"] == "inproc"
            else f"ray, {r['workers']} worker"
            + ("s" if r["workers"] > 1 else "")
            + f", decode in {r['decode']}"
            + (", torch in actors" if r["torch_in_actors"] else "")
        )
        ref = next(x for x in rows if x["mode"] == "inproc" and x["images"] == r["images"])
        small = next(
            x
            for x in rows
            if (x["mode"], x["workers"], x["decode_asked"]) == (r["mode"], r["workers"], r["decode_asked"])
            and x["images"] == args.n
        )
        startup = f"{r['startup_s']:>10.1f}" if r["mode"] == "ray" else f"{'-':>10}"
        steady = r["steady"] if r["mode"] == "ray" else r["images_per_s"]
        steady_s = f"{steady:>12.1f}" if steady else f"{'-':>12}"
        ratio_s = f"{steady / ref['images_per_s']:>16.2f}x" if steady else f"{'-':>17}"
        print(
            f"| {name:<18} | {r['images']:>6} | {r['images_per_s']:>9.1f} | "
            f"{r['images_per_s'] / ref['images_per_s']:>13.2f}x | {steady_s} | {ratio_s} | {startup} | "
            f"{r['peak_rss'] / mib:>12.0f} | {r['peak_pss'] / mib:>12.0f} | "
            f"{r['peak_pss'] / ref['peak_pss']:>13.2f}x | {r['delta_pss'] / mib:>13.0f} | "
            f"{r['peak_pss'] / small['peak_pss']:>7.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
