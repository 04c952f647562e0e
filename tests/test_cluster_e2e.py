"""End to end on a real two-node Ray cluster (token auth on; the session's `two_nodes`, both nodes alive): `ray job
submit` the pipeline with `--storage` on an S3 server (moto), follow it, check its outputs locally and in S3 (the
trials wrote the search there, Serve loaded the model from there), check through the Ray state API that the
second node ran part of the job, get a correct answer from the deployed model over HTTP, and leave the cluster as
it was (Serve shut down). A rerun that finds its stages finished:
test_tune.py::test_pipeline_rerun_reuses_the_finished_search_and_export."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from ray_cluster import RAY_BIN, free_ports, state

from distributed_anomaly import storage
from distributed_anomaly.data.images import read_image
from distributed_anomaly.data.mvtec import load_dataset, records_of_split

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]


def _ray(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([RAY_BIN, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _submit(cluster, env: dict, pipeline_args: list[str]) -> tuple[str, str]:
    """Submit, follow the logs to the end, return (final status line, logs)."""
    sub = _ray(
        [
            "job",
            "submit",
            "--address",
            cluster.dashboard,
            "--working-dir",
            str(ROOT),
            "--runtime-env",
            str(ROOT / "cluster" / "runtime_env.yaml"),
            "--no-wait",
            "--",
            "distributed-anomaly",
            "pipeline",
            *pipeline_args,
        ],
        env,
        300,
    )
    assert sub.returncode == 0, (sub.stdout + sub.stderr)[-3000:]
    job = re.search(r"raysubmit_\w+", sub.stdout + sub.stderr)
    assert job, sub.stdout + sub.stderr
    logs = _ray(["job", "logs", "--address", cluster.dashboard, "--follow", job.group(0)], env, 1200)
    status = _ray(["job", "status", "--address", cluster.dashboard, job.group(0)], env, 120)
    return job.group(0), status.stdout + status.stderr, logs.stdout + logs.stderr


def _work_on(cluster, node: str) -> dict[str, str]:
    """{id: name} of the finished tasks and the actors the Ray state API places on a node."""
    tasks = state(cluster, "tasks", node_id=node, state="FINISHED")
    actors = state(cluster, "actors", node_id=node)
    return {**{t["task_id"]: t["name"] for t in tasks}, **{a["actor_id"]: a["class_name"] for a in actors}}


@pytest.mark.timeout(1500)  # a pipeline job (a 2-trial search, export, Serve), and the cluster's start
def test_pipeline_job_on_two_node_cluster_serves_the_best_model(
    two_nodes, demo_category: Path, tmp_path: Path, s3_bucket
) -> None:
    cluster = two_nodes
    out = tmp_path / "pipeline"
    port = free_ports(1)[0]
    path_env = {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    shared = s3_bucket("e2e")
    args = [
        "--data",
        str(demo_category),
        "--space",
        "search_spaces/padim.yaml",
        "--samples",
        "2",
        "--fix",
        "backbone=resnet18",
        "--fix",
        "image_size=128",
        "--fix",  # the smallest PADIM (the search still samples the layers): less to fit, export, upload, load
        "n_features=32",
        "--no-pretrained",
        "--out",
        str(out),
        "--address",
        "auto",
        "--storage",
        shared,
        "--quiet",
    ]
    serve_args = ["--serve", "--host", "127.0.0.1", "--port", str(port), "--proxy-location", "HeadOnly"]
    # Ray's CLI clients (ray job ...) need token mode on as well as the token (cluster/README.md)
    env = {**cluster.client_env, "RAY_AUTH_MODE": "token", **path_env}
    try:
        alive = {n["node_id"] for n in state(cluster, "nodes") if n["state"] == "ALIVE"}
        assert alive == set(cluster.node_ids.values()), (alive, cluster.node_ids)  # both nodes, before the job
        before = {name: _work_on(cluster, node) for name, node in cluster.node_ids.items()}
        _, status, logs = _submit(cluster, env, [*args, *serve_args])
        assert "succeeded" in status.lower(), f"{status}\n{logs[-5000:]}"

        # The second node did part of the job's work: the state API places tasks that finished and actors there
        # since the job started (nothing else runs on the cluster meanwhile). The search's 2 trials x 3 CPUs
        # (trial, fit actor, decode tasks) fill both nodes' 3 CPUs, so each node runs one trial's work.
        new = {
            name: {k: v for k, v in _work_on(cluster, node).items() if k not in before[name]}
            for name, node in cluster.node_ids.items()
        }
        print("job's work per node:", {name: sorted(set(work.values())) for name, work in new.items()})
        assert len(new["node_b"]) >= 3 and len(new["node_a"]) >= 3, new

        # outputs: the search, its best run, the OpenVINO model, the record of it all
        record = json.loads((out / "pipeline.json").read_text())
        summary = json.loads((out / "tune" / "summary.json").read_text())
        assert summary["trials"] == 2 and summary["completed"] >= 1 and summary["best"] is not None
        assert json.loads((out / "tune" / "best" / "metrics.json").read_text())["image_auroc"] is not None
        assert (out / "model" / "model.xml").is_file() and record["stages"]["export"]["dir"] == str(out / "model")
        url = record["stages"]["serve"]["url"]
        assert url == f"http://127.0.0.1:{port}" and "endpoint:" in logs and url in logs

        # shared storage: the trials wrote the search to S3 (none of it on the driver's disk), the driver
        # uploaded the rest; the S3 copy has OUT's layout
        remote = storage.join(shared, "pipeline")
        assert record["storage"] == remote and not (out / "tune" / "search").exists()
        fetched = storage.download(remote, tmp_path / "fetched")
        trials = [p for p in (fetched / "tune" / "search").iterdir() if p.name.startswith("trial_")]
        assert len(trials) == 2 and all((p / "result.json").is_file() for p in trials)
        for name in (
            "pipeline.json",
            "tune/summary.json",
            "tune/best/metrics.json",
            "model/model.xml",
            "model/metadata.json",
        ):
            assert (fetched / name).read_bytes() == (out / name).read_bytes(), name
        served_from = storage.join(remote, "model")
        assert record["stages"]["export"]["shared"] == served_from
        with urllib.request.urlopen(f"{url}/metadata", timeout=60) as resp:  # the replica loaded it from S3
            # /metadata shows the URI without its query string (where storage options and credentials go)
            assert [m["path"] for m in json.loads(resp.read())["models"]] == [served_from.split("?", 1)[0]]

        # the deployed model answers over HTTP as the same IR does in this process
        from distributed_anomaly.inference import OpenVINOInferencer

        defect = next(r for r in records_of_split(load_dataset(demo_category), "test") if r.label)
        body = Path(defect.path).read_bytes()
        req = urllib.request.Request(
            f"{url}/predict?task=detection",
            data=body,
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            answer = json.loads(resp.read())
        local = OpenVINOInferencer(out / "model").predict([read_image(defect.path)])[0]
        assert answer["score"] == pytest.approx(local.score, abs=1e-5)
        assert answer["label"] == local.label and len(answer["boxes"]) == len(local.boxes)

    finally:  # the session's cluster goes on to other tests: take down the Serve application the job deployed
        # what `serve shutdown --address DASHBOARD` asks the dashboard, without starting a Ray client process
        req = urllib.request.Request(
            f"{cluster.dashboard}/api/serve/applications/",
            method="DELETE",
            headers={"Authorization": f"Bearer {cluster.token}"},
        )
        with urllib.request.urlopen(req, timeout=300) as resp:
            assert resp.status == 200
    assert not any(a["state"] == "ALIVE" for a in state(cluster, "actors", class_name="ServeController"))
