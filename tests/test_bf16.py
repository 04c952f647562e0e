"""bf16 as a precision of the frozen network (train), of an export, and of predict / Serve (issue 17, item 5).

On a CPU with bf16 (avx512_bf16 or AMX) OpenVINO computes in bfloat16 when asked; elsewhere in f32, which these
tests expect instead (`_expected`). A PADIM fit with a bf16 backbone keeps the demo data's image AUROC within
0.005 of the f32 run and says so in its config; `export --precision auto` measures the AUROC change on the run's
test images, exports bf16 only within 0.005 (and where the CPU computes in it), states the measurement in
metadata.json, and the inferencer compiles at what the export (or an explicit --precision) asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import PADIM_TRAIN_ARGS

from distributed_anomaly import frozen, rundir
from distributed_anomaly.frozen_ir import compiled_precision
from distributed_anomaly.irformat import BF16_MAX_AUROC_CHANGE, METADATA


def _expected(asked: str) -> str:
    """The precision OpenVINO's CPU plugin compiles at when `asked`: bf16 only where the CPU has it."""
    import openvino as ov

    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if asked == "bf16" and has_bf16 else "f32"


def test_bf16_fit_keeps_the_auroc_and_states_its_precision(padim_run, demo_category, mobilenet_weights, tmp_path):
    from distributed_anomaly.cli import main

    out = tmp_path / "padim_bf16"
    argv = ["train", "--data", str(demo_category), "--out", str(out), "--weights", str(mobilenet_weights)]
    assert main([*argv, *PADIM_TRAIN_ARGS, "--precision", "bf16"]) == 0
    f32 = json.loads((padim_run / "metrics.json").read_text())
    bf16 = json.loads((out / "metrics.json").read_text())
    assert abs(bf16["image_auroc"] - f32["image_auroc"]) <= BF16_MAX_AUROC_CHANGE
    assert rundir.load_config(out)[2]["frozen_precision"] == "bf16"
    assert json.loads((out / "request.json").read_text())["execution"]["precision"] == "bf16"
    # The fit's frozen network really compiled at the asked precision.
    _, model, _ = rundir.load_model(out)
    assert compiled_precision(frozen.OpenVinoPatches(model, threads=1, precision="bf16").compiled.compiled) == (
        _expected("bf16")
    )
    assert compiled_precision(frozen.OpenVinoPatches(model, threads=1).compiled.compiled) == "f32"


def test_export_auto_measures_bf16_and_the_inferencer_compiles_as_stated(padim_run, tmp_path):
    from distributed_anomaly.export import export_run
    from distributed_anomaly.inference import OpenVINOInferencer

    ir = export_run(padim_run, tmp_path / "auto", "auto")
    meta = json.loads((Path(ir) / METADATA).read_text())
    check = meta["bf16_check"]
    assert check["images"] > 0 and check["compiled_bf16"] == _expected("bf16") and check["compiled_f32"] == "f32"
    assert check["auroc_change"] == pytest.approx(abs(check["auroc_bf16"] - check["auroc_f32"]), abs=1e-6)
    within = check["auroc_change"] <= BF16_MAX_AUROC_CHANGE
    chosen = "bf16" if within and _expected("bf16") == "bf16" else "fp32"
    assert check["chosen"] == meta["precision"] == chosen
    assert meta["inference_precision"] == ("bf16" if chosen == "bf16" else "f32")
    assert OpenVINOInferencer(ir, num_threads=1).compiled_precision == _expected(meta["inference_precision"])
    assert OpenVINOInferencer(ir, num_threads=1, precision="f32").compiled_precision == "f32"
    assert OpenVINOInferencer(ir, num_threads=1, precision="bf16").compiled_precision == _expected("bf16")
    x = np.zeros((1, 3, 128, 128), dtype=np.float32)
    assert OpenVINOInferencer(ir, num_threads=1, precision="bf16").anomaly_maps(x).shape == (1, 128, 128)


def test_serve_passes_the_precision_to_every_replica(monkeypatch) -> None:
    from distributed_anomaly.errors import UserError
    from distributed_anomaly.serve import deployments, settings
    from distributed_anomaly.serve.registry import ModelEntry

    monkeypatch.setattr(
        deployments, "discover_models", lambda specs: {"m": ModelEntry("m", "/ir/m", "v1", {"image_size": 64})}
    )
    cfg = settings.AppConfig.from_args({"models": "/ir/m", "precision": "bf16"})
    model = deployments.build_app(cfg)._bound_deployment.init_args[0]._bound_deployment
    assert cfg.precision == "bf16" and model.init_kwargs["precision"] == "bf16"
    assert settings.AppConfig.from_args({"models": "/ir/m"}).precision is None  # each export's own
    with pytest.raises(UserError, match="precision"):
        settings.AppConfig.from_args({"models": "/ir/m", "precision": "fp8"})
