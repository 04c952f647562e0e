"""What every command shares: the verbosity options, logging to stderr, and defaults read from dataclasses."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from distributed_anomaly.config import FROZEN_PRECISIONS, ModelConfig
from distributed_anomaly.data.layout import DEFAULT_HOLDOUT, DEFAULT_MASK_DIR, DEFAULT_NORMAL_DIR, FORMATS, DataLayout
from distributed_anomaly.data.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, parse_max_pixels
from distributed_anomaly.data.sizes import ImageSize, parse_size
from distributed_anomaly.errors import UserError
from distributed_anomaly.models.specs import PATCHCORE_CORESET_RATIO, PATCHCORE_NUM_NEIGHBORS

# -v / -q on every command (one parent parser). -q turns progress off (bars, per-epoch and per-trial lines); the
# few status lines a command prints (what it skipped, where results went) and warnings stay. -v adds debug.
VERBOSITY = argparse.ArgumentParser(add_help=False)
VERBOSITY.add_argument("-v", "--verbose", action="store_true", help="debug messages as well")
VERBOSITY.add_argument(
    "-q",
    "--quiet",
    action="store_true",
    help="no progress output (bars, per-epoch and per-trial lines); status lines and warnings stay",
)


class _Formatter(logging.Formatter):
    """Plain messages for progress; "warning: ..." / "error: ..." for the rest (what users grep for)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (tools and tests replace it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler assigns it; the property always answers sys.stderr
        pass


def configure_logging(args: argparse.Namespace) -> None:
    """Our loggers (`distributed_anomaly.*`) to stderr: INFO, DEBUG with -v (-q acts on progress, not here)."""
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    root = logging.getLogger("distributed_anomaly")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def default(cls: type, name: str) -> Any:
    """The default of dataclass field `name`: the one source of truth the command-line defaults come from."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            raise TypeError(f"{cls.__name__}.{name} has no plain default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def layers(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def weights_pairs(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """BACKBONE=FILE options -> ((backbone, file), ...)."""
    out = []
    for item in items:
        backbone, sep, path = item.partition("=")
        if not sep or not backbone or not path:
            raise UserError(f"--weights {item!r}: expected BACKBONE=FILE, e.g. --weights mobilenet_v2=mnv2.pth")
        out.append((backbone.strip(), path.strip()))
    return tuple(out)


def changed_options(a: argparse.Namespace, defaults: dict, allowed: Sequence[str]) -> list[str]:
    """The options given besides `allowed` (a --resume call may not change what the run was started with)."""
    skip = {*allowed, "func", "command", "verbose", "quiet"}
    return [f"--{k.replace('_', '-')}" for k, v in vars(a).items() if k not in skip and v != defaults.get(k)]


def _max_pixels_arg(text: str) -> int:
    try:
        return parse_max_pixels(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_max_pixels(p: argparse.ArgumentParser) -> None:
    """--max-pixels on every command that reads images; the default is data.limits' one constant."""
    p.add_argument(
        "--max-pixels",
        type=_max_pixels_arg,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images whose header declares more pixels than this, before decoding them "
        f"(default %(default)d = {DEFAULT_MAX_PIXELS / 1e6:g} MP)",
    )


def add_inference_precision(p: argparse.ArgumentParser) -> None:
    """--precision on the commands that run an exported IR (predict, serve): OpenVINO's compute precision."""
    p.add_argument(
        "--precision",
        choices=FROZEN_PRECISIONS,
        help="OpenVINO inference precision of an exported IR: f32, or bf16 on CPUs with avx512_bf16 or AMX "
        "(default: the export's, from its metadata.json: bf16 for `export --precision bf16`, or `auto` where "
        "it measured an AUROC change of at most 0.005; else f32)",
    )


def apply_max_pixels(a: argparse.Namespace) -> int:
    """Make --max-pixels the limit of this process and of the Ray workers it starts (they inherit the
    environment; ray_setup passes it on to a cluster it joins)."""
    os.environ[MAX_PIXELS_ENV] = str(a.max_pixels)
    return int(a.max_pixels)


def add_api_key(p: argparse.ArgumentParser, what: str) -> None:
    """--api-key and --api-key-file; the environment variable is the default (serve.settings.resolve_api_key)."""
    p.add_argument(
        "--api-key",
        help=f"{what} (visible in the process list: prefer --api-key-file or $DISTRIBUTED_ANOMALY_API_KEY)",
    )
    p.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="read the key from FILE (its first line); default: $DISTRIBUTED_ANOMALY_API_KEY; neither: no key",
    )


def image_size(text: str) -> ImageSize:
    """--image-size S or HxW (argparse reports a bad value with the option's name)."""
    try:
        return parse_size(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--image-size {text!r}: ")) from exc


def add_data_options(p: argparse.ArgumentParser) -> None:
    """--format and the `folder` layout's options: on every command that takes --data (docs/data.md)."""
    g = p.add_argument_group("data layout (docs/data.md)")
    g.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="how --data is laid out: mvtec (train/good, test/<defect>, ground_truth/), folder (good/ and one "
        "folder per defect type), visa (VISA_ROOT/<object> with VISA_ROOT/split_csv/1cls.csv); auto (default) "
        "detects it and says which",
    )
    g.add_argument(
        "--normal-dir",
        default=DEFAULT_NORMAL_DIR,
        metavar="DIR",
        help="folder: the normal images, relative to --data (default %(default)s)",
    )
    g.add_argument(
        "--abnormal-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder: abnormal images of one defect type (repeatable; default: every other sub-folder)",
    )
    g.add_argument(
        "--mask-dir",
        metavar="DIR",
        help=f"folder: masks; <defect>/x.png's mask is DIR/<defect>/x.png or x_mask.png when DIR/<defect>/ exists, "
        f"else DIR/x.png or x_mask.png (default {DEFAULT_MASK_DIR}/ if present; without masks no pixel metrics)",
    )
    g.add_argument(
        "--holdout",
        type=float,
        default=DEFAULT_HOLDOUT,
        help="folder: share of the normal images held out (seeded) as the test split's normal images "
        "(default %(default)s)",
    )


def data_layout(a: argparse.Namespace) -> DataLayout:
    return DataLayout(a.format, a.normal_dir, tuple(a.abnormal_dir), a.mask_dir, a.holdout)


def add_patchcore_options(p: argparse.ArgumentParser) -> None:
    """PatchCore's own settings on `train` (ModelConfig checks they are given for PatchCore only)."""
    p.add_argument(
        "--coreset-ratio",
        type=float,
        help=f"PatchCore: memory bank size as a share of the training patches (default {PATCHCORE_CORESET_RATIO})",
    )
    p.add_argument(
        "--num-neighbors",
        type=int,
        help=f"PatchCore: bank neighbours of the image-score reweighting (default {PATCHCORE_NUM_NEIGHBORS})",
    )


def model_config(a: argparse.Namespace) -> ModelConfig:
    """The ModelConfig of `train`'s model options."""
    options = ("model", "backbone", "layers", "n_features", "image_size", "seed", "coreset_ratio", "num_neighbors")
    return ModelConfig(**{k: getattr(a, k) for k in options})


def layout_with_data(a: argparse.Namespace) -> DataLayout:
    """The layout options apply to a --data given here; without it the run's recorded layout is used."""
    layout = data_layout(a)
    if not a.data and layout != DataLayout():
        raise UserError(
            "--format and the folder options describe --data: give --data too (without it the run's "
            "own dataset is read as it was for training)"
        )
    return layout
