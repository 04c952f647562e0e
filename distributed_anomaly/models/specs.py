"""What each backbone and model is, as plain data: feature taps, default layers, paper defaults.

Torch-free, so configuration and the command line can validate choices and show defaults without loading
torch; `backbones` builds the networks these names describe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distributed_anomaly.errors import UserError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    taps: dict[str, tuple[int, int]]  # tap name -> (channels, stride)
    default_layers: tuple[str, str, str]
    default_n_features: int  # PADIM's random channel subset size
    patchcore_layers: tuple[str, str]  # PatchCore's two middle taps (strides 8 and 16)


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        "resnet18",
        {"layer1": (64, 4), "layer2": (128, 8), "layer3": (256, 16), "layer4": (512, 32)},
        ("layer1", "layer2", "layer3"),
        100,
        ("layer2", "layer3"),
    ),  # PADIM paper: R18 -> 100 of 448
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2",
        {"layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16), "layer4": (2048, 32)},
        ("layer1", "layer2", "layer3"),
        550,
        ("layer2", "layer3"),
    ),  # PADIM paper: WR50 -> 550 of 1792
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2",
        {
            f"features.{i}": (c, s)
            for i, (c, s) in enumerate(
                [
                    (32, 2),
                    (16, 2),
                    (24, 4),
                    (24, 4),
                    (32, 8),
                    (32, 8),
                    (32, 8),
                    (64, 16),
                    (64, 16),
                    (64, 16),
                    (64, 16),
                    (96, 16),
                    (96, 16),
                    (96, 16),
                    (160, 32),
                    (160, 32),
                    (160, 32),
                    (320, 32),
                    (1280, 32),
                ]
            )
        },
        # 24 + 32 + 96 = 152 channels; 100 keeps ~2/3 of them, the same share of dimensions the paper's
        # R18 choice keeps relative to the full Gaussian cost, and matches the R18 default for comparisons.
        ("features.3", "features.6", "features.13"),
        100,
        ("features.6", "features.13"),  # strides 8 and 16, as ResNet's layer2 and layer3
    ),
}
DEFAULT_BACKBONE = "resnet18"

# STFPM training defaults (the paper's; anomalib uses weight decay 1e-3).
STFPM_LR = 0.4
STFPM_MOMENTUM = 0.9
STFPM_WEIGHT_DECAY = 1e-4
STFPM_PATIENCE = 10

# PatchCore defaults (Roth et al., 2022): coreset share of the patch embeddings, neighbours of the image-score
# reweighting, and the fixed dimension the concatenated taps are pooled to (the paper's 1024).
PATCHCORE_CORESET_RATIO = 0.1
PATCHCORE_NUM_NEIGHBORS = 9
PATCHCORE_DIM = 1024


def default_layers(spec: BackboneSpec, model: str) -> tuple[str, ...]:
    """The taps a model uses on a backbone unless told: PatchCore's two middle ones, else PADIM's three."""
    return spec.patchcore_layers if model == "patchcore" else spec.default_layers


def check_n_features(n_features: int, n_total: int, layers: Sequence[str], backbone: str) -> int:
    """PADIM's channel subset or PatchCore's pooled dimension: within the chosen taps' channels."""
    if not 0 < n_features <= n_total:
        raise UserError(
            f"n_features must satisfy 0 < n_features <= {n_total} (channels of "
            f"{','.join(layers)} on {backbone}), got {n_features}"
        )
    return int(n_features)


def patchcore_dim(n_channels: int) -> int:
    """PatchCore's default embedding dimension for taps with `n_channels` channels in all."""
    return min(n_channels, PATCHCORE_DIM)


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}") from None


def validate_layers(spec: BackboneSpec, layers: Sequence[str]) -> tuple[str, ...]:
    """Layers must be known taps of the backbone, distinct, and given shallow to deep."""
    layers = tuple(layers)
    if not layers:
        raise UserError("at least one feature layer is needed")
    unknown = [l for l in layers if l not in spec.taps]
    if unknown:
        raise UserError(
            f"backbone {spec.name} has no feature layer {unknown[0]!r}; valid layers: {', '.join(spec.taps)}"
        )
    order = list(spec.taps)
    if len(set(layers)) != len(layers) or sorted(layers, key=order.index) != list(layers):
        raise UserError(f"layers must be distinct and ordered shallow to deep, got {','.join(layers)}")
    return layers
