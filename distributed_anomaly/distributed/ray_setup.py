"""Starting or joining Ray: one local node by default, an existing cluster with an address.

Token authentication (Ray >= 2.59 turns it on by default for local clusters):

* local (no address): `ray.init` creates a token at ~/.ray/auth_token if none exists and uses it; nothing to do.
* join (`auto` or HOST:PORT): Ray only enables token mode for a driver by itself with `auto`. A cluster started
  with `RAY_AUTH_MODE=token ray start ...` needs the same token in the driver, from `RAY_AUTH_TOKEN`,
  `RAY_AUTH_TOKEN_PATH` or ~/.ray/auth_token. When one of these exists and `RAY_AUTH_MODE` is unset we switch
  the driver to token mode (a token-mode driver also connects to a cluster without authentication), and turn
  Ray's 20 s "Failed to connect" into a message that says what to set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from distributed_anomaly.data.limits import MAX_PIXELS_ENV
from distributed_anomaly.errors import UserError

LOCAL_ADDRESSES = (None, "", "local")
# A local Ray passes call arguments up to this size inside the call (see ensure_ray). Ray reads the limit per node.
INLINE_ARGUMENT_BYTES = 256 * 1024
INLINE_ARGUMENT_ENV = "RAY_max_direct_call_object_size"  # Ray's config name, in the case Ray reads it
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's switch (on by default)


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return True
    return (Path.home() / ".ray" / "auth_token").is_file()


def _enable_token_mode_for_join() -> bool:
    """Use token authentication when joining if the user has a token and did not choose a mode; True if on."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    if not _token_available():
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import; refresh it the way ray.init does for local clusters.
        from ray._raylet import Config

        Config.initialize("")
    except Exception:  # pragma: no cover - private API moved; the env var still reaches new processes
        pass
    return True


def _max_pixels_runtime_env() -> dict | None:
    """--max-pixels for a cluster's workers, which do not inherit this process's environment: a runtime_env
    for ray.init. None when unset, or when a `ray job submit` runtime_env already sets it (Ray refuses to merge
    two values of one variable)."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if not value:
        return None
    try:  # the submitted job's config, as Ray hands it to the driver
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job_vars = ((job.get("runtime_env") or {}).get("env_vars") or {}) if isinstance(job, dict) else {}
    except ValueError:
        job_vars = {}
    return None if MAX_PIXELS_ENV in job_vars else {"env_vars": {MAX_PIXELS_ENV: value}}


def ensure_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> bool:
    """Make this process a Ray driver. Returns True if this call started/joined Ray (the caller shuts it down).

    address None/""/"local": start a single-node Ray here with `num_cpus` logical CPUs (None: the machine's).
    address "auto" or HOST:PORT: join a running cluster (`num_cpus` does not apply). Already initialised: no-op.
    Worker logs are not forwarded to this terminal (log_to_driver=False); errors still reach the driver.
    dashboard: a local Ray also starts its dashboard (on 127.0.0.1; `tune` does, to watch a search).
    """
    import ray

    if ray.is_initialized():
        return False
    common = dict(log_to_driver=False, logging_level=logging.WARNING)
    if address in LOCAL_ADDRESSES:
        # Ray Train gives a worker group 60 s to start; on a small, busy machine importing torch in new worker
        # processes can take longer, which would count as a failure. A local node inherits this environment.
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
        # Arguments up to this size travel inside the call instead of through the object store (Ray's default:
        # 100 KiB). A 256 x 256 RGB image, what Serve's ingress sends its model replica, is 192 KiB: with it
        # inline, Ray's own processes spent 1.2-1.5 instead of 4.1-5.6 core-ms per request and Serve's own CPU
        # fell to 13.4-14.8 core-ms (bench/serve_cpu.py, A B A B). Larger images still go through the store.
        os.environ.setdefault(INLINE_ARGUMENT_ENV, str(INLINE_ARGUMENT_BYTES))
        # One machine has no other node to drain or preempt: Ray Train's preemption watcher, an actor process it
        # starts with every worker group (restarts included), would only cost its start here.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            **({"dashboard_host": "127.0.0.1"} if dashboard else {}),
            **common,
        )
        return True
    if num_cpus is not None:
        logging.getLogger(__name__).warning(
            "num_cpus=%s ignored: joining the existing cluster at %s", num_cpus, address
        )
    token_mode = _enable_token_mode_for_join()
    pass_on = _max_pixels_runtime_env()
    if pass_on:
        common["runtime_env"] = pass_on
    try:
        ray.init(address=address, **common)
    except ConnectionError as exc:
        hint = (
            "the token in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token may not be the cluster's"
            if token_mode
            else "if the cluster uses token authentication, set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token "
            "(`ray get-auth-token` on the head node prints it)"
        )
        raise UserError(
            f"cannot connect to the Ray cluster at {address}: {exc} (is it running and reachable? {hint})"
        ) from exc
    except Exception as exc:
        if type(exc).__name__ == "AuthenticationError":
            raise UserError(f"Ray cluster at {address} refused this driver's credentials: {exc}") from exc
        raise
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> Iterator[None]:
    """`with ray_session(addr):` -- ensure_ray, and shut Ray down afterwards only if this block started it."""
    started = ensure_ray(address, num_cpus, dashboard)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def dashboard_url() -> str | None:
    """The connected cluster's dashboard as an http:// URL, or None (no dashboard, or Ray's private API moved)."""
    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except Exception:
        return None
    return (url if url.startswith("http") else f"http://{url}") if url else None
