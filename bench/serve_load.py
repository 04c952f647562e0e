"""Load benchmark of the Serve endpoint against the in-process OpenVINO inferencer, on the same images.

    .venv/bin/python bench/serve_load.py [--model IR_DIR] [--requests 300] [--concurrency 8] \
        [--max-batch-size 8] [--replicas 1] [--cpus-per-replica 2] [--task segmentation] [--json out.json]

Without --model it uses (and makes if missing, as bench/inference.py does) the demo washer PADIM
mobilenet_v2 256 px fp32 export under --work. The requests are the PNG files of the category's test split,
cycled. Per image both sides do the same work: decode the PNG, score, build the JSON answer (mask PNG for
segmentation); the server adds HTTP, the ingress hop and Ray's transfers, and batches concurrent requests.

    in-process, batch 1     one image at a time, --replicas x --cpus-per-replica OpenVINO threads (the CPUs
                            the Serve app's model replicas hold)
    in-process, batch B     B images per OpenVINO call (what the server's batching can reach at best)
    serve                   --requests POSTs from --concurrency client threads (one keep-alive connection
                            each) to a local Serve app with --replicas of --cpus-per-replica CPUs; latency
                            p50/p95/p99, requests/s over the whole run, errors (non-200 or transport)

The load is sent in --rounds rounds (300 requests: 3 x 100), each between two in-process measurements on
the same images (their mean is the round's reference: this machine's speed drifts by 10-25 % from minute to
minute), so that every ratio compares figures taken under about the same conditions, with the Serve app
deployed and idle; the table shows each round and the whole run. The run is bounded: it stops after --requests
requests (or --timeout seconds) and tears Serve and Ray down.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CATEGORY = "washer"


def cli(*args: str) -> None:
    print("$ distributed-anomaly " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(
        [sys.executable, "-m", "distributed_anomaly", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )


def prepare(work: Path, size: int) -> tuple[Path, Path]:
    """(IR folder, category folder): the demo washer PADIM export, made if missing."""
    from distributed_anomaly.export import export_run

    data = work / "data"
    if not (data / CATEGORY / "train").is_dir():
        cli("synth", str(data), "--image-size", str(size), "--n-train", "60")
    run = work / "runs" / f"padim_{size}"
    if not (run / "config.json").is_file():
        cli(
            "train",
            "--data",
            str(data / CATEGORY),
            "--model",
            "padim",
            "--backbone",
            "mobilenet_v2",
            "--image-size",
            str(size),
            "--out",
            str(run),
            "--quiet",
        )
    ir = work / "ir" / f"padim_{size}_fp32"
    if not (ir / "metadata.json").is_file():
        export_run(run, ir, "fp32")
    return ir, data / CATEGORY


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """--model / --images (default: the demo export and category under --work, made if missing), --work, --size."""
    ap.add_argument("--model", type=Path, help="IR folder to serve (default: the demo export under --work)")
    ap.add_argument("--images", type=Path, help="category folder whose test/ PNGs are sent (default: the demo's)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/da_bench"))
    ap.add_argument("--size", type=int, default=256)


def model_and_images(ap: argparse.ArgumentParser, a: argparse.Namespace) -> tuple[Path, Path]:
    """(IR folder, category folder) from add_model_arguments' arguments."""
    if a.model is None:
        return prepare(a.work, a.size)
    if a.images is None:
        ap.error("--images CATEGORY_DIR is needed with --model")
    return a.model, a.images


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_images(category: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((category / "test").rglob("*.png"))]


def in_process(inf, entry, images: list[bytes], n: int, batch: int, task: str) -> float:
    """Images per second for decode + score + JSON answer, `batch` images per OpenVINO call."""
    from distributed_anomaly.serve.requests import decode_image
    from distributed_anomaly.serve.responses import prediction_response

    t = time.perf_counter()
    done = 0
    while done < n:
        chunk = [decode_image(images[(done + i) % len(images)]) for i in range(min(batch, n - done))]
        for img, pred in zip(chunk, inf.predict(chunk)):
            json.dumps(prediction_response(pred, task, entry, img.shape))
        done += len(chunk)
    return n / (time.perf_counter() - t)


def load(url: str, images: list[bytes], n: int, concurrency: int, task: str, timeout: float) -> dict:
    """n POSTs from `concurrency` threads; latencies of the successful ones, error count, wall time."""
    host, port = url.removeprefix("http://").split(":")
    lock = threading.Lock()
    counter = iter(range(n))
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + timeout

    def worker() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body = images[i % len(images)]
            t = time.perf_counter()
            try:
                conn.request("POST", f"/predict?task={task}", body=body, headers={"Content-Type": "image/png"})
                resp = conn.getresponse()
                payload = resp.read()
                ok = resp.status == 200 and b'"score"' in payload
            except (OSError, http.client.HTTPException) as exc:
                ok, payload = False, repr(exc).encode()
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
            dt = time.perf_counter() - t
            with lock:
                (latencies.append(dt) if ok else errors.append(payload[:200].decode("utf-8", "replace")))
        conn.close()

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    wall = time.perf_counter() - t0
    return summarize(latencies, errors, wall)


