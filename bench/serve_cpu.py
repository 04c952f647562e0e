"""CPU time per request of each Serve process, from /proc (bench/proc_cpu.py's snapshot), for a bounded load.

    PYTHONPATH=TREE .venv/bin/python bench/serve_cpu.py --model IR_DIR --images CATEGORY_DIR \
        [--tree TREE] [--requests 200] [--concurrency 8] [--task segmentation] [--json out.json]

Starts the application (1 replica x --cpus-per-replica CPUs, as bench/serve_load.py) from the distributed_anomaly
checkout at --tree (default this one: compare two versions of the code on the same machine, model and images),
warms it up, snapshots every process's CPU time, sends --requests POSTs (the category's test PNGs, cycled)
from --concurrency threads, and snapshots again. Each process's CPU time over the requests answered is its
core-milliseconds per request, exactly for that load (not a window's share): the HTTP proxy, the ingress, the
model replica, the rest of this run's Ray (raylet, GCS, controller, agents) and this client; only processes under
this one count (other sessions' Ray on the same machine do not). "Serve's own" is everything but
the model replica and the client. Then the in-process inferencer's rate on the same images (decode, score, JSON
answer; as serve_load.py) gives the throughput ratio, measured right after the load.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

from PIL import Image

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from proc_cpu import snapshot  # noqa: E402
from serve_load import free_port, in_process, load, test_images  # noqa: E402

GROUPS = (
    ("proxy", "ProxyActor"),
    ("ingress", "AnomalyIngress"),
    ("model replica", "AnomalyModel"),
    ("client", "serve_cpu.py"),
)


def descendants(root: int) -> set[str]:
    """This process and every process under it (the local Ray it started: GCS, raylet, workers, replicas): the
    machine may run other sessions' Ray and Serve processes, which must not count."""
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[pid] = f.read().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
    found, todo = {str(root)}, [str(root)]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in found]
        found.update(kids)
        todo += kids
    return found


def group_of(cmd: str) -> str:
    for name, marker in GROUPS:
        if marker in cmd:
            return name
    return "other Ray"  # GCS, raylet, Serve's controller, agents, idle workers


def cpu_by_group(before: dict, after: dict, ours: set[str]) -> dict[str, float]:
    """CPU seconds spent between the snapshots, per group, by this run's processes alive at both."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid, (ticks, cmd) in after.items():
        if pid in before and pid in ours:
            g = group_of(cmd)
            out[g] = out.get(g, 0.0) + (ticks - before[pid][0]) / hz
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True, help="category folder whose test/ PNGs are sent")
    ap.add_argument("--tree", type=Path, default=BENCH.parent, help="the distributed_anomaly checkout to run")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--cpus-per-replica", type=float, default=2.0)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--task", choices=("classification", "detection", "segmentation"), default="segmentation")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    tree = str(a.tree.resolve())
    sys.path.insert(0, tree)  # before serve_load's own root, and for the Ray workers (they inherit PYTHONPATH)
    os.environ["PYTHONPATH"] = os.pathsep.join([tree, *filter(None, [os.environ.get("PYTHONPATH")])])

    import distributed_anomaly
    from distributed_anomaly.inference import OpenVINOInferencer
    from distributed_anomaly.serve.registry import discover_models
    from distributed_anomaly.serve.server import start_server
    from distributed_anomaly.serve.settings import AppConfig

    assert distributed_anomaly.__file__.startswith(tree), distributed_anomaly.__file__
    images = test_images(a.images)
    cfg = AppConfig(
        models=[str(a.model)], cpus_per_replica=a.cpus_per_replica, max_batch_size=a.max_batch_size, replicas=1
    )
    threads = max(1, int(a.cpus_per_replica))
    server = start_server(cfg, "127.0.0.1", free_port(), num_cpus=max(os.cpu_count() or 1, threads))
    try:
        load(server.url, images, 4 * a.concurrency, a.concurrency, a.task, 300)  # warm-up, not counted
        load_before = os.getloadavg()[0]
        before = snapshot()
        res = load(server.url, images, a.requests, a.concurrency, a.task, 1200)
        after = snapshot()
        ours = descendants(os.getpid())
        load_after = os.getloadavg()[0]
    finally:
        server.stop()
    entry = next(iter(discover_models([a.model]).values()))
    inf = OpenVINOInferencer(a.model, num_threads=threads)
    ref = in_process(inf, entry, images, max(4 * a.max_batch_size, 32), a.max_batch_size, a.task)
    ok = res["ok"]
    per_request = {g: 1000.0 * sec / ok for g, sec in sorted(cpu_by_group(before, after, ours).items())}
    own = sum(v for g, v in per_request.items() if g not in ("model replica", "client"))
    out = {
        "tree": tree,
        "requests": res["requests"],
        "errors": res["errors"],
        "req_per_s": res["req_per_s"],
        "in_process_img_per_s": ref,
        "ratio": res["req_per_s"] / ref,
        "core_ms_per_request": per_request,
        "serve_own_core_ms_per_request": own,
        "p50_ms": res["p50_ms"],
        "p95_ms": res["p95_ms"],
        "load_average": [load_before, load_after],
        "image_size_wh": list(Image.open(io.BytesIO(images[0])).size),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
