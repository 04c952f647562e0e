"""Nothing half-done: a copy in storage counts only once its completion marker (written last) is there and a rerun
repairs one that stopped half-way; model.bin is checked against the SHA-256 its metadata records; `train
--overwrite` unmarks the old run before replacing it; `--skip-corrupt` leaves unreadable training, calibration and
test images out of an in-process run and lists them in metrics.json (the Ray paths: test_distributed_*.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_PADIM_TRAIN_ARGS
from test_serve import fake_ir

from distributed_anomaly import rundir, storage
from distributed_anomaly.cli import main
from distributed_anomaly.data.mvtec import load_dataset, records_of_split
from distributed_anomaly.errors import RunDirError, UserError
from distributed_anomaly.irformat import METADATA, check_model_bin
from distributed_anomaly.serve import registry


def _interrupt_at(monkeypatch, name: str) -> None:
    """Make the next upload stop while copying `name`, leaving half of it in storage (a lost connection)."""
    real = storage._copy

    def copy(local: Path, path: str, fs) -> None:
        if local.name == name:
            with fs.open_output_stream(path) as out:
                out.write(local.read_bytes()[: local.stat().st_size // 2])
            raise OSError("connection reset by peer")
        real(local, path, fs)

    monkeypatch.setattr(storage, "_copy", copy)


def test_interrupted_upload_counts_as_absent_and_a_rerun_repairs_it(tmp_path: Path, s3_bucket, monkeypatch) -> None:
    from distributed_anomaly import pipeline

    monkeypatch.setenv("DISTRIBUTED_ANOMALY_CACHE", str(tmp_path / "cache"))
    best = tmp_path / "best"
    best.mkdir()
    (best / rundir.CONFIG).write_text("{}")
    ir = fake_ir(tmp_path / "model", source_run=str(best.resolve()), precision="fp32")
    remote = s3_bucket("repair")
    served = storage.join(remote, "model")
    with pytest.raises(UserError, match="nothing uploaded"):  # a local folder without its marker is not sent
        storage.upload(best, storage.join(remote, "run"), marker=METADATA)

    with monkeypatch.context() as patch:
        _interrupt_at(patch, "model.bin")
        with pytest.raises(UserError, match="connection reset"):
            storage.upload(ir, served, marker=METADATA)
    assert storage.files(served) == {"model.bin"} and not storage.complete(served, METADATA)
    with pytest.raises(UserError, match="no complete export there"):  # Serve: an unfinished copy is no model
        registry.discover_models([served])

    record: dict = {"stages": {}}
    assert pipeline._export_and_share(best, ir, "fp32", remote, record) == served  # the rerun: export skipped
    assert storage.complete(served, METADATA)
    entry = registry.discover_models([served])["model"]
    copy = registry.local_ir(served, entry.version)
    assert (copy / "model.bin").read_bytes() == (ir / "model.bin").read_bytes()
    assert pipeline._export_and_share(best, ir, "fp32", remote, record) == served  # current: nothing to do

    # a re-upload unmarks the copy first: stopped half-way, it reads as unfinished, not as the old export
    meta = json.loads((ir / METADATA).read_text())
    (ir / METADATA).write_text(json.dumps({**meta, "exported_at": "later"}))
    with monkeypatch.context() as patch:
        _interrupt_at(patch, "model.xml")
        with pytest.raises(UserError):
            storage.upload(ir, served, marker=METADATA)
    assert not storage.complete(served, METADATA)
    pipeline._export_and_share(best, ir, "fp32", remote, record)
    assert storage.read_bytes(storage.join(served, METADATA)) == (ir / METADATA).read_bytes()


def test_model_bin_that_differs_from_its_recorded_sha256_is_refused(tmp_path: Path, s3_bucket, monkeypatch) -> None:
    monkeypatch.setenv("DISTRIBUTED_ANOMALY_CACHE", str(tmp_path / "cache"))
    ir = fake_ir(tmp_path / "washer")
    version = registry.discover_models([ir])["washer"].version
    check_model_bin(ir)
    (ir / "model.bin").write_bytes(b"<model.bin of")  # truncated, its metadata intact
    with pytest.raises(RunDirError, match=r"model.bin is not the model its metadata describes \(SHA-256"):
        check_model_bin(ir)
    uri = storage.upload(ir, s3_bucket("mismatch/washer"), marker=METADATA)
    assert registry.discover_models([uri])["washer"].version == version  # start-up reads the small files only
    with pytest.raises(RunDirError, match="truncated or mixed copy"):  # the replica's download is checked
        registry.local_ir(uri, version)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == []  # nothing bad left in the cache
    meta = json.loads((ir / METADATA).read_text())
    del meta["model_bin_sha256"]
    (ir / METADATA).write_text(json.dumps(meta))
    with pytest.raises(RunDirError, match="records no model_bin_sha256"):
        registry.discover_models([ir])


TRAIN = ["train", *TINY_PADIM_TRAIN_ARGS, "--quiet"]


def _truncate(path: str) -> bytes:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])
    return data


def test_skip_corrupt_in_process_and_overwrite_unmarks_the_old_run(demo_category: Path, tmp_path: Path, capsys):
    data = shutil.copytree(demo_category, tmp_path / "data")
    records = load_dataset(data)
    bad_train = records_of_split(records, "train")[5].path
    bad_test = next(r.path for r in records_of_split(records, "test") if r.label)
    n_test = len(records_of_split(records, "test"))
    _truncate(bad_train)
    test_bytes = _truncate(bad_test)
    out = tmp_path / "run"

    assert main([*TRAIN, "--data", str(data), "--out", str(out)]) == 2  # stops before any work, naming the file
    err = capsys.readouterr().err
    assert bad_test in err and "--skip-corrupt" in err and not out.exists()

    assert main([*TRAIN, "--data", str(data), "--out", str(out), "--skip-corrupt"]) == 0
    assert bad_test in capsys.readouterr().err  # warned
    metrics = json.loads((out / rundir.METRICS).read_text())
    skipped = metrics["skipped_images"]
    assert skipped["test"] == [bad_test] and metrics["num_test_images"] == n_test - 1
    assert skipped["train"] + skipped["validation"] == [bad_train]
    assert rundir.load_config(out)[2]["skipped_images"] == skipped

    assert main(["evaluate", "--run", str(out), "--quiet"]) == 2  # the test split again: stop, or skip when asked
    assert bad_test in capsys.readouterr().err
    assert main(["evaluate", "--run", str(out), "--quiet", "--skip-corrupt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_images"] == {"test": [bad_test]}

    # --overwrite with bad inputs loses nothing: the old run stays complete
    assert main([*TRAIN, "--data", str(data), "--out", str(out), "--overwrite"]) == 2
    assert (out / rundir.CONFIG).is_file()
    # once the inputs pass, the old run's marker goes first: a fit that then fails leaves no "complete" run behind
    Path(bad_test).write_bytes(test_bytes)
    assert main([*TRAIN, "--data", str(data), "--out", str(out), "--overwrite", "--val-fraction", "0"]) == 2
    assert bad_train in capsys.readouterr().err
    assert not (out / rundir.CONFIG).exists() and (out / rundir.REQUEST).is_file()
    with pytest.raises(RunDirError, match="config.json is missing"):
        rundir.load_config(out)
