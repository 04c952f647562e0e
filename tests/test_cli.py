"""The CLI contract end to end on the demo data: train, evaluate, predict, and the errors users see.

`padim_run` is the session's shared PADIM run (conftest.py), trained through this CLI: `train` is checked on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PADIM_TRAIN_ARGS, TINY_PADIM_TRAIN_ARGS, copy_run
from PIL import Image

from distributed_anomaly.cli import main
from distributed_anomaly.evaluation import METRIC_KEYS

slow = pytest.mark.slow  # trains real models (the shared PADIM run, or its own)


@slow
def test_train_writes_a_complete_run_dir(padim_run: Path) -> None:
    for name in ("config.json", "model.safetensors", "postprocess.json", "metrics.json"):
        assert (padim_run / name).is_file(), name
    metrics = json.loads((padim_run / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics)
    assert metrics["num_test_images"] == 6 + 3 * 4  # n_test_good + n_per_defect x defect types
    assert metrics["threshold_source"] == "normal_3sigma" and metrics["calibrated_on"] == "validation"
    # Real ImageNet features find the synthetic defects far better than chance.
    assert metrics["image_auroc"] > 0.7 and metrics["pixel_auroc"] > 0.8
    config = json.loads((padim_run / "config.json").read_text())
    assert config["model"]["layers"] == ["features.3", "features.6", "features.13"]
    assert config["info"]["images_counted"] == config["info"]["num_train_images"] == 22  # 24 minus 10 % held out


@slow
def test_train_refuses_to_overwrite_a_model(padim_run: Path, demo_category: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(padim_run, tmp_path / "run")  # were the refusal broken, only this copy would be overwritten
    weights_before = (run / "model.safetensors").read_bytes()
    assert main(["train", "--data", str(demo_category), "--out", str(run), *PADIM_TRAIN_ARGS]) == 2
    assert "already holds a trained model" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == weights_before


@slow
def test_evaluate_reproduces_train_metrics(padim_run: Path, tmp_path: Path, capsys) -> None:
    before = json.loads((padim_run / "metrics.json").read_text())
    run = copy_run(padim_run, tmp_path / "run")  # evaluate rewrites metrics.json
    assert main(["evaluate", "--run", str(run), "--json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in METRIC_KEYS:
        assert printed[key] == pytest.approx(before[key], abs=1e-9), key


@slow
def test_predict_writes_json_and_overlays_for_each_task(padim_run: Path, demo_category: Path, tmp_path: Path) -> None:
    defect_dir = next(d for d in sorted((demo_category / "test").iterdir()) if d.name != "good")
    for task in ("classification", "detection", "segmentation"):
        out = tmp_path / task
        assert main(["predict", "--model", str(padim_run), "--out", str(out), "--task", task, str(defect_dir)]) == 0
        results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
        assert len(results) == 3
        for r in results:
            assert 0.0 <= r["score"] <= 1.0 and r["label"] in (0, 1)
            assert ("boxes" in r) == (task != "classification")
            overlay = Image.open(out / r["overlay"])
            assert overlay.size == (256, 128)  # image | heatmap, at the image's own size
            if task == "segmentation":
                mask = np.asarray(Image.open(out / r["mask"]))
                assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255}
                assert bool(mask.any()) == bool(r["boxes"])


@slow
def test_predict_keeps_going_past_a_corrupt_image(padim_run: Path, demo_category: Path, tmp_path: Path, capsys) -> None:
    good = next((demo_category / "test" / "good").iterdir())
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["predict", "--model", str(padim_run), "--out", str(tmp_path / "o"), str(good), str(bad)]) == 1
    err = capsys.readouterr()
    assert "broken.png: ERROR cannot decode image" in err.err and "1 images scored, 1 failed" in err.out
    assert (tmp_path / "o" / f"{good.stem}.json").is_file()


@slow
def test_stfpm_train_with_early_stopping_history(demo_category: Path, tmp_path: Path) -> None:
    out = tmp_path / "stfpm"
    assert (
        main(
            [
                "train",
                "--data",
                str(demo_category),
                "--out",
                str(out),
                "--model",
                "stfpm",
                "--no-pretrained",
                "--backbone",
                "resnet18",
                "--layers",
                "layer1,layer2",
                "--image-size",
                "64",
                "--epochs",
                "3",
                "--patience",
                "1",
                "--lr",
                "0.05",
                "--quiet",
            ]
        )
        == 0
    )
    history = json.loads((out / "history.json").read_text())
    info = json.loads((out / "config.json").read_text())["info"]
    assert 2 <= len(history) <= 3 and info["epochs_run"] == len(history)
    assert info["best_epoch"] == int(np.argmin([h["val_loss"] for h in history]))
    assert json.loads((out / "metrics.json").read_text())["image_auroc"] is not None


@slow
def test_val_fraction_zero_reports_threshold_free_metrics_only(demo_category: Path, tmp_path: Path) -> None:
    out = tmp_path / "nothr"
    args = [
        "train",
        "--data",
        str(demo_category),
        *TINY_PADIM_TRAIN_ARGS,
        "--val-fraction",
        "0",
        "--quiet",
    ]
    assert main([*args, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["image_auroc"] is not None and m["aupro"] is not None
    assert m["image_f1"] is None and m["box_f1"] is None and any("no threshold" in n for n in m["notes"])
    assert main([*args, "--out", str(tmp_path / "thr"), "--threshold", "1e9"]) == 0
    m = json.loads((tmp_path / "thr" / "metrics.json").read_text())
    assert m["image_f1"] == 0.0 and m["threshold_source"] == "user"  # nothing exceeds a huge threshold


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/nonexistent", "--out", "x"], "dataset folder /nonexistent does not exist"),
        (["train", "--data", ".", "--out", "x", "--backbone", "vgg16"], "unknown backbone 'vgg16'"),
        (["train", "--data", ".", "--out", "x", "--layers", "layer1,layer7"], "no feature layer 'layer7'"),
        (["train", "--data", ".", "--out", "x", "--n-features", "999", "--no-pretrained"], "0 < n_features <= 448"),
        (["evaluate", "--run", "/nonexistent"], "not a run directory"),
        (["predict", "--model", "/nonexistent", "--out", "x", "a.png"], "not a run directory"),
    ],
)
def test_user_errors_are_one_line_messages(
    argv: list[str], message: str, capsys, demo_category: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(demo_category)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_console_entry_points_show_help() -> None:
    for cmd in (
        [sys.executable, "-m", "distributed_anomaly", "--help"],
        [sys.executable, "-m", "distributed_anomaly", "train", "--help"],
    ):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "usage: distributed-anomaly" in res.stdout


def test_verbosity_options_set_what_our_loggers_print(capsys) -> None:
    import logging

    from distributed_anomaly.cli import build_parser
    from distributed_anomaly.cli.common import configure_logging

    log = logging.getLogger("distributed_anomaly.some_module")
    for argv, shown in (
        (["synth", "out", "-v"], {"detail", "status", "warning: careful"}),
        (["synth", "out"], {"status", "warning: careful"}),
        (["synth", "out", "--quiet"], {"status", "warning: careful"}),
    ):  # -q: progress off only
        configure_logging(build_parser().parse_args(argv))
        log.debug("detail")
        log.info("status")
        log.warning("careful")
        assert set(capsys.readouterr().err.splitlines()) == shown, argv
