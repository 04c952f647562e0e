"""Ray-backed fitting and scoring: same results as the in-process engine, on a cluster of any size.

    from distributed_anomaly.distributed import ray_session, fit_padim_ray, anomaly_maps_ray
    with ray_session(address):            # None: local single-node Ray; "auto" or HOST:PORT: join a cluster
        stats, info = fit_padim_ray(model, records, batch_size=32, workers=4, skip_corrupt=False)
        maps = anomaly_maps_ray(model, test_records, model.image_size, batch_size=32, workers=4)

Modules: ray_setup (start or join Ray), pool (the Ray Data actor-pool pipeline and its checks), payload (models
as constructor args + state dict), padim_fit (the PADIM fit), patchcore_fit (PatchCore's shard
coresets), scoring (batch inference), stfpm_train (the STFPM driver), stfpm_worker (its Ray Train loop),
stfpm_steps (its Ray-free epoch), shards (how Ray Train splits its data, torch-free), checkpoints (its
checkpoints), faults (fault hooks). payload, stfpm_steps, checkpoints and faults never import Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["anomaly_maps_ray", "dashboard_url", "ensure_ray", "fit_padim_ray", "fit_patchcore_ray", "ray_session"]

_HOMES = {
    "anomaly_maps_ray": "scoring",
    "fit_padim_ray": "padim_fit",
    "fit_patchcore_ray": "patchcore_fit",
    "ensure_ray": "ray_setup",
    "ray_session": "ray_setup",
    "dashboard_url": "ray_setup",
}


# Lazy on purpose (PEP 562), rather than imports at the top: importing this package must not import Ray, or
# the Ray-free modules above (checkpoints, stfpm_steps, ...) could not be used without it.
def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
