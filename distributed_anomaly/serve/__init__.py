"""Ray Serve: exported OpenVINO models behind a deployment handle and an HTTP endpoint.

    distributed-anomaly serve --model ir/washer ir/tile --port 8000          # the CLI (blocks until Ctrl-C)
    serve run distributed_anomaly.serve:app models=ir/washer,ir/tile        # Ray's CLI, same application
    serve deploy cluster/serve_config.yaml                                  # a running cluster

    from distributed_anomaly.serve import AppConfig, start_server
    server = start_server(AppConfig(models=["ir/washer"]), port=8000)
    server.handle.predict.remote(rgb_array, "detection").result()          # same JSON as POST /predict
    server.stop()

`registry` (which models, which exports), `requests` (what a request means), `responses` (what an answer
says), `settings` (the application's arguments) and `operating` (live thresholds) are Ray-free and unit-tested
without a cluster; `deployments` holds the model deployment and the application builder, `ingress` the HTTP
front, `metrics` the application's own metrics, `server` starting and stopping, `live` deploying from a config
and changing the operating point of a running application (`distributed-anomaly serve-config`).
Ray and FastAPI are imported only when the deployments are used.
"""

from __future__ import annotations

from typing import Any

# Imported on first use: `settings` alone (what the CLI reads its defaults from) must not load torch or Ray.
_LAZY = {
    "AppConfig": "distributed_anomaly.serve.settings",
    "HTTPError": "distributed_anomaly.serve.requests",
    "ModelEntry": "distributed_anomaly.serve.registry",
    "discover_models": "distributed_anomaly.serve.registry",
    "app": "distributed_anomaly.serve.deployments",
    "build_app": "distributed_anomaly.serve.deployments",
    "AnomalyModel": "distributed_anomaly.serve.deployments",
    "AnomalyIngress": "distributed_anomaly.serve.ingress",
    "APP_NAME": "distributed_anomaly.serve.deployments",
    "MODEL_DEPLOYMENT": "distributed_anomaly.serve.deployments",
    "start_server": "distributed_anomaly.serve.server",
    "serve_forever": "distributed_anomaly.serve.server",
    "RunningServer": "distributed_anomaly.serve.server",
}

__all__ = [
    "APP_NAME",
    "MODEL_DEPLOYMENT",
    "AnomalyIngress",
    "AnomalyModel",
    "AppConfig",
    "HTTPError",
    "ModelEntry",
    "RunningServer",
    "app",
    "build_app",
    "discover_models",
    "serve_forever",
    "start_server",
]


def __getattr__(name: str) -> Any:  # `serve run distributed_anomaly.serve:app` resolves `app` through this
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
