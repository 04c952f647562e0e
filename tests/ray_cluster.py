"""A real multi-node Ray cluster on this machine for tests: `ray start` processes with token authentication.

    with two_node_cluster(tmp_path, dashboard=True) as c:
        subprocess.run([...], env=c.client_env)   # c.address (GCS), c.dashboard (job API), c.token
        c.node_ids["node_b"]                      # the worker node's id: both nodes are alive when this yields
        state(c, "tasks", node_id=c.node_ids["node_b"])   # the Ray state API (dashboard=True): who ran where

The test session shares one such cluster (the `two_nodes` fixture in conftest.py, with the dashboard).

Each node is `ray start --block` in its own process group with its own ports and temp dir, so stopping the
cluster stops exactly its processes; anything left over (matched by temp dir or token) is killed, and the
context manager fails the test if processes outlived it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY_BIN = str(Path(sys.executable).with_name("ray"))
STOP_GRACE_S = 2


@dataclass
class Cluster:
    address: str  # 127.0.0.1:GCS_PORT
    token: str
    client_env: dict  # environment of a client/driver: the token, no RAY_ADDRESS
    dashboard: str | None = None  # http://127.0.0.1:PORT (job submission API) when started with dashboard=True
    nodes: list = field(default_factory=list)
    node_ids: dict = field(default_factory=dict)  # {"node_a": head NodeID, "node_b": worker NodeID}, both alive


def free_ports(n: int) -> list[int]:
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


WORKER_PORTS = 60  # each node's workers listen on ports [ports[6], ports[6] + WORKER_PORTS]


def node_ports() -> tuple[list[int], list[int]]:
    """Ten free ports for each node, such that neither node's worker-port range holds any other chosen port
    (Ray refuses to start a node whose components would share a port)."""
    for _ in range(100):
        ports = free_ports(20)
        ranges = [range(p, p + WORKER_PORTS + 1) for p in (ports[6], ports[16])]
        others = [p for i, p in enumerate(ports) if i not in (6, 16)]
        if not any(p in r for r in ranges for p in others) and not set(ranges[0]) & set(ranges[1]):
            return ports[:10], ports[10:]
    raise AssertionError("no two disjoint port sets found for the test cluster")


def _start_node(
    temp_dir: str,
    ports: list[int],
    env: dict,
    log: Path,
    head_port: int | None,
    resources: dict,
    cpus: int,
    dashboard: bool,
) -> subprocess.Popen:
    common = [
        f"--temp-dir={temp_dir}",
        f"--num-cpus={cpus}",
        f"--resources={json.dumps(resources)}",
        f"--node-manager-port={ports[0]}",
        f"--object-manager-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}",
        f"--dashboard-agent-grpc-port={ports[3]}",
        f"--metrics-export-port={ports[4]}",
        f"--runtime-env-agent-port={ports[5]}",
        f"--min-worker-port={ports[6]}",
        f"--max-worker-port={ports[6] + WORKER_PORTS}",
        "--disable-usage-stats",
    ]
    if head_port is None:
        args = [
            "start",
            "--head",
            "--block",
            f"--port={ports[7]}",
            f"--include-dashboard={str(dashboard).lower()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports[8]}",
            f"--ray-client-server-port={ports[9]}",
            *common,
        ]
    else:
        args = ["start", "--block", f"--address=127.0.0.1:{head_port}", *common]
    return subprocess.Popen(
        [RAY_BIN, *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


NODES_PROBE = """
import json, sys, time
import psutil, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[2])
def running(pid):  # a `ray start` process that exited is a zombie until the test reaps it
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= 2 or time.monotonic() > deadline or not all(running(int(p)) for p in sys.argv[3:]):
        break
    time.sleep(0.5)
