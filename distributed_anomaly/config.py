"""Typed, validated configuration of one training run (ModelConfig, TrainConfig: stored in RUN_DIR/config.json),
of where it runs (Execution) and of a `score` job (ScoreJob). Torch-free: the command line reads its defaults
from these dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from distributed_anomaly.data.sizes import ImageSize, check_size
from distributed_anomaly.errors import UserError
from distributed_anomaly.models.specs import (
    DEFAULT_BACKBONE,
    STFPM_LR,
    STFPM_MOMENTUM,
    STFPM_PATIENCE,
    STFPM_WEIGHT_DECAY,
    check_n_features,
    default_layers,
    get_spec,
    validate_layers,
)
from distributed_anomaly.postprocess import DEFAULT_TASK, TASKS

MODELS = ("padim", "stfpm", "patchcore")
# Where PADIM's frozen backbone runs in fits and scoring (frozen.py); results agree within the tested tolerance.
RUNTIMES = ("openvino", "torch")
# OpenVINO inference precisions of a frozen network (frozen_ir.FROZEN_PRECISIONS, repeated here: config sits below it).
FROZEN_PRECISIONS = ("f32", "bf16")
DEFAULT_RUNTIME = "openvino"
DEFAULT_EPOCHS = {"padim": 1, "stfpm": 100, "patchcore": 1}
DEFAULT_BATCH_SIZE = {"padim": 32, "stfpm": 32, "patchcore": 32}  # stfpm: anomalib's default, same loss scale
# Models whose fit is one pass of a frozen backbone (Ray Data actor pool), as opposed to STFPM's training.
FROZEN_FIT_MODELS = ("padim", "patchcore")


@dataclass(frozen=True)
class ModelConfig:
    """What defines the network and its outputs; enough to rebuild the module from a state dict."""

    model: str = "padim"
    backbone: str = DEFAULT_BACKBONE
    layers: tuple[str, ...] = ()
    n_features: int | None = None  # PADIM: channel subset; PatchCore: pooled dimension; None -> paper default
    image_size: ImageSize = 256  # S (S x S) or (H, W); stored as an int when square (data.sizes)
    seed: int = 0
    coreset_ratio: float | None = None  # PatchCore only; None -> 0.1
    num_neighbors: int | None = None  # PatchCore only (image-score reweighting); None -> 9

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        spec = get_spec(self.backbone)
        object.__setattr__(self, "layers", validate_layers(spec, self.layers or default_layers(spec, self.model)))
        object.__setattr__(self, "image_size", check_size(self.image_size))
        if self.model == "stfpm" and self.n_features is not None:
            raise UserError("--n-features applies to PADIM only (and to PatchCore: its pooled dimension), not to STFPM")
        self._check_patchcore()
        if self.n_features is not None:
            check_n_features(self.n_features, sum(spec.taps[l][0] for l in self.layers), self.layers, self.backbone)

    def _check_patchcore(self) -> None:
        if self.model != "patchcore":
            if self.coreset_ratio is not None or self.num_neighbors is not None:
                raise UserError("--coreset-ratio and --num-neighbors apply to PatchCore only")
            return
        if self.coreset_ratio is not None and not 0.0 < self.coreset_ratio <= 1.0:
            raise UserError(f"--coreset-ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.num_neighbors is not None and self.num_neighbors < 1:
            raise UserError(f"--num-neighbors must be >= 1, got {self.num_neighbors}")


@dataclass(frozen=True)
class TrainConfig:
    """How the model is fitted; does not change what a saved model computes."""

    epochs: int = 0  # 0 -> the model's default
    lr: float = STFPM_LR
    momentum: float = STFPM_MOMENTUM
    weight_decay: float = STFPM_WEIGHT_DECAY
    patience: int = STFPM_PATIENCE
    batch_size: int = 0  # 0 -> the model's default
    val_fraction: float = 0.1
    pretrained: bool = True
    weights_file: str | None = None
    threshold: float | None = None
    pixel_threshold: float | None = None
    target_fpr: float | None = None  # thresholds at this false-alarm rate on the normal calibration images
    calibrate_on_test: bool = False
    bn_recompute: bool = True  # STFPM: exact student batch-norm statistics of the kept weights (engine)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 0 or self.patience < 1:
            raise UserError("epochs and batch size must be >= 0 (0 = default) and patience >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.target_fpr is not None and not 0.0 <= self.target_fpr < 1.0:
            raise UserError(f"--target-fpr must be a share in [0, 1), e.g. 0.01, got {self.target_fpr}")
        if self.target_fpr is not None and self.threshold is not None:
            raise UserError("give --threshold or --target-fpr, not both")

    def resolved(self, model: str) -> TrainConfig:
        return replace(
            self, epochs=self.epochs or DEFAULT_EPOCHS[model], batch_size=self.batch_size or DEFAULT_BATCH_SIZE[model]
        )


def to_dict(obj: Any) -> dict:
    d = asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def from_dict(cls: type, d: dict) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise UserError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class Execution:
    """Where the fit runs; does not change what is computed (tests check the Ray and in-process fits agree).

    workers 0 and no address: in this process. workers >= 1 or an address: on Ray (a local single-node Ray when
    no address is given; `auto` or HOST:PORT joins a cluster).
    """

    workers: int = 0
    address: str | None = None
    skip_corrupt: bool = False
    storage: str | None = None  # shared storage (path or URI): STORAGE/<RUN_DIR name> mirrors RUN_DIR
    resume: str | None = None  # the Ray STFPM training run folder to continue (set by `resume`)
    run_name: str | None = None  # that folder's name under storage; default a fresh unique one
    max_failures: int = 3  # Ray STFPM: worker-group restarts from the latest checkpoint before the run fails
    runtime: str = DEFAULT_RUNTIME  # the frozen network (PADIM's backbone, STFPM's teacher): openvino or torch
    precision: str = "f32"  # OpenVINO's inference precision for it: f32 (the reference) or bf16 (FROZEN_PRECISIONS)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise UserError(f"unknown runtime {self.runtime!r}; choose one of: {', '.join(RUNTIMES)}")
        if self.precision not in FROZEN_PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose one of: {', '.join(FROZEN_PRECISIONS)}")
        if self.runtime == "torch" and self.precision != "f32":
            raise UserError("bf16 is an OpenVINO precision: --runtime torch computes in f32")

    @property
    def uses_ray(self) -> bool:
        return self.workers > 0 or bool(self.address) or self.resume is not None


@dataclass(frozen=True)
class ScoreJob:
    """What one `score` call does; the defaults are the command line's."""

    model: str
    data: str
    out: str
    task: str = DEFAULT_TASK
    masks: bool = False
    batch_size: int = 16
    actors: int | None = None  # None: as many as the cluster's CPUs hold
    cpus_per_actor: float = 1.0
    max_pixels: int | None = None
    overwrite: bool = False

    def check(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1) or self.cpus_per_actor <= 0:
            raise UserError("--batch-size and --actors must be >= 1, --cpus-per-actor > 0")
        if self.masks and self.task != "segmentation":
            raise UserError("--masks needs --task segmentation (the other tasks have no masks)")
