"""Distributed PADIM: Ray Data shards the images, workers accumulate exact Gaussian statistics.

The Ray fit must give the in-process engine.fit_padim's Gaussians (to float64 rounding) for any number of
workers and batch size, count every image exactly once, stop on a corrupt image with a message naming it
(or skip it when asked, saying so), and work across real nodes (a 2-node `ray start` cluster with token
authentication, driven from a subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from distributed_anomaly import engine
from distributed_anomaly.data.mvtec import Record, load_category, records_of_split
from distributed_anomaly.errors import ImageReadError
from distributed_anomaly.models.padim import Padim

RTOL = 1e-6


def tiny_padim() -> Padim:
    return Padim("resnet18", ["layer1", "layer2"], n_features=20, image_size=64, pretrained=False, seed=0)


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def train_records(demo_category: Path) -> list[Record]:
    return records_of_split(load_category(demo_category), "train")


@pytest.fixture(scope="module")
def reference(train_records):
    """In-process fit: the statistics and the fitted model every Ray fit must reproduce."""
    model = tiny_padim()
    stats = engine.fit_padim(model, train_records, batch_size=8, progress=False)
    return stats, model


@pytest.mark.parametrize("workers,batch_size", [(1, 5), (2, 8), (3, 7)])
def test_ray_fit_equals_in_process_fit(ray_local, train_records, reference, workers, batch_size, capsys):
    from distributed_anomaly.distributed import fit_padim_ray

    ref_stats, ref_model = reference
    model = tiny_padim()
    stats, info = fit_padim_ray(model, train_records, batch_size=batch_size, workers=workers)
    assert stats.count == info["images"] == len(train_records)
    assert sum(w["images"] for w in info["workers"]) == len(train_records)
    assert info["num_skipped"] == 0 and info["images_per_s"] > 0
    assert rel_err(stats.mean, ref_stats.mean) < RTOL
    assert rel_err(stats.covariance(), ref_stats.covariance()) < RTOL
    # The model is finalised once, from the merged statistics.
    assert rel_err(model.mean, ref_model.mean) < 1e-5
    assert rel_err(model.inv_cov, ref_model.inv_cov) < 1e-4
    err = capsys.readouterr().err
    assert f"{len(train_records)}/{len(train_records)} images" in err and "images/s" in err  # progress line


def test_ray_anomaly_maps_equal_in_process_maps(ray_local, demo_category, reference):
    from distributed_anomaly.distributed import anomaly_maps_ray

    _, model = reference
    test = records_of_split(load_category(demo_category), "test")
    maps = anomaly_maps_ray(model, test, 64, batch_size=4, workers=2, progress=False)
    expected = engine.anomaly_maps(model, test, 64, batch_size=4, progress=False)
    assert maps.shape == (len(test), 64, 64)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-5)  # same order as the records


def test_models_travel_as_constructor_args_plus_state_dict():
    """What the actors rebuild from (no weight download) computes exactly what the driver's model computes."""
    from distributed_anomaly.distributed.padim_fit import build_from_payload, model_payload
    from distributed_anomaly.models.stfpm import Stfpm

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for model in (tiny_padim(), Stfpm("resnet18", ["layer1", "layer2"], 64, pretrained=False, seed=3)):
        model.eval()
        if isinstance(model, Padim):  # a fitted Gaussian travels too (for scoring) ...
            model.mean.normal_()
            model.inv_cov.copy_(torch.eye(model.n_features).expand_as(model.inv_cov))
        rebuilt = build_from_payload(model_payload(model))
        with torch.inference_mode():
            assert torch.equal(rebuilt(x), model(x))
    fit_payload = model_payload(tiny_padim(), with_gaussian=False)  # ... but not into the fit
    assert "mean" not in fit_payload["state"] and "inv_cov" not in fit_payload["state"]
    assert build_from_payload(fit_payload).n_features == 20


