"""Command line: `distributed-anomaly <command> --help` explains each command.

Argument parsing only: every default comes from a configuration dataclass (config, serve.settings,
tuning.request) or a named constant of the module that uses it, and each command imports its implementation
when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from distributed_anomaly.cli.common import configure_logging
from distributed_anomaly.cli.inference_cmds import add_export, add_predict
from distributed_anomaly.cli.run_cmds import add_evaluate, add_train
from distributed_anomaly.cli.score_cmds import add_score
from distributed_anomaly.cli.search_cmds import add_pipeline, add_tune
from distributed_anomaly.cli.serve_cmds import add_serve, add_serve_config
from distributed_anomaly.cli.tools_cmds import add_synth, add_weights
from distributed_anomaly.errors import TrainingInterrupted, UserError

EPILOG = """examples:
  distributed-anomaly synth demo_data
  distributed-anomaly train --data demo_data/tile --model padim --backbone mobilenet_v2 --out runs/tile_padim
  distributed-anomaly evaluate --run runs/tile_padim
  distributed-anomaly predict --model runs/tile_padim --out preds demo_data/tile/test/crack
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distributed-anomaly",
        description="Train, evaluate and use visual anomaly detectors (PADIM, STFPM) learned from normal images only.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        add_synth,
        add_train,
        add_evaluate,
        add_predict,
        add_export,
        add_score,
        add_serve,
        add_serve_config,
        add_tune,
        add_pipeline,
        add_weights,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
