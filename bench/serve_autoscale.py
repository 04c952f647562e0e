"""Scale-up under load: the model deployment with `autoscale MIN,MAX`, a steady load, replicas and throughput over time.

    .venv/bin/python bench/serve_autoscale.py [--model IR_DIR --images CATEGORY_DIR] [--autoscale 1,2] \
        [--cpus-per-replica 1] [--concurrency 32] [--seconds 90] [--json out.json]

Starts the application on a local Ray sized for MAX replicas (as `serve --autoscale` does), with MIN model replicas
running, then sends POSTs from --concurrency client threads (one keep-alive connection each, the category's test
PNGs cycled, task segmentation) for --seconds. Every second it records the model deployment's replicas by state
(serve.status()) and the requests answered in that second. It prints the timeline in 5-second windows (replicas
running / starting, requests/s, median latency), when Serve first started a new replica and when it was running,
and the throughput before and after. Serve decides with its autoscaling defaults (a look-back window and an
upscale delay) from `target_ongoing_requests` (default: max batch size), as a deployed application would.
Without --model it uses (and makes if missing) the demo export of bench/serve_load.py.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from serve_load import add_model_arguments, free_port, model_and_images, test_images  # noqa: E402


class Load:
    """Client threads that POST images until stopped; completion times and latencies of the answered ones."""

    def __init__(self, url: str, images: list[bytes], concurrency: int) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port, self.images, self.concurrency = int(port), images, concurrency
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done: list[tuple[float, float]] = []  # (monotonic time answered, latency s)
        self.errors = 0
        self.threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(concurrency)]

    def _worker(self, offset: int) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        i = offset
        while not self.stop.is_set():
            body = self.images[i % len(self.images)]
            i += self.concurrency
            start = time.monotonic()
            try:
                conn.request("POST", "/predict?task=segmentation", body=body, headers={"Content-Type": "image/png"})
                resp = conn.getresponse()
                ok = resp.status == 200 and b'"score"' in resp.read()
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            end = time.monotonic()
            with self.lock:
                if ok:
                    self.done.append((end, end - start))
                else:
                    self.errors += 1
        conn.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)


def replica_states(app_name: str, deployment: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[app_name].deployments[deployment]
    return {str(k): int(v) for k, v in status.replica_states.items()}


def windows(samples: list[dict], done: list[tuple[float, float]], t0: float, width: float) -> list[dict]:
    """Per `width`-second window: replicas running and starting (at its end), requests/s, median latency."""
    out = []
    end = max(s["t"] for s in samples)
    start = 0.0
    while start < end:
        stop = start + width
        inside = [lat for at, lat in done if start <= at - t0 < stop]
        last = [s for s in samples if s["t"] < stop][-1]
        out.append(
            {
                "from_s": start,
                "running": last["states"].get("RUNNING", 0),
                "starting": sum(v for k, v in last["states"].items() if k != "RUNNING"),
                "req_per_s": len(inside) / width,
                "p50_ms": 1000 * statistics.median(inside) if inside else None,
            }
        )
        start = stop
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--autoscale", default="1,2", help="MIN,MAX model replicas (default 1,2)")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--window", type=float, default=5.0, help="seconds per line of the timeline (default 5)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)

    from distributed_anomaly.serve.deployments import MODEL_DEPLOYMENT
    from distributed_anomaly.serve.server import start_server
    from distributed_anomaly.serve.settings import AppConfig, parse_autoscale

    ir, category = model_and_images(ap, a)
    low, high = parse_autoscale(a.autoscale)
    cfg = AppConfig(models=[str(ir)], autoscale=(low, high), cpus_per_replica=a.cpus_per_replica)
    print(f"autoscaling options: {cfg.scaling_options()}", file=sys.stderr, flush=True)
    server = start_server(cfg, "127.0.0.1", free_port(), num_cpus=max(2, int(high * a.cpus_per_replica + 0.999)))
    images = test_images(category)
    samples: list[dict] = []
    try:
        t0 = time.monotonic()
        with Load(server.url, images, a.concurrency) as load:
            while time.monotonic() - t0 < a.seconds:
                states = replica_states(server.app_name, MODEL_DEPLOYMENT)
                samples.append({"t": time.monotonic() - t0, "states": states})
                time.sleep(max(0.0, 1.0 - (time.monotonic() - t0) % 1.0))
        done, errors = list(load.done), load.errors
    finally:
        server.stop()
    report(a, samples, done, errors, t0, low, high)
    return 0 if errors == 0 else 1


def _secs(t: float | None) -> str:
    return "never" if t is None else f"{t:.0f} s"


def report(a, samples: list[dict], done: list, errors: int, t0: float, low: int, high: int) -> None:
    first_new = next((s["t"] for s in samples if sum(s["states"].values()) > low), None)
    all_running = next((s["t"] for s in samples if s["states"].get("RUNNING", 0) >= high), None)
    timeline = windows(samples, done, t0, a.window)
    print(
        f"\nautoscale {low},{high}, {a.cpus_per_replica:g} CPU per replica, {a.concurrency} clients for "
        f"{a.seconds:g} s, {os.cpu_count()} cores; {len(done)} answered, {errors} errors"
    )
    print("| from s | running | starting | req/s | p50 ms |\n| --- | --- | --- | --- | --- |")
    for w in timeline:
        p50 = f"{w['p50_ms']:.0f}" if w["p50_ms"] is not None else "-"
        print(f"| {w['from_s']:.0f} | {w['running']} | {w['starting']} | {w['req_per_s']:.1f} | {p50} |")
    print(f"\nfirst replica beyond MIN seen at {_secs(first_new)}; MAX replicas running at {_secs(all_running)}")
    if all_running is not None:
        before = [lat for at, lat in done if 5 <= at - t0 < min(first_new or all_running, all_running)]
        after = [lat for at, lat in done if at - t0 >= all_running + 5]
        span_before = max(1e-9, min(first_new or all_running, all_running) - 5)
        span_after = max(1e-9, a.seconds - all_running - 5)
        print(
            f"throughput at MIN (from 5 s until the new replica appeared): {len(before) / span_before:.1f} req/s, "
            f"p50 {1000 * statistics.median(before) if before else float('nan'):.0f} ms; "
            f"at MAX (from 5 s after it ran): {len(after) / span_after:.1f} req/s, "
            f"p50 {1000 * statistics.median(after) if after else float('nan'):.0f} ms"
        )
    if a.json:
        result = {"args": {k: str(v) for k, v in vars(a).items()}, "samples": samples, "timeline": timeline}
        result |= {"first_new_replica_s": first_new, "max_running_s": all_running, "errors": errors}
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
