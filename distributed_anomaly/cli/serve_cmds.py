"""`serve`: exported models behind Ray Serve (the defaults are serve.settings.AppConfig's); `serve-config`:
the running application's operating point (thresholds, sensitivity), changed live."""

from __future__ import annotations

import argparse
import json

from distributed_anomaly.cli.common import VERBOSITY, add_api_key, add_inference_precision, add_max_pixels, default
from distributed_anomaly.serve.settings import (
    DEFAULT_REQUEST_TIMEOUT_S,
    AppConfig,
    parse_autoscale,
    resolve_api_key,
)

APP_NAME = "distributed_anomaly"  # serve.deployments.APP_NAME (not imported: it loads torch and Ray)

DESCRIPTION = (
    "Deploy IR folders written by `export` as a Ray Serve application: POST /predict (raw image "
    "bytes or a multipart file; ?task=classification|detection|segmentation; ?model=NAME or header X-Model "
    "when several models are served), GET /healthz, GET /metadata, OpenAPI docs at /docs. Each model replica "
    "compiles the IRs once with OpenVINO threads = --cpus-per-replica and scores concurrent requests in "
    "batches. Blocks until Ctrl-C (or SIGTERM), then removes what it started."
)
EXAMPLES = (
    "examples:\n  distributed-anomaly serve --model ir/washer_padim\n"
    "  distributed-anomaly serve --model ir/ --host 0.0.0.0 --port 8000 --replicas 2 --max-batch-size 8\n"
    "  curl -s --data-binary @part.png 'http://127.0.0.1:8000/predict?task=detection&model=washer_padim'"
)


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        parents=[VERBOSITY],
        help="serve exported OpenVINO models over HTTP with Ray Serve (batched, several models)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    p.add_argument(
        "--model",
        nargs="+",
        required=True,
        metavar="IR_DIR",
        help="IR folders written by `export`, folders of them, or NAME=IR_DIR; a model is named after "
        "its folder unless NAME= is given. An IR folder may be a storage URI (s3://bucket/runs/washer/model, "
        "see --storage of pipeline): each replica, on whichever node, downloads it once to its local cache",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--replicas", type=int, default=default(AppConfig, "replicas"), help="model replicas (default %(default)s)"
    )
    p.add_argument(
        "--autoscale",
        metavar="MIN,MAX",
        help="let Serve scale the model replicas between MIN and MAX (instead of --replicas)",
    )
    p.add_argument(
        "--target-ongoing-requests",
        type=float,
        help="--autoscale: requests in flight per replica Serve aims at (default: --max-batch-size)",
    )
    p.add_argument(
        "--cpus-per-replica",
        type=float,
        default=default(AppConfig, "cpus_per_replica"),
        help="CPUs Ray reserves per model replica; OpenVINO uses as many threads (default %(default)s)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=default(AppConfig, "max_batch_size"),
        help="most images scored in one call (default %(default)s)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=1000.0 * default(AppConfig, "batch_wait_timeout_s"),
        help="longest wait for a batch to fill, in milliseconds (default %(default)g; a lone request waits this "
        "long, a full batch does not wait)",
    )
    _limit_options(p)
    add_api_key(p, "require this key (header X-API-Key or Authorization: Bearer) on /predict and /metadata")
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: a local Ray)")
    p.set_defaults(func=cmd_serve)


def _limit_options(p: argparse.ArgumentParser) -> None:
    """What the server refuses or bounds: body size, pixels, queue length, request time."""
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=default(AppConfig, "max_body_bytes") / 2**20,
        help="larger request bodies get 413 (default %(default)g)",
    )
    add_max_pixels(p)
    add_inference_precision(p)
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=default(AppConfig, "max_queued_requests"),
        help="requests waiting for a replica beyond which Serve answers 503 with Retry-After (default %(default)s)",
    )
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="HTTP requests not answered by then get 408 (default %(default)g; applies when this command starts Serve)",
    )


def cmd_serve(a: argparse.Namespace) -> int:
    from distributed_anomaly.serve.server import serve_forever

    cfg = AppConfig(
        models=list(a.model),
        replicas=a.replicas,
        cpus_per_replica=a.cpus_per_replica,
        max_batch_size=a.max_batch_size,
        batch_wait_timeout_s=a.batch_wait_ms / 1000.0,
        max_body_bytes=int(a.max_body_mb * 1024 * 1024),
        api_key=resolve_api_key(a.api_key, a.api_key_file),
        max_pixels=a.max_pixels,
        max_queued_requests=a.max_queued_requests,
        autoscale=parse_autoscale(a.autoscale) if a.autoscale else None,
        target_ongoing_requests=a.target_ongoing_requests,
        precision=a.precision,
    )
    cfg.validate()
    return serve_forever(cfg, a.host, a.port, a.address, request_timeout_s=a.request_timeout_s)


def add_serve_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve-config",
        parents=[VERBOSITY],
        help="show or change a running application's thresholds and sensitivity, live (no restart)",
        description="The operating point of a running `serve` application (Serve's user_config of AnomalyModel): "
        "`set` checks the change on a replica, applies it to every replica through Serve's reconfigure (no "
        "restart, no re-export) and prints the thresholds now in use; `show` prints them.",
        epilog="examples:\n"
        "  distributed-anomaly serve-config set --model washer_padim --threshold 14.2 --address auto\n"
        "  distributed-anomaly serve-config set --model washer_padim --target-fpr 0.01 --address auto\n"
        "  distributed-anomaly serve-config set --model washer_padim --reset --address auto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("set", "show"))
    p.add_argument("--model", help="set: the served model name")
    p.add_argument("--threshold", type=float, help="raw image threshold (the pixel threshold follows it)")
    p.add_argument("--pixel-threshold", type=float, help="raw pixel threshold")
    p.add_argument(
        "--target-fpr", type=float, help="thresholds at this false-alarm rate on the calibration images, e.g. 0.01"
    )
    p.add_argument("--sensitivity", type=float, help="> 1 flags more, < 1 fewer (1: as set)")
    p.add_argument("--reset", action="store_true", help="back to the export's thresholds (then apply the others)")
    p.add_argument("--app", default=APP_NAME, help="the Serve application (default %(default)s)")
    p.add_argument("--address", default="auto", help="the Ray cluster: 'auto' or HOST:PORT (default auto)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="longest wait for every replica (default 60)")
    p.set_defaults(func=cmd_serve_config)


def cmd_serve_config(a: argparse.Namespace) -> int:
    from distributed_anomaly.distributed.ray_setup import ensure_ray
    from distributed_anomaly.errors import UserError
    from distributed_anomaly.serve.live import set_operating_point, show_operating_point

    changes = {
        "threshold": a.threshold,
        "pixel_threshold": a.pixel_threshold,
        "target_fpr": a.target_fpr,
        "sensitivity": a.sensitivity,
    }
    if a.action == "set" and not a.model:
        raise UserError("serve-config set needs --model NAME")
    if a.action == "set" and not a.reset and all(v is None for v in changes.values()):
        raise UserError("serve-config set: give --threshold, --pixel-threshold, --target-fpr, --sensitivity or --reset")
    ensure_ray(a.address)
    if a.action == "show":
        print(json.dumps(show_operating_point(a.app), indent=2))
        return 0
    used = set_operating_point(a.app, a.model, changes, reset=a.reset, timeout_s=a.timeout_s)
    print(f"{a.app}/{a.model}: every replica now uses {json.dumps(used)}")
    return 0
