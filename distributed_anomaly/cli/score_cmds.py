"""`score`: batch scoring of a whole folder or archive with Ray Data into one Parquet table."""

from __future__ import annotations

import argparse
import json

from distributed_anomaly.cli.common import VERBOSITY, add_max_pixels, apply_max_pixels
from distributed_anomaly.config import ScoreJob
from distributed_anomaly.postprocess import DEFAULT_TASK, TASKS

DESCRIPTION = (
    "Score every image below --data (a folder or a storage URI: s3://, gs://, hdfs://, file://) with an "
    "exported OpenVINO model on a Ray Data actor pool, into OUT/scores.parquet: one row per image (path, "
    "score, raw_score, label, boxes, mask, model_version, run_id, error). A rerun on the same OUT skips the "
    "images already scored (an interrupted run resumes); unreadable or oversized images get an error row."
)
EXAMPLES = (
    "examples:\n  distributed-anomaly score --model ir/washer_padim --data demo_data/washer/test --out scores/washer\n"
    "  distributed-anomaly score --model s3://bucket/ir/washer --data s3://bucket/line3/2026-12-01 "
    "--out s3://bucket/scores/line3 --address auto --masks"
)


def add_score(sub: argparse._SubParsersAction) -> None:
    defaults = ScoreJob("", "", "")
    p = sub.add_parser(
        "score",
        parents=[VERBOSITY],
        help="score a whole folder or archive on Ray Data into one Parquet table (resumable)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    p.add_argument("--model", required=True, metavar="IR_DIR|URI", help="an IR folder written by `export`")
    p.add_argument("--data", required=True, metavar="DIR|URI", help="images, searched recursively")
    p.add_argument("--out", required=True, metavar="DIR|URI", help="where scores.parquet (and masks/) go")
    p.add_argument("--task", choices=TASKS, default=DEFAULT_TASK)
    p.add_argument("--masks", action="store_true", help="also write OUT/masks/<path>.mask.png (segmentation)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per block (default %(default)s)")
    p.add_argument("--actors", type=int, help="OpenVINO replicas (default: as many as the cluster's CPUs hold)")
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        default=defaults.cpus_per_actor,
        help="CPUs Ray reserves per replica; OpenVINO uses as many threads (default %(default)g)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete what OUT holds and score everything again")
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: a local Ray)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_max_pixels(p)
    p.set_defaults(func=cmd_score)


def cmd_score(a: argparse.Namespace) -> int:
    from distributed_anomaly.distributed.batch_score import score

    job = ScoreJob(
        a.model, a.data, a.out, a.task, a.masks, a.batch_size, a.actors, a.cpus_per_actor, apply_max_pixels(a),
        a.overwrite,
    )  # fmt: skip
    s = score(job, a.address, progress=not a.quiet)
    if a.json:
        print(json.dumps(s, indent=2))
    else:
        rate = f", {s['images_per_s']:.1f} images/s on {s['actors']} actors" if s["images_per_s"] else ""
        print(
            f"{s['images']} images: {s['scored']} scored, {s['errors']} errors, {s['skipped']} already scored "
            f"(skipped){rate}; {s['rows']} rows in {s['table']}"
        )
    return 1 if s["errors"] else 0
