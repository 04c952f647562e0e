"""`score`: Ray Data batch scoring into one Parquet table equals `predict` image for image, marks bad images
with an error row, and resumes from a partial output without scoring anything twice (local folder and S3)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distributed_anomaly import batch_scoring as bs
from distributed_anomaly import storage
from distributed_anomaly.errors import UserError
from distributed_anomaly.irformat import model_version


@pytest.fixture(scope="module")
def images(demo_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo washer's test split (18 images in 5 folders) plus one corrupt file."""
    root = tmp_path_factory.mktemp("score_data")
    shutil.copytree(demo_category / "test", root / "test")
    (root / "test" / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def scored(exports, ray_local, images: Path, tmp_path_factory: pytest.TempPathFactory):
    """`distributed-anomaly score` once through the CLI: (IR folder, OUT, its table as rows by path, exit code)."""
    from distributed_anomaly.cli import main

    ir, out = exports("padim", "fp32"), tmp_path_factory.mktemp("score_out") / "scores"
    args = ["score", "--model", str(ir), "--data", str(images), "--out", str(out), "--masks", "--actors", "2"]
    code = main([*args, "--batch-size", "4", "-q"])
    rows = {r["path"]: r for r in pq.read_table(out / bs.TABLE).to_pylist()}
    return ir, out, rows, code


@pytest.mark.ray
def test_score_equals_predict_image_for_image(scored, images: Path, tmp_path: Path):
    from distributed_anomaly.predict import predict

    ir, out, rows, code = scored
    expected = predict(ir, [images], tmp_path / "pred", task="segmentation")
    assert code == 1  # one image failed
    assert len(rows) == len(expected) == 19
    assert not (out / bs.PARTS).exists()  # merged into the table
    for want in expected:
        path = Path(want["image"]).relative_to(images).as_posix()
        got = rows[path]
        if "error" in want:
            assert path == "test/good/broken.png" and got["score"] is None and got["label"] is None
            assert got["error"] == want["error"].replace(str(images / path), path)
            continue
        assert got["error"] is None
        assert got["raw_score"] == pytest.approx(want["raw_score"], rel=1e-5)
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert (got["label"], got["label_name"]) == (want["label"], want["label_name"])
        assert [b[:4] for b in got["boxes"]] == [b[:4] for b in want["boxes"]]
        assert [b[4] for b in got["boxes"]] == pytest.approx([b[4] for b in want["boxes"]], abs=1e-5)
        mask = np.asarray(Image.open(out / got["mask"]))
        assert np.array_equal(mask, np.asarray(Image.open(tmp_path / "pred" / want["mask"])))
        assert (got["height"], got["width"]) == mask.shape
    assert {r["model_version"] for r in rows.values()} == {model_version(ir)}
    assert sum(r["label"] == 1 for r in rows.values()) >= 6  # the model flags defects: the check is not vacuous


@pytest.mark.ray
def test_score_resumes_from_a_partial_output_without_rescoring(scored, images: Path, s3_bucket):
    """A run stopped after writing some part files: the rerun scores only the rest (rows keep their run_id)
    and retries the error row; data and OUT in S3."""
    from distributed_anomaly.config import ScoreJob
    from distributed_anomaly.distributed.batch_score import score

    ir, _, rows, _ = scored
    data, out = s3_bucket("score/data"), s3_bucket("score/out")
    storage.upload(images, data)
    first = [*sorted(rows)[:9], "test/good/broken.png"]  # the error row is tried again
    bs.write_part(out, bs.rows_to_table([rows[p] for p in first]), "20000101T000000-000000", 0)
    summary = score(ScoreJob(str(ir), data, out, actors=2, batch_size=4), progress=False)
    assert (summary["images"], summary["skipped"], summary["scored"], summary["errors"]) == (19, 9, 9, 1)
    blob = storage.read_bytes(storage.join(out, bs.TABLE))
    table = {r["path"]: r for r in pq.read_table(pa.BufferReader(blob)).to_pylist()}
    assert sorted(table) == sorted(rows)
    old_run = next(iter(rows.values()))["run_id"]
    for path, row in table.items():
        kept = path in first and path != "test/good/broken.png"
        assert row["run_id"] == (old_run if kept else summary["run_id"]), path
        assert (row["error"] is None) == (rows[path]["error"] is None), path
        if row["error"] is None:
            assert row["raw_score"] == pytest.approx(rows[path]["raw_score"], rel=1e-5), path
    assert storage.files(storage.join(out, bs.PARTS)) is None


def test_latest_row_per_path_wins_and_other_models_are_refused():
    def row(path: str, run: str, version: str = "v1", error: str | None = None) -> dict:
        return {**dict.fromkeys(bs.COLUMNS), "path": path, "run_id": run, "model_version": version,
                "task": "segmentation", "error": error, "raw_score": None if error else 1.0}  # fmt: skip

    old = bs.rows_to_table([row("b.png", "r1"), row("a.png", "r1", error="cannot decode")])
    new = bs.rows_to_table([row("a.png", "r2"), row("c.png", "r2")])
    merged = bs.latest_rows([old, new])
    assert merged["path"].to_pylist() == ["a.png", "b.png", "c.png"]
    assert merged["run_id"].to_pylist() == ["r2", "r1", "r2"]
    assert bs.scored_paths(old) == {"b.png"}  # an error row is scored again
    bs.check_resumable(merged, "v1", "segmentation", "OUT")
    with pytest.raises(UserError, match="model_version v1, not v2"):
        bs.check_resumable(merged, "v2", "segmentation", "OUT")
    with pytest.raises(UserError, match="task segmentation, not detection"):
        bs.check_resumable(merged, "v1", "detection", "OUT")
