"""`score`'s Ray-free half: images of a folder (local or any pyarrow filesystem) scored into one Parquet table.

    OUT/scores.parquet             one row per image (COLUMNS), sorted by path; written last, atomically
    OUT/parts/part-RUN-NNNNN.parquet   rows written while a run goes; merged into scores.parquet at its end
    OUT/masks/<path>.mask.png      segmentation masks (0/255) when asked, in the image's own size

Resuming is reading what OUT already holds (the table and any parts an interrupted run left): a path with a row
and no error is not scored again; a path whose row has an error is tried again. The Ray Data wiring is in
distributed/batch_score.py; everything here runs in one process as well (tests, the per-batch function).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from distributed_anomaly import storage
from distributed_anomaly.data.decode import is_image_file, load_image
from distributed_anomaly.errors import ImageReadError, UserError
from distributed_anomaly.inference import OpenVINOInferencer
from distributed_anomaly.irformat import IR_FILES
from distributed_anomaly.postprocess import TASKS
from distributed_anomaly.runner import ModelRunner, predict_images

TABLE, PARTS, MASKS = "scores.parquet", "parts", "masks"
SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # relative to --data, '/'-separated: the key resuming goes by
        ("score", pa.float64()),  # normalised, 0.5 at the image threshold
        ("raw_score", pa.float64()),
        ("label", pa.int8()),  # 1 anomalous, 0 normal, null without a threshold or on error
        ("label_name", pa.string()),
        ("boxes", pa.list_(pa.list_(pa.float64()))),  # [x1, y1, x2, y2, score] in image pixels (not classification)
        ("mask", pa.string()),  # the mask PNG, relative to OUT (segmentation with --masks)
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("task", pa.string()),
        ("model_version", pa.string()),  # irformat.model_version of the export: pins weights and thresholds
        ("run_id", pa.string()),  # the `score` invocation that wrote the row
        ("error", pa.string()),  # why the image has no score (unreadable, too large); null when scored
    ]
)
COLUMNS = tuple(SCHEMA.names)


def list_images(data: str) -> list[str]:
    """The image files below a folder or storage URI, relative and sorted (one recursive listing)."""
    found = [p for p in storage.list_tree(data) if is_image_file(p.rsplit("/", 1)[-1])]
    if not found:
        raise UserError(f"{data} holds no images (PNG, JPEG, BMP, TIFF or WebP files, searched recursively)")
    return found


def mask_name(path: str) -> str:
    """Where an image's mask goes, relative to OUT: unique per image path (a.png and a.jpg both get one)."""
    return f"{MASKS}/{path}.mask.png"


def read_ir_files(ir_dir: str | os.PathLike) -> dict[str, bytes]:
    """An export's files as bytes: what every scoring actor, on any node, rebuilds the folder from."""
    return {name: (Path(ir_dir) / name).read_bytes() for name in IR_FILES}


def materialise_ir(files: Mapping[str, bytes]) -> Path:
    """The IR files in a private temporary folder (removed when the returned path is garbage)."""
    tmp = Path(tempfile.mkdtemp(prefix="da-score-ir-"))
    for name, blob in files.items():
        (tmp / name).write_bytes(blob)
    return tmp


