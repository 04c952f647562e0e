"""Starting and stopping the application from Python and from `distributed-anomaly serve`.

`start_server` validates the model folders and the port before it starts anything, starts or joins Ray,
starts Serve's HTTP proxy on HOST:PORT (unless Serve already runs on the cluster, whose proxy is then
reused), deploys the application, and returns once /healthz answers, so the URL it reports is live.
`RunningServer.stop` undoes exactly what was started: the application always, Serve and Ray only if this
call started them (a shared cluster keeps its other applications).
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, TextIO

from distributed_anomaly.errors import UserError
from distributed_anomaly.serve.settings import AppConfig

READY_TIMEOUT_S = 120.0


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


def _serve_client():
    """The running Serve controller's client, or None. A client cached by this process is checked first: Serve
    may have been shut down by another driver since (Ray's own lookup would trust the stale cache)."""
    from ray.serve import context

    try:
        client, _ = context._check_cached_client_alive()
        return client or context._get_global_client(raise_if_no_controller_running=False)
    except Exception:  # private API changed: behave as if Serve were not running
        return None


def start_server(
    config: AppConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    app_name: str | None = None,
    num_cpus: int | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    proxy_location: str | None = None,
) -> RunningServer:
    """Deploy the application and return once it answers over HTTP (see the module docstring).

    proxy_location (when this call starts Serve): "EveryNode" (Serve's default: an HTTP proxy on every node),
    "HeadOnly" (one proxy; e.g. several nodes on one machine, which would all bind the same port).
    """
    import ray
    from ray import serve

    from distributed_anomaly.distributed.ray_setup import LOCAL_ADDRESSES, ensure_ray
    from distributed_anomaly.serve.deployments import APP_NAME, build_app

    app_name = app_name or APP_NAME
    application = build_app(config)  # reads and checks every IR folder before anything starts
    local = address in LOCAL_ADDRESSES
    if local and not ray.is_initialized():
        check_port_free(host, port)  # a fresh local Ray cannot have Serve on it yet: fail before starting Ray
    started_ray = ensure_ray(address, num_cpus=num_cpus)
    started_serve = False
    try:
        need = config.replicas * config.cpus_per_replica
        have = float(ray.cluster_resources().get("CPU", 0.0))
        if need > have and local:
            raise UserError(
                f"{config.replicas} replica(s) x {config.cpus_per_replica:g} CPUs need {need:g} CPUs, "
                f"but this Ray has {have:g}: lower --replicas or --cpus-per-replica"
            )
        client = _serve_client()
        if client is None:
            if local:  # on a cluster the proxies run on its nodes, not necessarily on this machine
                check_port_free(host, port)
            serve.start(
                http_options={"host": host, "port": port},
                **({"proxy_location": proxy_location} if proxy_location else {}),
            )
            started_serve = True
        else:  # Serve already runs on this cluster: its proxy (and its host/port) serve our app too
            host, port = client.http_config.host, client.http_config.port
        handle = serve.run(application, name=app_name, route_prefix="/")
        url = f"http://{display_host(host)}:{port}"
        health = wait_until_healthy(url, ready_timeout_s)
        return RunningServer(url, app_name, handle, list(health.get("models", [])), started_ray, started_serve, local)
    except BaseException:
        if started_serve or started_ray:
            _teardown(app_name, started_ray, started_serve, local)  # the app may be half deployed: delete it too
        raise


def serve_forever(config: AppConfig, host: str, port: int, address: str | None = None, out: TextIO = sys.stdout) -> int:
    """`distributed-anomaly serve`: start, print the URL, block until Ctrl-C or SIGTERM, then stop cleanly."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # a service manager's stop is a Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        server = start_server(config, host, port, address)
        try:
            if not server.started_serve:
                where = (
                    " (Serve was already running on this cluster: its proxy serves this app; --host and "
                    "--port do not apply)"
                )
            else:
                where = f" (listening on {host}:{port})" if display_host(host) != host else ""
            auth = "; requests need the API key" if config.api_key else ""
            print(
                f"serving {len(server.models)} model(s): {', '.join(server.models)}{auth}\n"
                f"  URL      {server.url}{where}\n"
                f"  predict  curl -s --data-binary @image.png '{server.url}/predict?task=segmentation"
                f"{'&model=' + server.models[0] if len(server.models) > 1 else ''}'\n"
                f"  docs     {server.url}/docs    health {server.url}/healthz    models {server.url}/metadata\n"
                "Ctrl-C to stop",
                file=out,
                flush=True,
            )
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            print("stopping ...", file=out, flush=True)
            server.stop()
        print("stopped", file=out, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
