"""`score`: a folder of images (local or any pyarrow filesystem URI) scored by Ray Data on an actor pool of
OpenVINO replicas, into one Parquet table (batch_scoring.py holds the Ray-free half: rows, parts, merge).

    driver: list DATA, read OUT (resume) --from_items--> blocks of `batch_size` paths
        --map_batches(IRScorerActor, ActorPoolStrategy(actors), cpus_per_actor each)--> row tables
    driver: rows buffered, written as OUT/parts/part-*.parquet every FLUSH_ROWS rows or FLUSH_S seconds;
            at the end the table and the parts merge into OUT/scores.parquet

Every actor compiles the export once (its files travel through the object store, so a path on the driver's
disk or a storage URI works on any node) with OpenVINO threads = its CPUs, reads its images straight from
DATA's filesystem and writes masks straight to OUT's.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import ray

from distributed_anomaly import batch_scoring as bs
from distributed_anomaly import storage
from distributed_anomaly.config import ScoreJob
from distributed_anomaly.data.progress import Progress
from distributed_anomaly.distributed.cpus import score_ray_cpus
from distributed_anomaly.distributed.pool import check_cluster_cpus, quiet_data_context, resolve
from distributed_anomaly.distributed.ray_setup import ray_session
from distributed_anomaly.errors import UserError
from distributed_anomaly.irformat import is_ir_dir, model_version, read_metadata

FLUSH_ROWS = 2048  # rows per part file at most: what an interruption can lose
FLUSH_S = 30.0  # a part at least this often while rows come back
log = logging.getLogger(__name__)


class IRScorerActor:
    """Pool actor: a block of paths (pyarrow) -> its rows (pyarrow, batch_scoring.SCHEMA)."""

    def __init__(self, ir_files, threads: int, settings: dict) -> None:
        self.scorer = bs.BatchScorer.from_ir_files(resolve(ir_files), threads, **settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.scorer.score_table(batch["path"].to_pylist())


def score(job: ScoreJob, address: str | None = None, progress: bool = True) -> dict:
    """Score every image of job.data not yet scored into job.out; returns the summary (counts, rate, table)."""
    job.check()
    data, out = storage.normalize(job.data), storage.normalize(job.out)
    if job.overwrite:
        storage.remove_tree(out)
    with tempfile.TemporaryDirectory(prefix="da-score-model-") as tmp:
        ir_dir = _local_ir(job.model, Path(tmp))
        version, files = model_version(ir_dir), bs.read_ir_files(ir_dir)
        image_size = read_metadata(ir_dir)["image_size"]
    listing = bs.list_images(data)
    existing = bs.existing_rows(out)
    bs.check_resumable(existing, version, job.task, out)
    done = bs.scored_paths(existing)
    todo = [p for p in listing if p not in done]
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    settings = dict(
        data=data, out=out, task=job.task, masks=job.masks, model_version=version, run_id=run_id,
        max_pixels=job.max_pixels,
    )  # fmt: skip
    start, stats = time.monotonic(), {"scored": 0, "errors": 0, "actors": 0}
    if todo:
        num_cpus = None if address else score_ray_cpus(job.actors, job.cpus_per_actor)
        if num_cpus is not None and not ray.is_initialized():
            log.info(f"starting a local Ray with {num_cpus} logical CPUs (--address joins a running cluster instead)")
        with ray_session(address, num_cpus=num_cpus):
            stats = _run_pool(job, todo, files, image_size, settings, progress)
    seconds = time.monotonic() - start
    merged = bs.finish(out, run_id)
    return {
        "images": len(listing),
        "skipped": len(listing) - len(todo),
        **stats,
        "seconds": round(seconds, 3),
        "images_per_s": round(stats["scored"] / seconds, 3) if stats["scored"] else None,
        "rows": merged.num_rows,
        "table": storage.join(out, bs.TABLE),
        "model_version": version,
        "run_id": run_id,
    }


def _local_ir(model: str, tmp: Path) -> Path:
    """The export on this machine: a local IR folder as is, a storage URI's copy in `tmp`."""
    if storage.is_uri(model):
        storage.download(storage.normalize(model), tmp)
        model = str(tmp)
    if not is_ir_dir(model):
        raise UserError(f"--model {model}: not an OpenVINO IR folder written by `export` (no model.xml)")
    return Path(model)


def pool_size(job: ScoreJob, blocks: int) -> int:
    """Actors: as asked, else as many as the cluster's logical CPUs hold; never more than there are blocks."""
    if job.actors is not None:
        return min(job.actors, blocks)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, min(blocks, int(cpus // job.cpus_per_actor)))


def _run_pool(job: ScoreJob, todo: list[str], files: dict, image_size, settings: dict, progress: bool) -> dict:
    """The Ray Data pipeline; rows go to part files as they come back."""
    blocks = math.ceil(len(todo) / job.batch_size)
    actors = pool_size(job, blocks)
    check_cluster_cpus(actors, job.cpus_per_actor, 0.0)
    threads = max(1, int(job.cpus_per_actor))
    bar = Progress(len(todo), f"score (ray, {actors} actors)", progress)
    writer = _PartWriter(settings["out"], settings["run_id"])
    with quiet_data_context(image_size, job.batch_size, actors):
        ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=blocks)
        ds = ds.map_batches(
            IRScorerActor,
            fn_constructor_args=(ray.put(files), threads, settings),
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=job.cpus_per_actor,
        )
        try:
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                writer.add(table)
                bar.update(table.num_rows, f"{writer.errors} errors" if writer.errors else "")
        finally:
            writer.flush()  # what came back before a stop or an error is kept for the rerun
    bar.close()
    if writer.rows != len(todo):
        raise RuntimeError(f"{len(todo)} images sent, {writer.rows} rows came back from the scoring pool")
    return {"scored": writer.rows - writer.errors, "errors": writer.errors, "actors": actors}


class _PartWriter:
    """Buffers result rows and writes them as part files (at most FLUSH_ROWS rows, at least every FLUSH_S)."""

    def __init__(self, out: str, run_id: str) -> None:
        self.out, self.run_id = out, run_id
        self.buffer: list[pa.Table] = []
        self.rows = self.errors = self.seq = 0
        self.last = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.rows += table.num_rows
        self.errors += table.num_rows - table["error"].null_count
        if sum(t.num_rows for t in self.buffer) >= FLUSH_ROWS or time.monotonic() - self.last >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            bs.write_part(self.out, pa.concat_tables(self.buffer), self.run_id, self.seq)
            self.seq += 1
            self.buffer = []
        self.last = time.monotonic()
