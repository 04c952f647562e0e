"""Deploying the application declaratively, and changing its operating point while it runs.

The application is deployed as `serve deploy` does (an application config: import path, builder args, and a
user_config for AnomalyModel), so Serve can apply a new user_config to the running replicas through
`reconfigure` (a "lightweight update": same replicas, no restart), and `serve-config set` can read the deployed
config back, change the user_config, check it on a replica and apply it. Apps deployed with `serve.run` have no
such config and are refused with a message. Serve's config API replaces every declaratively deployed app of the
cluster at once, so the other apps' configs are sent back unchanged.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

from distributed_anomaly.errors import UserError
from distributed_anomaly.serve.operating import KEYS, OperatingPoint
from distributed_anomaly.serve.settings import AppConfig

IMPORT_PATH = "distributed_anomaly.serve:app"
MODEL_DEPLOYMENT = "AnomalyModel"  # deployments.MODEL_DEPLOYMENT (not imported: that module loads Ray Serve)
POLL_S = 0.2


def app_config(
    config: AppConfig,
    app_name: str,
    user_config: Mapping[str, Any] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `serve deploy` application entry of this configuration. `runtime_env`: the deploying job's (e.g. the
    working_dir `ray job submit` uploaded), so the replicas run the submitted code, as `serve.run` would give them."""
    app = {
        "name": app_name,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": config.to_args(),
        "deployments": [{"name": MODEL_DEPLOYMENT, "user_config": dict(user_config or {"models": {}})}],
    }
    if runtime_env:
        app["runtime_env"] = dict(runtime_env)
    return app


def _declarative_apps(client) -> dict[str, dict[str, Any]]:
    details = client.get_serve_details()
    return {
        name: dict(app["deployed_app_config"])
        for name, app in (details.get("applications") or {}).items()
        if app.get("deployed_app_config")
    }


def apply_app(client, app: Mapping[str, Any]) -> None:
    """Deploy or update one application, resending the cluster's other declarative apps unchanged."""
    from ray.serve.schema import ServeDeploySchema

    apps = _declarative_apps(client)
    apps[app["name"]] = dict(app)
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": list(apps.values())}))


def wait_running(client, app_name: str, timeout_s: float, user_config: Mapping[str, Any] | None = None) -> None:
    """Until the app is RUNNING (and, with `user_config`, AnomalyModel is HEALTHY with it: every replica has
    been reconfigured); UserError with Serve's message if the deploy failed or on timeout."""
    deadline, last = time.monotonic() + timeout_s, "not deployed yet"
    while time.monotonic() < deadline:
        app = (client.get_serve_details().get("applications") or {}).get(app_name)
        if app:
            status, last = str(app.get("status")), app.get("message") or str(app.get("status"))
            model = (app.get("deployments") or {}).get(MODEL_DEPLOYMENT) or {}
            if status.endswith("DEPLOY_FAILED"):
                raise UserError(f"Serve could not deploy {app_name}: {last}")
            if status.endswith("UNHEALTHY") or str(model.get("status")).endswith("UNHEALTHY"):
                last = model.get("message") or last
            ready = status.endswith("RUNNING")
            if user_config is not None:
                applied = (model.get("deployment_config") or {}).get("user_config")
                ready = ready and applied == dict(user_config) and str(model.get("status")).endswith("HEALTHY")
            if ready:
                return
        time.sleep(POLL_S)
    raise UserError(f"{app_name} did not become ready within {timeout_s:.0f} s ({last}); see `serve status`")


def deployed_user_config(client, app_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the app's deployed config, AnomalyModel's user_config in it)."""
    apps = _declarative_apps(client)
    if app_name not in apps:
        raise UserError(
            f"no application {app_name!r} deployed from a config on this cluster (one started by "
            "`distributed-anomaly serve` or `serve deploy` is needed; `serve.run` apps cannot be changed live)"
        )
    app = copy.deepcopy(apps[app_name])
    model = next((d for d in app.get("deployments") or [] if d.get("name") == MODEL_DEPLOYMENT), {})
    return app, dict(model.get("user_config") or {"models": {}})


def updated_user_config(
    current: Mapping[str, Any], model: str, changes: Mapping[str, float | None], reset: bool = False
) -> dict[str, Any]:
    """One model's settings changed in a user_config: `reset` drops them (back to the export's), a threshold
    replaces a target_fpr and the other way round, None values leave a setting as it is."""
    models = {k: dict(v) for k, v in (current.get("models") or {}).items()}
    own = {} if reset else models.get(model, {})
    new = {k: v for k, v in changes.items() if v is not None}
    if "threshold" in new:
        own.pop("target_fpr", None)
    if "target_fpr" in new:
        own.pop("threshold", None)
    own.update(new)
    OperatingPoint.parse(own, model)  # refuses bad values here, before anything is sent
    if own:
        models[model] = own
    else:
        models.pop(model, None)
    return {"models": models}


def set_operating_point(
    app_name: str, model: str, changes: Mapping[str, float | None], reset: bool = False, timeout_s: float = 60.0
) -> dict[str, Any]:
    """`serve-config set`: check the new operating point on a replica, apply it live, wait until every replica
    uses it; returns what it sets for `model` (threshold, pixel_threshold, threshold_source, sensitivity)."""
    from ray import serve

    from distributed_anomaly.serve.server import serve_client

    unknown = sorted(set(changes) - set(KEYS))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}")
    client = serve_client()
    if client is None:
        raise UserError("Serve is not running on this cluster (start it with `distributed-anomaly serve`)")
    app, current = deployed_user_config(client, app_name)
    new = updated_user_config(current, model, changes, reset)
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name)
    try:
        preview = handle.preview.remote(new).result()
    except Exception as exc:  # the replica's UserError (unknown model, no calibration scores), as Ray wraps it
        cause = getattr(exc, "cause", None) or exc
        raise UserError(str(cause).strip().splitlines()[-1]) from None
    deployments = [d for d in app.get("deployments") or [] if d.get("name") != MODEL_DEPLOYMENT]
    model_entry = next((d for d in app.get("deployments") or [] if d.get("name") == MODEL_DEPLOYMENT), {})
    app["deployments"] = [*deployments, {**model_entry, "name": MODEL_DEPLOYMENT, "user_config": new}]
    apply_app(client, app)
    wait_running(client, app_name, timeout_s, user_config=new)
    return preview.get(model, {})


def show_operating_point(app_name: str) -> dict[str, Any]:
    """`serve-config show`: the thresholds a model replica uses now, per model, and the user_config."""
    from ray import serve

    return serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name).operating_point.remote().result()
