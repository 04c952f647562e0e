"""--storage: paths and URIs through pyarrow (storage.py), against a local folder and a real S3 protocol server
(moto), and Serve replicas loading a model from storage. Ray Train checkpoints in S3 are tested by
test_distributed_stfpm.py (the CLI resume test), a search and the pipeline in S3 by test_cluster_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_serve import fake_ir

from distributed_anomaly import storage
from distributed_anomaly.errors import UserError
from distributed_anomaly.serve import registry


def test_paths_and_uris(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = "s3://bucket/runs/?endpoint_override=minio:9000&scheme=http"
    assert storage.is_uri(uri) and not storage.is_uri("runs/x")
    assert storage.normalize(uri) == "s3://bucket/runs?endpoint_override=minio:9000&scheme=http"
    assert storage.normalize("runs/x/") == str(tmp_path / "runs" / "x")  # absolute: Ray needs it
    # parts go before the query string, which every joined URI keeps
    assert (
        storage.join(uri, "washer", "tune") == "s3://bucket/runs/washer/tune?endpoint_override=minio:9000&scheme=http"
    )
    assert storage.join("gs://b/p", "x") == "gs://b/p/x"
    assert storage.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")
    assert storage.split_last(storage.join(uri, "washer")) == (storage.normalize(uri), "washer")
    assert storage.split_last("runs/x") == (str(tmp_path / "runs"), "x")
    assert (
        storage.counterpart(uri, "runs/washer/") == "s3://bucket/runs/washer?endpoint_override=minio:9000&scheme=http"
    )
    assert storage.counterpart("shared", "runs/washer") == str(tmp_path / "shared" / "washer")
    with pytest.raises(UserError, match="cannot open storage 'nosuch://x/y'"):
        storage.exists("nosuch://x/y")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_upload_download_exists_remove(tmp_path: Path, s3_bucket, where: str) -> None:
    src = tmp_path / "src"
    (src / "best").mkdir(parents=True)
    (src / "summary.json").write_text('{"best": 1}')
    (src / "best" / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
    loc = storage.join(s3_bucket("roundtrip") if where == "s3" else str(tmp_path / "shared"), "out")
    assert not storage.exists(loc)
    assert storage.upload(src, loc) == loc
    assert storage.exists(storage.join(loc, "best", "model.safetensors"))
    (src / "summary.json").write_text('{"best": 2}')  # a second upload replaces what is there
    storage.upload(src, loc)
    got = storage.download(loc, tmp_path / "got")
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*")) == ["best", "best/model.safetensors", "summary.json"]
    assert (got / "summary.json").read_text() == '{"best": 2}'
    assert (got / "best" / "model.safetensors").read_bytes() == (src / "best" / "model.safetensors").read_bytes()
    assert storage.files(loc) == {"summary.json"} and storage.files(storage.join(loc, "nothing")) is None
    dest = storage.join(loc, "deep", "copy.json")
    assert storage.upload(src / "summary.json", dest) == dest
    assert storage.files(storage.join(loc, "deep")) == {"copy.json"}
    storage.remove_tree(loc)
    assert not storage.exists(loc)
    storage.remove_tree(loc)  # nothing there: fine
    with pytest.raises(UserError, match="is not a folder"):
        storage.download(loc, tmp_path / "nothing")


def test_serve_loads_models_from_storage(tmp_path: Path, s3_bucket, monkeypatch) -> None:
    """A model given as a URI is named after its folder and versioned like a local copy from its small files;
    a replica fetches it once per export into the local cache; a re-export under the same URI is refused to a
    replica of the old one."""
    monkeypatch.setenv("DISTRIBUTED_ANOMALY_CACHE", str(tmp_path / "cache"))
    local = fake_ir(tmp_path / "washer")
    uri = storage.upload(local, s3_bucket("serve/washer"))
    entries = registry.discover_models([uri, f"copy={uri}"])
    assert list(entries) == ["washer", "copy"] and entries["washer"].path == uri
    version = registry.discover_models([local])["washer"].version
    assert entries["washer"].version == version and entries["washer"].info["image_threshold"] == 1.5
    assert not (tmp_path / "cache").exists()  # start-up read the small files only; replicas fetch the model

    cached = registry.local_ir(uri, version)
    assert cached.parent == tmp_path / "cache" / "models" and cached.name.endswith(version)
    assert (cached / "model.bin").read_bytes() == (local / "model.bin").read_bytes()
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary download left behind
    storage.remove_tree(uri)
    assert registry.local_ir(uri, version) == cached  # from the cache: no download

    (local / "metadata.json").write_text(
        json.dumps({**json.loads((local / "metadata.json").read_text()), "exported_at": "later"})
    )
    storage.upload(local, uri)
    with pytest.raises(UserError, match="another export"):
        registry.local_ir(s3_bucket("serve/washer"), "0" * 12)
    assert registry.local_ir(uri).name.endswith(registry.discover_models([local])["washer"].version)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not a model")
    with pytest.raises(UserError, match="is missing model.xml, model.bin, metadata.json, postprocess.json"):
        registry.discover_models([storage.upload(tmp_path / "notes", s3_bucket("serve/notes"))])
    with pytest.raises(UserError, match="not an IR folder"):
        registry.local_ir(s3_bucket("serve/notes"))
    with pytest.raises(UserError, match="no such folder"):
        registry.discover_models([s3_bucket("serve/missing")])
    with pytest.raises(UserError, match="is not a folder"):
        registry.local_ir(s3_bucket("serve/missing"))


def test_a_new_search_refuses_storage_holding_another(tmp_path: Path, demo_category: Path) -> None:
    """Two TUNE_DIRs with one name and one --storage would share STORAGE/<name>/search: refused before anything
    is written (Tune would otherwise add the new trials to the old experiment)."""
    from distributed_anomaly.tuning.request import TuneRequest
    from distributed_anomaly.tuning.search import tune_search

    space = Path(__file__).resolve().parents[1] / "search_spaces" / "padim.yaml"
    shared = storage.join(str(tmp_path / "shared"), "washer")
    (tmp_path / "shared" / "washer" / "search").mkdir(parents=True)
    request = TuneRequest(
        data=str(demo_category), space_file=str(space), space_text=space.read_text(), samples=1, storage=shared
    )
    assert request.experiment(tmp_path / "washer") == storage.join(shared, "search")
    with pytest.raises(UserError, match="already holds a search"):
        tune_search(request, tmp_path / "washer", progress=False)
    assert not (tmp_path / "washer").exists()


def test_a_skipped_search_uploads_only_what_storage_lacks(tmp_path: Path, demo_category: Path) -> None:
    """A pipeline rerun skips a finished search; if the run that finished it did not get it into storage (an
    upload that failed), the rerun uploads it, and otherwise leaves storage alone."""
    from distributed_anomaly.fileio import write_json
    from distributed_anomaly.pipeline import run_search_stage
    from distributed_anomaly.tuning.request import BEST, REQUEST, SUMMARY, TuneRequest

    space = Path(__file__).resolve().parents[1] / "search_spaces" / "padim.yaml"
    shared = storage.join(str(tmp_path / "shared"), "tune")
    request = TuneRequest(
        data=str(demo_category), space_file=str(space), space_text=space.read_text(), samples=1, storage=shared
    )
    tune_dir = tmp_path / "out" / "tune"
    (tune_dir / BEST).mkdir(parents=True)
    (tune_dir / BEST / "config.json").write_text("{}")
    write_json(tune_dir / REQUEST, request.to_dict())
    write_json(tune_dir / SUMMARY, {"best": {"trial": "t1"}})
    assert run_search_stage(request, tune_dir, None, progress=False)["skipped"]
    assert storage.files(shared) == {REQUEST, SUMMARY} and storage.files(storage.join(shared, BEST)) == {"config.json"}
    (tune_dir / "later.txt").write_text("not uploaded: the search is in storage already")
    assert run_search_stage(request, tune_dir, None, progress=False)["skipped"]
    assert storage.files(shared) == {REQUEST, SUMMARY}
