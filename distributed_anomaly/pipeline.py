"""`pipeline`: search -> best run -> OpenVINO export -> (optionally) Ray Serve, as one idempotent job.

What `ray job submit ... -- distributed-anomaly pipeline ...` runs on a cluster, and the README's main command
runs locally. Every stage writes into OUT and is skipped when a rerun finds it finished (it says so):

    OUT/tune/           the search (tuning.search): results.csv, report.html, study.db, search/ (TensorBoard),
                        best/ = the best trial's complete run directory with held-out metrics
    OUT/model/          best/ exported to OpenVINO (export.export_run), what Serve loads
    OUT/pipeline.json   the stages done, the paths, the endpoint (rewritten after each stage)

An interrupted search continues (Tuner.restore) instead of starting over; a finished one is reused only if it
was asked for with the same settings (else a clear error: use another OUT).

With `--storage S` (a path every node mounts, or s3://, gs://, hdfs://: storage.py) a multi-node run keeps its
results where every node and the user reach them, at S/<OUT name> with OUT's layout: the trials write
tune/search there directly from whichever node runs them; the driver uploads tune/ when the search ends and
model/ once exported, and Serve replicas load the model from there (each downloads it once), so no replica
depends on the driver's disk; pipeline.json last. OUT keeps the local copy that reruns decide from.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distributed_anomaly import storage as shared
from distributed_anomaly.data.layout import DataLayout
from distributed_anomaly.distributed.ray_setup import dashboard_url
from distributed_anomaly.errors import UserError
from distributed_anomaly.export import export_run
from distributed_anomaly.fileio import read_json, write_json
from distributed_anomaly.irformat import METADATA
from distributed_anomaly.serve.server import start_server
from distributed_anomaly.serve.settings import API_KEY_ENV, AppConfig, is_local_host
from distributed_anomaly.tuning.request import BEST, REPORT, REQUEST, STUDY_DB, SUMMARY, TuneRequest
from distributed_anomaly.tuning.search import tune_search

TUNE, MODEL, RECORD = "tune", "model", "pipeline.json"


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    cpus_per_replica: float = 1.0
    api_key: str | None = None
    proxy_location: str | None = None  # None: Serve's default (EveryNode)


def _same_search(stored: dict, asked: dict) -> list[str]:
    """The settings that differ between a stored search request and a new one (paths compared resolved)."""
    keys = (
        "space_text",
        "samples",
        "fixes",
        "objective",
        "workers",
        "seed",
        "val_fraction",
        "search_fraction",
        "synthetic_copies",
        "pretrained",
        "storage",
    )
    differ = [k for k in keys if stored.get(k) != asked.get(k)]
    layouts = [DataLayout.from_dict(d.get("data_layout")) for d in (stored, asked)]
    if layouts[1].format == "auto":  # stored resolved, as the objective: compare like for like
        layouts[1] = replace(layouts[1], format=layouts[0].format)
    if layouts[0] != layouts[1]:
        differ.insert(0, "data layout")
    if Path(stored.get("data", "")).resolve() != Path(asked.get("data", "")).resolve():
        differ.insert(0, "data")
    return differ


def run_search_stage(request: Any, tune_dir: Path, address: str | None, progress: bool) -> dict:
    """Run, continue or reuse the search in tune_dir; returns its summary (with "rows")."""
    asked = request.to_dict()
    if (tune_dir / REQUEST).is_file():
        stored = read_json(tune_dir / REQUEST)
        # tune_search stores the data path resolved and the objective resolved from "auto"; compare like for like
        if asked.get("objective") == "auto":
            asked = {**asked, "objective": stored.get("objective")}
        differ = _same_search(stored, asked)
        if differ:
            raise UserError(
                f"{tune_dir} holds a search with other settings ({', '.join(differ)} differ): "
                "choose another --out, or rerun with the settings it was started with"
            )
        summary_file = tune_dir / SUMMARY
        if summary_file.is_file() and (tune_dir / BEST / "config.json").is_file():
            summary = read_json(summary_file)
            if not summary.get("interrupted") and summary.get("best"):
                logger.info(f"search: already finished in {tune_dir} (best trial {summary['best']['trial']}), skipping")
                if request.storage and not shared.complete(request.storage, SUMMARY):
                    # the run that finished it failed to upload it, or stopped half-way through
                    shared.upload(tune_dir, request.storage, marker=SUMMARY)
                    logger.info(f"search: uploaded to {request.storage}")
                return {**summary, "rows": None, "skipped": True}
        logger.info(f"search: continuing the interrupted search in {tune_dir}")
        return tune_search(None, tune_dir, address=address, resume=True, progress=progress)
    assert isinstance(request, TuneRequest)
    return tune_search(request, tune_dir, address=address, progress=progress)


def run_export_stage(best: Path, ir_dir: Path, precision: str) -> bool:
    """Export best/ to ir_dir unless an export of that very run at that precision is there; True if exported."""
    meta_file = ir_dir / METADATA
    if meta_file.is_file():
        meta = read_json(meta_file)
        same_run = Path(meta.get("source_run", "")).resolve() == best.resolve()
        newer = (best / "config.json").stat().st_mtime > meta_file.stat().st_mtime
        if same_run and meta.get("precision") == precision and not newer:
            logger.info(f"export: {ir_dir} already holds {precision} of {best}, skipping")
            return False
    logger.info(f"export: {best} -> {ir_dir} ({precision})")
    export_run(best, ir_dir, precision)
    return True


def _dashboards(tune_dir: Path, experiment: str, ray_url: str | None) -> dict[str, str]:
    return {
        "ray": ray_url or "the Ray dashboard of the cluster (port 8265 of its head node)",
        "tensorboard": f"tensorboard --logdir {experiment}",
        "optuna": f"optuna-dashboard sqlite:///{tune_dir / STUDY_DB}",
    }


def run_pipeline(
    request: Any,
    out: str | os.PathLike,
    *,
    address: str | None = None,
    storage: str | None = None,
    precision: str = "fp32",
    serve: ServeOptions | None = None,
    progress: bool = True,
) -> dict:
    """Search, export the best model, optionally deploy it; returns the record written to OUT/pipeline.json.

    serve needs a Ray that outlives this command: a cluster (`address`, e.g. "auto" inside `ray job submit`
    or after `ray start --head`). The application stays deployed when the command ends (`serve shutdown`
    or `ray stop` removes it).
    """
    if serve is not None and not address:
        raise UserError(
            "--serve deploys to a Ray cluster that outlives this command: start one (`ray start --head`, "
            "or a cluster from cluster/) and pass --address auto (inside `ray job submit` too)"
        )
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tune_dir, ir_dir = out / TUNE, out / MODEL
    remote = shared.counterpart(storage, out) if storage else None
    record: dict[str, Any] = {"out": str(out), "stages": {}}
    if remote:
        request = replace(request, storage=shared.join(remote, TUNE))
        record["storage"] = remote
    if (out / RECORD).is_file():
        record["stages"] = dict(read_json(out / RECORD).get("stages", {}))
    started = time.time()

    summary = run_search_stage(request, tune_dir, address, progress)
    best = tune_dir / BEST
    record["stages"]["search"] = _search_stage_record(summary, tune_dir, best)
    write_json(out / RECORD, record)
    served_from = _export_and_share(best, ir_dir, precision, remote, record)
    write_json(out / RECORD, record)

    ray_dashboard = None
    if serve is not None:
        record["stages"]["serve"] = _deploy(served_from, serve, address)
        ray_dashboard = record["stages"]["serve"].get("dashboard")
    record["dashboards"] = _dashboards(tune_dir, request.experiment(tune_dir), ray_dashboard)
    record["seconds"] = round(time.time() - started, 1)
    write_json(out / RECORD, record)
    if remote:  # tune/ and model/ are there already; the record last, so the shared copy says what is there
        shared.upload(out / RECORD, shared.join(remote, RECORD))
        logger.info(f"outputs in {remote}")
    return record


def _search_stage_record(summary: dict, tune_dir: Path, best: Path) -> dict:
    """What pipeline.json says of the search; a search without a best trial stops the pipeline here."""
    if summary.get("interrupted"):
        raise UserError(f"the search in {tune_dir} was interrupted; rerun the same pipeline command to continue it")
    if summary.get("best") is None:
        raise UserError(f"no trial of the search in {tune_dir} completed; see {tune_dir / 'results.csv'}")
    return {
        "dir": str(tune_dir),
        "best": summary["best"],
        "heldout_metrics": summary.get("heldout_metrics"),
        "report": str(tune_dir / REPORT),
        "run_dir": str(best),
    }


def _export_and_share(best: Path, ir_dir: Path, precision: str, remote: str | None, record: dict) -> str:
    """Export the best run (unless already done) and upload it to shared storage; where Serve loads it from."""
    exported = run_export_stage(best, ir_dir, precision)
    record["stages"]["export"] = {"dir": str(ir_dir), "precision": precision}
    if not remote:
        return str(ir_dir)
    served_from = shared.join(remote, MODEL)
    record["stages"]["export"]["shared"] = served_from
    if exported or not _shared_copy_is_current(ir_dir, served_from):
        shared.upload(ir_dir, served_from, marker=METADATA)
        logger.info(f"export: uploaded to {served_from}")
    return served_from


def _shared_copy_is_current(ir_dir: Path, served_from: str) -> bool:
    """The upload of this very export finished: its marker (metadata.json, copied last) is there and is this
    export's (metadata.json names model.bin's SHA-256 and the export time). Else a rerun uploads it again."""
    return shared.read_bytes(shared.join(served_from, METADATA)) == (ir_dir / METADATA).read_bytes()


def _deploy(ir_dir: str, opts: ServeOptions, address: str) -> dict:
    """Deploy the model on the cluster's Serve and leave it running; returns the endpoint."""
    import ray

    cfg = AppConfig(
        models=[ir_dir], replicas=opts.replicas, cpus_per_replica=opts.cpus_per_replica, api_key=opts.api_key
    )
    cfg.validate()
    if not cfg.api_key and not is_local_host(opts.host):
        logger.warning(f"serve: listening on {opts.host} without an API key (set --api-key-file or ${API_KEY_ENV})")
    server = start_server(cfg, opts.host, opts.port, address, proxy_location=opts.proxy_location)
    dash = dashboard_url()
    if server.started_ray:
        ray.shutdown()  # disconnect this driver only: Serve's controller and the application are detached
    logger.info(f"serve: {server.url} (models: {', '.join(server.models)})")
    return {"url": server.url, "predict": f"{server.url}/predict", "models": server.models, "dashboard": dash}


def format_record(record: dict) -> str:
    """The closing lines: where the model, the metrics, the dashboards and the endpoint are."""
    s = record["stages"]
    held = s["search"].get("heldout_metrics") or {}
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in held.items() if isinstance(v, float))
    lines = [
        f"best run:   {s['search']['run_dir']}  ({metrics or 'no held-out metrics'})",
        f"metrics:    {Path(s['search']['run_dir']) / 'metrics.json'}; search report {s['search']['report']}",
        f"model:      {s['export']['dir']} (OpenVINO {s['export']['precision']})",
    ]
    d = record["dashboards"]
    lines += [
        f"dashboards: Ray {d['ray']}",
        f"            TensorBoard: {d['tensorboard']}",
        f"            Optuna: {d['optuna']}",
    ]
    if "serve" in s:
        lines.append(f"endpoint:   POST {s['serve']['predict']}  (GET {s['serve']['url']}/metadata, /docs)")
    else:
        lines.append(
            f"endpoint:   not deployed; `distributed-anomaly serve --model {s['export']['dir']}` serves it "
            "(or rerun with --serve --address auto on a cluster)"
        )
    if record.get("storage"):
        lines.append(f"storage:    {record['storage']} (the same layout as {record['out']})")
    return "\n".join(lines)
