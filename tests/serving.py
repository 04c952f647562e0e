"""Helper: an application deployed on the session's Serve (conftest's `serve_http`) for as long as a test needs it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from distributed_anomaly.serve.server import RunningServer, start_server
from distributed_anomaly.serve.settings import AppConfig


@contextlib.contextmanager
def deployed(config: AppConfig, port: int) -> Iterator[RunningServer]:
    """start_server joins the running Serve (its proxy on `port`) and the Ray of this process; on exit only the
    application is deleted, as on a shared cluster."""
    server = start_server(config, "127.0.0.1", port)
    assert not server.started_serve and not server.started_ray  # Ray and Serve are the session's: joined
    try:
        yield server
    finally:
        server.stop()