class BatchScorer:
    """Scores batches of image paths into rows of SCHEMA: read (any filesystem), decode through the guarded
    reader, the shared prediction core, optional mask PNGs. A bad image gives an error row, never an exception."""

    def __init__(
        self,
        runner: ModelRunner,
        data: str,
        out: str,
        task: str,
        *,
        masks: bool,
        model_version: str,
        run_id: str,
        max_pixels: int | None = None,
    ) -> None:
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
        self.runner, self.task, self.masks = runner, task, masks and task == "segmentation"
        self.data, self.out = data, out
        self.fs, self.base = storage.filesystem(data)
        self.fixed = {"task": task, "model_version": model_version, "run_id": run_id}
        self.max_pixels = max_pixels

    @classmethod
    def from_ir_files(cls, files: Mapping[str, bytes], threads: int, **kwargs) -> BatchScorer:
        """A scorer over an OpenVINO runner compiled from an export's files (a Ray actor's constructor)."""
        folder = materialise_ir(files)
        scorer = cls(OpenVINOInferencer(folder, num_threads=threads), **kwargs)
        weakref.finalize(scorer, shutil.rmtree, folder, True)
        return scorer

    def _read(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(f"{self.base.rstrip('/')}/{path}") as src:
                return src.read()
        except OSError as exc:
            raise ImageReadError(f"cannot read image {path}: {exc}") from exc

    def _decode(self, path: str) -> tuple[np.ndarray, tuple[int, int]]:
        try:
            return load_image(self._read(path), max_pixels=self.max_pixels, target_size=self.runner.image_size)
        except ImageReadError as exc:  # the guarded reader names "<bytes>": name the file instead
            raise ImageReadError(str(exc).replace("<bytes>", path)) from exc
        except Exception as exc:  # e.g. PIL's DecompressionBombError: still one bad file, named
            raise ImageReadError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc

    def score(self, paths: Sequence[str]) -> list[dict]:
        """One row per path, in order."""
        rows: list[dict] = [{}] * len(paths)
        good, images, shapes = [], [], []
        for i, path in enumerate(paths):
            try:
                pixels, shape = self._decode(path)
            except ImageReadError as exc:
                rows[i] = self._row(path, error=str(exc))
                continue
            good.append(i)
            images.append(pixels)
            shapes.append(shape)
        for i, shape, pred in zip(good, shapes, predict_images(self.runner, images, shapes)):
            answer = pred.to_json(self.task)
            row = self._row(paths[i], height=shape[0], width=shape[1], **answer)
            if self.masks and pred.mask is not None:
                row["mask"] = self._write_mask(paths[i], pred.mask)
            rows[i] = row
        return rows

    def score_table(self, paths: Sequence[str]) -> pa.Table:
        return rows_to_table(self.score(paths))

    def _row(self, path: str, **values) -> dict:
        row = dict.fromkeys(COLUMNS)
        row.update({k: v for k, v in values.items() if k in row}, path=path, **self.fixed)
        return row

    def _write_mask(self, path: str, mask: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
        name = mask_name(path)
        storage.put_bytes(storage.join(self.out, name), buf.getvalue())
        return name


def rows_to_table(rows: Sequence[Mapping]) -> pa.Table:
    return pa.Table.from_pylist([dict(r) for r in rows], schema=SCHEMA)


def table_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table.cast(SCHEMA), buf)
    return buf.getvalue().to_pybytes()


def part_names(out: str) -> list[str]:
    """The finished part files under OUT/parts, oldest first (the names sort by run, then sequence)."""
    names = storage.files(storage.join(out, PARTS)) or set()
    return sorted(n for n in names if n.startswith("part-") and n.endswith(".parquet"))


def write_part(out: str, table: pa.Table, run_id: str, seq: int) -> str:
    """OUT/parts/part-RUN-NNNNN.parquet, written atomically: an interruption leaves whole parts only."""
    return storage.put_bytes(storage.join(out, PARTS, f"part-{run_id}-{seq:05d}.parquet"), table_bytes(table))


def _read_table(location: str) -> pa.Table:
    blob = storage.read_bytes(location)
    if blob is None:
        raise UserError(f"{location} vanished while being read")
    try:
        return pq.read_table(pa.BufferReader(blob)).select(list(COLUMNS)).cast(SCHEMA)
    except (pa.ArrowException, KeyError) as exc:
        raise UserError(f"{location} is not a table written by `score`: {exc}") from exc


def latest_rows(tables: Sequence[pa.Table]) -> pa.Table:
    """The tables stacked, one row per path (the last one written wins), sorted by path."""
    if not tables:
        return SCHEMA.empty_table()
    stacked = pa.concat_tables(tables)
    stacked = stacked.append_column("_i", pa.array(np.arange(len(stacked), dtype=np.int64)))
    keep = stacked.group_by("path").aggregate([("_i", "max")])["_i_max"].to_numpy()
    return stacked.take(np.sort(keep)).drop_columns(["_i"]).sort_by("path")


def existing_rows(out: str, newest_run: str | None = None) -> pa.Table:
    """What OUT already holds: its table, then the parts of earlier runs (by name: by run id, a timestamp),
    then those of `newest_run`; one row per path, the latest one."""
    tables = []
    if storage.exists(storage.join(out, TABLE)):
        tables.append(_read_table(storage.join(out, TABLE)))
    names = sorted(part_names(out), key=lambda n: (n.startswith(f"part-{newest_run}-"), n))
    tables += [_read_table(storage.join(out, PARTS, n)) for n in names]
    return latest_rows(tables)


def check_resumable(existing: pa.Table, model_version: str, task: str, out: str) -> None:
    """Rows of another export or task are not mixed into one table."""
    for column, want in (("model_version", model_version), ("task", task)):
        other = sorted(set(existing[column].to_pylist()) - {want})
        if other:
            raise UserError(
                f"{out} holds scores of {column} {', '.join(map(str, other))}, not {want}: score into another "
                "--out, or pass --overwrite to start it again"
            )


def scored_paths(existing: pa.Table) -> set[str]:
    """Paths with a score: skipped by a rerun (error rows are tried again)."""
    ok = existing.filter(existing["error"].is_null())
    return set(ok["path"].to_pylist())


def finish(out: str, run_id: str | None = None) -> pa.Table:
    """Merge OUT's table and parts into OUT/scores.parquet (written atomically), then delete the parts.
    A stop between the two leaves parts whose rows the table already has: merging again changes nothing.
    The rows of `run_id` (the run finishing) win over any older row of the same path."""
    merged = existing_rows(out, run_id)
    storage.put_bytes(storage.join(out, TABLE), table_bytes(merged))
    storage.remove_tree(storage.join(out, PARTS))  # only parts and their hidden temporary files live there
    return merged
