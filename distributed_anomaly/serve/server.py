"""Starting and stopping the application from Python and from `distributed-anomaly serve`.

`start_server` validates the model folders and the port before it starts anything, starts or joins Ray,
starts Serve's HTTP proxy on HOST:PORT (unless Serve already runs on the cluster, whose proxy is then
reused), deploys the application from a config as `serve deploy` does (serve.live: so its operating point can
be changed live), and returns once /healthz answers, so the URL it reports is live.
`RunningServer.stop` undoes exactly what was started: the application always, Serve and Ray only if this
call started them (a shared cluster keeps its other applications).
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, TextIO

from distributed_anomaly.errors import UserError
from distributed_anomaly.serve.settings import DEFAULT_REQUEST_TIMEOUT_S, AppConfig, is_local_host

READY_TIMEOUT_S = 120.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
logger = logging.getLogger(__name__)


def display_host(host: str) -> str:
    """The host to put in a URL: a wildcard bind address is reached as 127.0.0.1 from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def check_port_free(host: str, port: int) -> None:
    """Refuse a busy port now; Serve's proxy would otherwise fail to bind in the background, silently."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be 1-65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: closed connections do not count
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server using "
                "the port? choose another with --port)"
            ) from None


def wait_until_healthy(url: str, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Poll GET URL/healthz until it answers 200; UserError with the last problem on timeout."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return json.loads(resp.read())
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.25)
    raise UserError(
        f"the server did not become healthy at {url}/healthz within {timeout_s:.0f} s ({last}); "
        "see `serve status` and the Ray logs"
    )


@dataclass
class RunningServer:
    url: str
    app_name: str
    handle: Any  # the application's DeploymentHandle (AnomalyIngress): handle.predict.remote(array)
    models: list[str]
    started_ray: bool  # this process started or joined Ray (and disconnects at stop)
    started_serve: bool  # Serve was not running on the cluster before
    local_ray: bool  # the Ray this process started itself: stopping it stops everything on it

    def stop(self) -> None:
        _teardown(self.app_name, self.started_ray, self.started_serve, self.local_ray)


def _teardown(app_name: str, started_ray: bool, started_serve: bool, local_ray: bool) -> None:
    import ray
    from ray import serve

    try:
        if not (started_ray and local_ray):  # on a shared cluster remove only what we added
            if started_serve:
                serve.shutdown()
            else:
                serve.delete(app_name)
    finally:
        if started_ray:
            ray.shutdown()


def serve_client():
    """The running Serve controller's client, or None. A client cached by this process is checked first: Serve
    may have been shut down by another driver since (Ray's own lookup would trust the stale cache)."""
    from ray.serve import context

    try:
        client, _ = context._check_cached_client_alive()
        return client or context._get_global_client(raise_if_no_controller_running=False)
    except Exception:  # private API changed: behave as if Serve were not running
        return None


def _local_cpus(config: AppConfig) -> int:
    """Logical CPUs of the local Ray `serve` starts: enough for every replica, up to autoscale's MAX
    (distributed.cpus)."""
    from distributed_anomaly.distributed.cpus import serve_ray_cpus

    replicas = config.autoscale[1] if config.autoscale else config.replicas
    num_cpus = serve_ray_cpus(replicas, config.cpus_per_replica)
    logger.info(
        f"starting a local Ray with {num_cpus} logical CPUs for {replicas} replica(s) x "
        f"{config.cpus_per_replica:g} CPUs (--address joins a running cluster instead)"
    )
    return num_cpus


def start_server(
    config: AppConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    app_name: str | None = None,
    num_cpus: int | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    proxy_location: str | None = None,
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
    user_config: dict[str, Any] | None = None,
) -> RunningServer:
    """Deploy the application and return once it answers over HTTP (see the module docstring).

    user_config: AnomalyModel's initial operating point (serve.operating), e.g. {"models": {"washer":
    {"threshold": 12.0}}}; change it later with serve.live.set_operating_point / `serve-config set`.

    proxy_location (when this call starts Serve): "EveryNode" (Serve's default: an HTTP proxy on every node),
    "HeadOnly" (one proxy; e.g. several nodes on one machine, which would all bind the same port).
    request_timeout_s (when this call starts Serve): the proxies answer 408 to a request not done by then.
    """
    import ray
    from ray import serve

    from distributed_anomaly.distributed.ray_setup import LOCAL_ADDRESSES, ensure_ray
    from distributed_anomaly.serve.deployments import APP_NAME, build_app
    from distributed_anomaly.serve.live import app_config, apply_app, wait_running
    from distributed_anomaly.serve.operating import parse_user_config

    app_name = app_name or APP_NAME
    build_app(config)  # reads and checks every IR folder (and the arguments) before anything starts
    if user_config is not None:
        from distributed_anomaly.serve.registry import discover_models

        parse_user_config(user_config, list(discover_models(config.models)))
    local = address in LOCAL_ADDRESSES
    if local and not ray.is_initialized():
        check_port_free(host, port)  # a fresh local Ray cannot have Serve on it yet: fail before starting Ray
        num_cpus = num_cpus or _local_cpus(config)
    started_ray = ensure_ray(address, num_cpus=num_cpus)
    started_serve = False
    try:
        need = config.min_replicas * config.cpus_per_replica
        have = float(ray.cluster_resources().get("CPU", 0.0))
        if need > have and local:
            raise UserError(
                f"{config.min_replicas} replica(s) x {config.cpus_per_replica:g} CPUs need {need:g} CPUs, "
                f"but this Ray has {have:g}: lower --replicas (or --autoscale's MIN) or --cpus-per-replica"
            )
        client = serve_client()
        if client is None:
            if local:  # on a cluster the proxies run on its nodes, not necessarily on this machine
                check_port_free(host, port)
            timeout = {"request_timeout_s": request_timeout_s} if request_timeout_s else {}
            serve.start(
                http_options={"host": host, "port": port, **timeout},
                **({"proxy_location": proxy_location} if proxy_location else {}),
            )
            started_serve = True
        else:  # Serve already runs on this cluster: its proxy (and its host/port) serve our app too
            host, port = client.http_config.host, client.http_config.port
        client = client or serve_client()
        job_env = dict(ray.get_runtime_context().runtime_env or {})  # inherited as serve.run would
        apply_app(client, app_config(config, app_name, user_config, job_env))
        wait_running(client, app_name, ready_timeout_s)
        handle = serve.get_app_handle(app_name)
        url = f"http://{display_host(host)}:{port}"
        health = wait_until_healthy(url, ready_timeout_s)
        return RunningServer(url, app_name, handle, list(health.get("models", [])), started_ray, started_serve, local)
    except BaseException:
        if started_serve or started_ray:
            _teardown(app_name, started_ray, started_serve, local)  # the app may be half deployed: delete it too
        raise


def _banner(server: RunningServer, config: AppConfig, host: str, port: int) -> str:
    if not server.started_serve:
        where = (
            " (Serve was already running on this cluster: its proxy serves this app; --host and --port do not apply)"
        )
    else:
        where = f" (listening on {host}:{port})" if display_host(host) != host else ""
    auth = "; requests need the API key" if config.api_key else ""
    return (
        f"serving {len(server.models)} model(s): {', '.join(server.models)}{auth}\n"
        f"  URL      {server.url}{where}\n"
        f"  predict  curl -s --data-binary @image.png '{server.url}/predict?task=segmentation"
        f"{'&model=' + server.models[0] if len(server.models) > 1 else ''}'\n"
        f"  docs     {server.url}/docs    health {server.url}/healthz    models {server.url}/metadata\n"
        "Ctrl-C to stop"
    )


def serve_forever(
    config: AppConfig,
    host: str,
    port: int,
    address: str | None = None,
    out: TextIO = sys.stdout,
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
) -> int:
    """`distributed-anomaly serve`: start, print the URL, block until SIGINT (Ctrl-C) or SIGTERM (a service
    manager's stop), then remove what was started and return 0.

    The handlers are installed again once Serve runs: `ray.init` replaces SIGTERM's with one that exits with
    status 15. During the teardown further signals are ignored, so a second Ctrl-C cannot leave it half done.
    """
    if not config.api_key and not is_local_host(host):
        logger.warning(
            f"listening on {host} without an API key: anyone who can reach this port can use the models "
            "(set --api-key-file or $DISTRIBUTED_ANOMALY_API_KEY)"
        )
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def on_signal(signum, frame):
        stop.set()
        raise KeyboardInterrupt  # interrupts a start-up in progress; the wait below just returns

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        try:
            server = start_server(config, host, port, address, request_timeout_s=request_timeout_s)
        except (KeyboardInterrupt, SystemExit) as exc:  # stopped while starting: start_server cleaned up
            if isinstance(exc, SystemExit) and exc.code != signal.SIGTERM:
                raise
            print("stopped before the server was up", file=out, flush=True)
            return 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, frame: stop.set())
        try:
            print(_banner(server, config, host, port), file=out, flush=True)
            while not stop.wait(1.0):
                pass
        finally:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            print("stopping ...", file=out, flush=True)
            server.stop()
        print("stopped", file=out, flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