def summarize(latencies: list[float], errors: list[str], wall: float) -> dict:
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return {
        "requests": len(lat) + len(errors),
        "ok": len(lat),
        "errors": len(errors),
        "wall_s": wall,
        "req_per_s": len(lat) / wall,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
        "first_errors": errors[:3],
        "latencies": latencies,
        "error_list": errors,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=50.0)
    ap.add_argument("--cpus-per-replica", type=float, default=2.0)
    ap.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="model replicas (the in-process reference gets their CPUs in all as OpenVINO threads)",
    )
    ap.add_argument("--task", choices=("classification", "detection", "segmentation"), default="segmentation")
    ap.add_argument("--rounds", type=int, default=3, help="the load is split into this many rounds (default 3)")
    ap.add_argument("--timeout", type=float, default=600.0, help="stop sending after this many seconds")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)

    from distributed_anomaly.inference import OpenVINOInferencer
    from distributed_anomaly.serve.registry import discover_models
    from distributed_anomaly.serve.requests import decode_image
    from distributed_anomaly.serve.server import start_server
    from distributed_anomaly.serve.settings import AppConfig

    ir, category = model_and_images(ap, a)
    images = test_images(category)
    threads = max(1, int(a.replicas * a.cpus_per_replica))
    b = a.max_batch_size
    n_ref = max(8 * b, 64)  # enough OpenVINO calls per measurement to average out scheduling noise
    print(
        f"model {ir}, {len(images)} distinct images, task {a.task}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
        flush=True,
    )
    entry = next(iter(discover_models([ir]).values()))
    inf = OpenVINOInferencer(ir, num_threads=threads)
    inf.predict([decode_image(images[0])])  # warm-up

    cfg = AppConfig(
        models=[str(ir)],
        replicas=a.replicas,
        cpus_per_replica=a.cpus_per_replica,
        max_batch_size=b,
        batch_wait_timeout_s=a.batch_wait_ms / 1000,
    )
    t = time.perf_counter()
    server = start_server(cfg, "127.0.0.1", free_port(), num_cpus=max(os.cpu_count() or 1, threads))
    print(f"server up in {time.perf_counter() - t:.1f}s at {server.url}", file=sys.stderr, flush=True)
    rounds = []
    sizes = [a.requests // a.rounds + (1 if r < a.requests % a.rounds else 0) for r in range(a.rounds)]
    deadline = time.monotonic() + a.timeout
    try:
        load(server.url, images, 2 * a.concurrency, a.concurrency, a.task, 120)  # warm-up, not counted
        for r, n in enumerate(sizes):
            before = [in_process(inf, entry, images, n_ref, k, a.task) for k in (1, b)]
            res = load(server.url, images, n, a.concurrency, a.task, max(1.0, deadline - time.monotonic()))
            after = [in_process(inf, entry, images, n_ref, k, a.task) for k in (1, b)]
            ref1, refb = ((x + y) / 2 for x, y in zip(before, after))
            rounds.append({"in_process_b1": ref1, "in_process_bB": refb, **res, "load_avg": os.getloadavg()[0]})
            print(
                f"round {r + 1}: in-process {ref1:.1f} / {refb:.1f} img/s, serve {res['req_per_s']:.1f} req/s, "
                f"{res['errors']} errors, load average {os.getloadavg()[0]:.1f}",
                file=sys.stderr,
                flush=True,
            )
        from ray import serve

        from distributed_anomaly.serve.deployments import MODEL_DEPLOYMENT

        stats = serve.get_deployment_handle(MODEL_DEPLOYMENT, server.app_name).stats.remote().result()
    finally:
        server.stop()

    total = summarize(
        [x for r in rounds for x in r["latencies"]],
        [x for r in rounds for x in r["error_list"]],
        sum(r["wall_s"] for r in rounds),
    )
    ratios = [r["req_per_s"] / max(r["in_process_b1"], r["in_process_bB"]) for r in rounds]
    mean_batch = stats["images"] / max(1, stats["batches"])
    print(
        f"\n{a.requests} requests in {a.rounds} rounds, concurrency {a.concurrency}, max batch {b}, "
        f"{a.replicas} replica(s) x {a.cpus_per_replica:g} CPUs (= OpenVINO threads each; in-process {threads} "
        f"threads), task {a.task}\n"
    )
    print(
        f"| round | load avg | in-process batch 1 img/s | in-process batch {b} img/s | Serve req/s | "
        "Serve / best in-process | p50 ms | p95 ms | errors |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, (r, q) in enumerate(zip(rounds, ratios)):
        print(
            f"| {i + 1} | {r['load_avg']:.1f} | {r['in_process_b1']:.1f} | {r['in_process_bB']:.1f} | "
            f"{r['req_per_s']:.1f} | {q:.2f}x | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['errors']} |"
        )
    best = statistics.median(max(r["in_process_b1"], r["in_process_bB"]) for r in rounds)
    print(
        f"| all | | {statistics.median(r['in_process_b1'] for r in rounds):.1f} | "
        f"{statistics.median(r['in_process_bB'] for r in rounds):.1f} | {total['req_per_s']:.1f} | "
        f"{total['req_per_s'] / best:.2f}x | {total['p50_ms']:.0f} | {total['p95_ms']:.0f} | "
        f"{total['errors']} of {total['requests']} |"
    )
    print(
        f"\np99 {total['p99_ms']:.0f} ms; median ratio over rounds {statistics.median(ratios):.2f}x; "
        f"Serve batches: mean {mean_batch:.1f} images, largest {stats['max_batch']}"
    )
    if total["first_errors"]:
        print("first errors:", *total["first_errors"], sep="\n  ")
    if a.json:
        strip = [{k: v for k, v in r.items() if k not in ("latencies", "error_list")} for r in rounds]
        a.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(a).items()},
                    "rounds": strip,
                    "total": {k: v for k, v in total.items() if k not in ("latencies", "error_list")},
                    "replica": stats,
                    "ratios": ratios,
                },
                indent=2,
            )
        )
    return 0 if total["errors"] == 0 and total["requests"] == a.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
