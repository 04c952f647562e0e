"""Models on the move: what a Ray actor or Train worker rebuilds a model from (Ray-free: torch only).

A worker must not download weights (a cluster node may have no network, and every worker would fetch them
again), and pickling a whole module ties the payload to this process's classes. So a known model travels as
its constructor arguments plus its state dict, and is rebuilt with `pretrained=False` before the state loads.
"""

from __future__ import annotations

from typing import Any

import torch

from distributed_anomaly.models.padim import Padim
from distributed_anomaly.models.patchcore import PatchCore
from distributed_anomaly.models.stfpm import Stfpm

# Buffers a PADIM or PatchCore fit produces: they travel to scorers, never into a fit (which computes them).
GAUSSIAN_KEYS = ("mean", "inv_cov")
FITTED_KEYS = (*GAUSSIAN_KEYS, "memory_bank")


def set_threads(threads: int) -> None:
    """Torch in a Ray actor uses its reservation, not every core of the node (actors share nodes)."""
    torch.set_num_threads(max(1, int(threads)))


def model_payload(model: torch.nn.Module, *, with_gaussian: bool = True) -> dict[str, Any]:
    """What an actor needs to rebuild `model` without downloading weights: constructor args + state dict."""
    drop = () if with_gaussian else FITTED_KEYS
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in drop}
    if isinstance(model, (Padim, PatchCore)):
        kwargs = dict(
            backbone=model.extractor.backbone,
            layers=list(model.extractor.layers),
            n_features=model.n_features,
            image_size=model.image_size,
        )
        if isinstance(model, PatchCore):
            kwargs.update(coreset_ratio=model.coreset_ratio, num_neighbors=model.num_neighbors, seed=model.seed)
        return {"kind": "patchcore" if isinstance(model, PatchCore) else "padim", "state": state, "kwargs": kwargs}
    if isinstance(model, Stfpm):
        return {
            "kind": "stfpm",
            "state": state,
            "kwargs": dict(
                backbone=model.teacher.backbone, layers=list(model.teacher.layers), image_size=model.image_size
            ),
        }
    return {"kind": "module", "module": model}  # anything else travels pickled


def build_from_payload(payload: dict[str, Any]) -> torch.nn.Module:
    """The model `model_payload` described, in eval mode without gradients (callers re-enable what trains)."""
    if payload["kind"] == "module":
        module = payload["module"]
    else:
        cls = {"padim": Padim, "patchcore": PatchCore, "stfpm": Stfpm}[payload["kind"]]
        module = cls(**payload["kwargs"], pretrained=False)
        missing, unexpected = module.load_state_dict(payload["state"], strict=False)
        if unexpected or set(missing) - set(FITTED_KEYS):
            raise RuntimeError(
                f"model state does not fit the rebuilt {payload['kind']}: missing {missing}, unexpected {unexpected}"
            )
    return module.eval().requires_grad_(False)