print(json.dumps({k: n["NodeID"] for n in alive for k in n["Resources"] if k.startswith("node_")}))
"""


def state(cluster: Cluster, kind: str, limit: int = 10000, detail: bool = False, **filters: str) -> list[dict]:
    """The Ray state API over the dashboard's HTTP endpoint (what `ray list KIND --filter k=v` asks), with the
    cluster's token: `state(c, "nodes")`, `state(c, "tasks", node_id=...)`, `state(c, "actors", state="ALIVE")`."""
    assert cluster.dashboard, "the state API needs a cluster started with dashboard=True"
    query = [("limit", str(limit)), ("detail", str(detail).lower())]
    for key, value in filters.items():
        query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
    req = urllib.request.Request(
        f"{cluster.dashboard}/api/v0/{kind}?{urllib.parse.urlencode(query)}",
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = json.loads(resp.read())
    assert body.get("result"), body.get("msg")
    return body["data"]["result"]["result"]


def wait_for_nodes(cluster: Cluster, timeout: float) -> dict[str, str]:
    """Until both nodes are registered and alive: {"node_a": NodeID, "node_b": NodeID} (the custom resources)."""
    deadline = time.monotonic() + timeout
    found: dict[str, str] = {}
    if cluster.dashboard:  # cheap: HTTP to the head's dashboard
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in cluster.nodes), "a `ray start` node exited"
            try:
                alive = [n for n in state(cluster, "nodes", detail=True) if n["state"] == "ALIVE"]
            except OSError:  # the dashboard's state API not up yet
                alive = []
            found = {k: n["node_id"] for n in alive for k in n.get("resources_total", {}) if k.startswith("node_")}
            if set(found) == {"node_a", "node_b"}:
                return found
            time.sleep(0.5)
    else:  # a driver process asks the GCS
        pids = [str(p.pid) for p in cluster.nodes]
        probe = subprocess.run(
            [sys.executable, "-c", NODES_PROBE, cluster.address, str(timeout), *pids],
            env={**cluster.client_env, "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=timeout + 60,
            check=False,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        found = json.loads(probe.stdout.strip().splitlines()[-1])
    exited = [p.args[1:4] for p in cluster.nodes if p.poll() is not None]
    assert not exited, f"`ray start` exited (see head.log / worker.log): {exited}"
    assert set(found) == {"node_a", "node_b"} and found["node_a"] != found["node_b"], (
        f"both nodes should be alive after {timeout:.0f} s, found {found}"
    )
    return found


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


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@contextlib.contextmanager
def two_node_cluster(
    logs: Path, *, cpus: int = 3, dashboard: bool = False, extra_env: dict | None = None
) -> Iterator[Cluster]:
    """Head (resource node_a) + worker (node_b), token auth on; yields once both nodes are alive (their ids in
    `node_ids`); stops them all."""
    base = tempfile.mkdtemp(prefix="dapd", dir="/tmp")  # short: Unix socket paths are limited to ~107 bytes
    token = os.urandom(32).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", **(extra_env or {}))
    head_ports, worker_ports = node_ports()
    nodes: list[subprocess.Popen] = []
    leftovers: list[psutil.Process] = []
    try:
        nodes.append(_start_node(f"{base}/h", head_ports, env, logs / "head.log", None, {"node_a": 1}, cpus, dashboard))
        wait_port(head_ports[7], nodes[0], 120)
        if dashboard:
            wait_port(head_ports[8], nodes[0], 120)
        nodes.append(
            _start_node(f"{base}/w", worker_ports, env, logs / "worker.log", head_ports[7], {"node_b": 1}, cpus, False)
        )
        client_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        cluster = Cluster(
            address=f"127.0.0.1:{head_ports[7]}",
            token=token,
            client_env=client_env,
            dashboard=f"http://127.0.0.1:{head_ports[8]}" if dashboard else None,
            nodes=nodes,
        )
        cluster.node_ids = wait_for_nodes(cluster, 180)
        yield cluster
    finally:
        for proc in reversed(nodes):  # worker node first, then the head
            if proc.poll() is None:
                _signal(proc.pid, signal.SIGTERM)
        # `ray start --block` stops its node's processes on SIGTERM, gracefully: after a job, the worker node
        # takes ~30 s. A test cluster keeps nothing, so after STOP_GRACE_S its whole process group
        # (the node's processes: it was started in a session of its own) is killed.
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in reversed(nodes):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _processes_of(base, token) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = _processes_of(base, token)
        for p in leftovers:  # ours: their command lines name our temp dir, or they hold our token
            _signal(p.pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
    assert not leftovers, f"processes of the test cluster outlived it: {[p.pid for p in leftovers]}"