@pytest.fixture(scope="module")
def corrupt_records(train_records, tmp_path_factory) -> tuple[list[Record], str]:
    """The training images copied, with one deep in the list truncated (a half-written PNG)."""
    folder = tmp_path_factory.mktemp("corrupt") / "train" / "good"
    folder.mkdir(parents=True)
    records = []
    for r in train_records:
        dst = folder / Path(r.path).name
        shutil.copyfile(r.path, dst)
        records.append(Record(str(dst), r.split, r.label, r.defect, r.category))
    bad = records[len(records) - 5].path
    data = Path(bad).read_bytes()
    Path(bad).write_bytes(data[: len(data) // 3])
    return records, bad


def test_corrupt_image_stops_the_fit_naming_the_file(ray_local, corrupt_records):
    from distributed_anomaly.distributed import fit_padim_ray

    records, bad = corrupt_records
    start = time.monotonic()
    with pytest.raises(ImageReadError) as exc_info:
        fit_padim_ray(tiny_padim(), records, batch_size=4, workers=2, progress=False)
    assert bad in str(exc_info.value) and "--skip-corrupt" in str(exc_info.value)
    assert "Traceback" not in str(exc_info.value)
    assert time.monotonic() - start < 300  # an error, not a hang


def test_skip_corrupt_skips_with_warning_and_counts(ray_local, corrupt_records, capsys):
    from distributed_anomaly.distributed import fit_padim_ray

    records, bad = corrupt_records
    stats, info = fit_padim_ray(tiny_padim(), records, batch_size=4, workers=2, progress=False, skip_corrupt=True)
    assert info["skipped"] == [bad] and info["num_skipped"] == 1
    assert stats.count == info["images"] == len(records) - 1
    assert bad in capsys.readouterr().err
    good = [r for r in records if r.path != bad]
    ref = engine.fit_padim(tiny_padim(), good, batch_size=8, progress=False)
    assert rel_err(stats.mean, ref.mean) < RTOL
    assert rel_err(stats.covariance(), ref.covariance()) < RTOL


# ----------------------------------------------------------------------------------------- two real nodes

DRIVER = textwrap.dedent("""
    import json, sys, time
    import numpy as np, ray
    from distributed_anomaly.data.mvtec import load_category, records_of_split
    from distributed_anomaly.distributed import ensure_ray, fit_padim_ray
    from distributed_anomaly.models.padim import Padim

    address, data, out = sys.argv[1:4]
    ensure_ray(address)
    deadline = time.monotonic() + 120
    while len([n for n in ray.nodes() if n["Alive"]]) < 2:
        assert time.monotonic() < deadline, "second node never joined"
        time.sleep(0.5)
    train = records_of_split(load_category(data), "train")
    model = Padim("resnet18", ["layer1", "layer2"], n_features=20, image_size=64, pretrained=False, seed=0)
    # 2 CPUs per worker on 3-CPU nodes: each node can hold only one pool actor, so both nodes must work.
    stats, info = fit_padim_ray(model, train, batch_size=3, workers=2, cpus_per_worker=2, threads_per_worker=1,
                                progress=False)
    np.savez(out + "/stats.npz", mean=stats.mean.numpy(), m2=stats.m2.numpy(), count=stats.count)
    info["cluster_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    json.dump(info, open(out + "/info.json", "w"))
    ray.shutdown()
""")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_node(ray_bin: str, temp_dir: str, ports: list[int], env: dict, log: Path, head_port: int | None,
                resources: dict) -> subprocess.Popen:
    """`ray start --block` in its own process group: SIGTERM to it stops exactly this node's processes."""
    common = [f"--temp-dir={temp_dir}", "--num-cpus=3", f"--resources={json.dumps(resources)}",
              f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
              f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
              f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
              f"--min-worker-port={ports[6]}", f"--max-worker-port={ports[6] + 60}", "--disable-usage-stats"]
    if head_port is None:
        args = ["start", "--head", "--block", f"--port={ports[7]}", "--include-dashboard=false",
                f"--dashboard-port={ports[8]}", f"--ray-client-server-port={ports[9]}", *common]
    else:
        args = ["start", "--block", f"--address=127.0.0.1:{head_port}", *common]
    return subprocess.Popen([ray_bin, *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def _processes_of(temp_dir: str, token: str) -> list[psutil.Process]:
    """Processes of the test cluster: their command line names its temp dir, or (workers rename themselves
    `ray::...`) their environment holds its unique token. Nothing else on the machine matches."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []) or p.environ().get("RAY_AUTH_TOKEN") == token:
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_two_node_cluster_fit_equals_in_process(train_records, demo_category, reference, tmp_path):
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # Short temp dirs (Unix socket paths are limited to ~107 bytes), unique so that only our processes match.
    base = tempfile.mkdtemp(prefix="dapd", dir="/tmp")
    token = os.urandom(32).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    ports = _free_ports(20)
    head_ports, worker_ports = ports[:10], ports[10:]
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_start_node(ray_bin, f"{base}/h", head_ports, env, tmp_path / "head.log", None,
                                 {"node_a": 1}))
        _wait_port(head_ports[7], nodes[0], 120)
        nodes.append(_start_node(ray_bin, f"{base}/w", worker_ports, env, tmp_path / "worker.log",
                                 head_ports[7], {"node_b": 1}))
        address = f"127.0.0.1:{head_ports[7]}"
        # The driver gets only the token: ensure_ray must turn token mode on itself (Ray does not, for an
        # explicit address).
        driver_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        driver = subprocess.run([sys.executable, "-c", DRIVER, address, str(demo_category), str(tmp_path)],
                                env=driver_env, capture_output=True, text=True, timeout=600)
        assert driver.returncode == 0, driver.stderr[-3000:]
        info = json.loads((tmp_path / "info.json").read_text())
        saved = np.load(tmp_path / "stats.npz")
    finally:
        for proc in reversed(nodes):  # worker node first, then the head
            with_signal(proc, signal.SIGTERM)
        for proc in reversed(nodes):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with_signal(proc, signal.SIGKILL)
                proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _processes_of(base, token) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = _processes_of(base, token)
        for p in leftovers:  # ours: their command lines name our temp dir
            with_signal_pid(p.pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
    assert not leftovers, f"processes of the test cluster outlived it: {[p.pid for p in leftovers]}"

    ref_stats, _ = reference
    assert int(saved["count"]) == info["images"] == len(train_records)
    assert len(info["cluster_nodes"]) == 2
    assert sorted(info["nodes"]) == sorted(info["cluster_nodes"])  # both nodes ran a worker ...
    assert len(info["workers"]) == 2 and all(w["images"] > 0 for w in info["workers"])  # ... that did work
    mean, m2 = torch.from_numpy(saved["mean"]), torch.from_numpy(saved["m2"])
    assert rel_err(mean, ref_stats.mean) < RTOL
    assert rel_err(m2 / (len(train_records) - 1), ref_stats.covariance()) < RTOL


def with_signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        with_signal_pid(proc.pid, sig)


def with_signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
