"""Hyperparameter search (`tune`): spaces and their constraints, objectives, results, the report, and a real search.

Pure parts first (no Ray, no training). Then one tiny real search on the demo data, 3 trials of two models
(seeded TPE proposes STFPM, then PADIM twice), run through the CLI on the shared local Ray (`--address`: the
session's 4 logical CPUs, whatever the machine has, and `--max-concurrent 1`, so the trials run one at a time
on any machine): it is interrupted with SIGINT (a real Ctrl-C, caught by Tune) right after its first trial
finishes, and resumed with `tune --resume`. One search serves the resume test, the end-to-end checks (study in
SQLite, best/, results, TensorBoard logs) and the report rendered in headless Chromium, because every trial
costs Ray start-up time on a small CI machine. A second search whose trials all fail on unusable weights shows
failures are recorded and the search goes on.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_report import CHROMIUM_FLAGS, PROBE, run_chromium

from distributed_anomaly import cli, engine, metrics, rundir
from distributed_anomaly.config import ModelConfig
from distributed_anomaly.data.images import read_image, to_tensor
from distributed_anomaly.data.mvtec import Record, load_dataset, records_of_split, split_train_val
from distributed_anomaly.data.synthetic import synthetic_anomaly
from distributed_anomaly.errors import UserError
from distributed_anomaly.models.backbones import get_spec, validate_layers
from distributed_anomaly.tuning import objective as O
from distributed_anomaly.tuning import results as R
from distributed_anomaly.tuning.space import SpaceError, preview, trial_configs
from distributed_anomaly.tuning.space_file import load_space, parse_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"

TINY_SPACE = """\
version: 1
description: two models on MobileNetV2 at 64 px, for tests
fixed:
  backbone: mobilenet_v2
  image_size: 64
dimensions:
  model: {choice: [padim, stfpm]}
  layers:
    by: backbone
    choice:
      mobilenet_v2: [[features.3, features.6], [features.3, features.6, features.13]]
  n_features: {int: [16, 64], at_most: channels, when: {model: padim}}
  lr: {float: [0.05, 0.5], log: true, when: {model: stfpm}}
  batch_size: {choice: [8], when: {model: stfpm}}
  epochs: {int: [2, 2], when: {model: stfpm}}
"""


# --------------------------------------------------------------------------------------------------------
# search spaces
# --------------------------------------------------------------------------------------------------------


def _check_sample(cfg: dict, space, path: str) -> None:
    """Every constraint the YAML declares, checked from first principles on one sampled configuration."""
    model_cfg, train_cfg = trial_configs(cfg)  # valid ModelConfig / TrainConfig
    spec = get_spec(cfg["backbone"])
    layers = cfg["layers"].split(",")
    assert tuple(layers) == validate_layers(spec, layers)
    assert cfg["layers"] in space.dimensions[[d.name for d in space.dimensions].index("layers")].choices_for(cfg)
    channels = sum(spec.taps[l][0] for l in layers)
    if cfg["model"] == "padim":
        assert 32 <= cfg["n_features"] <= min(550, channels), (path, cfg)
        assert not {"lr", "batch_size", "epochs"} & set(cfg), (path, cfg)
    else:
        assert "n_features" not in cfg and "lr" in cfg, (path, cfg)  # every shipped space searches lr for STFPM
        assert 0.01 <= cfg["lr"] <= 1.0 and cfg["batch_size"] in (8, 16, 32)
        assert cfg["epochs"] in range(10, 101, 10)
        assert train_cfg.epochs == cfg["epochs"] and train_cfg.lr == cfg["lr"]
    assert cfg["image_size"] in (128, 256) and model_cfg.image_size == cfg["image_size"]


@pytest.mark.parametrize("name,n", [("padim", 120), ("stfpm", 120), ("combined", 240)])
def test_constraints_hold_for_every_sampled_configuration(name: str, n: int) -> None:
    """The shipped spaces, sampled many times by the search's own seeded TPE (no training): every
    configuration is valid, n_features never exceeds the chosen layers' channels, layers always belong to
    the chosen backbone, and each model's settings appear exactly for its trials."""
    space = load_space(SPACES / f"{name}.yaml")
    samples = preview(space, n, seed=1)
    for cfg in samples:
        _check_sample(cfg, space, name)
    assert {c["backbone"] for c in samples} == {"resnet18", "wide_resnet50_2", "mobilenet_v2"}
    if name == "combined":
        assert {c["model"] for c in samples} == {"padim", "stfpm"}
    # TPE explores the constrained range: n_features reaches both ends where it is searched
    nf = [c["n_features"] for c in samples if c["model"] == "padim"]
    assert bool(nf) == (name != "stfpm")
    if nf:
        assert min(nf) < 48 and max(nf) > 150
    # --fix pins a dimension; what depends on it follows
    fixed = load_space(SPACES / f"{name}.yaml").fix(["backbone=mobilenet_v2"])
    for cfg in preview(fixed, 40, seed=2):
        assert cfg["backbone"] == "mobilenet_v2"
        _check_sample(cfg, fixed, name)
        assert cfg["model"] == "stfpm" or cfg["n_features"] <= 152  # mobilenet_v2's channels cap it


def test_space_enumerates_and_names_conditional_choices_per_parent() -> None:
    space = load_space(SPACES / "combined.yaml")
    combos = list(space.combinations())
    # 2 models x 3 backbones x 4 layer sets x 2 image sizes, PADIM n_features at both range ends, STFPM 3 batch sizes x
    # 2 lr ends x 2 epoch ends
    assert len(combos) == 3 * 4 * 2 * (2 + 3 * 2 * 2)
    assert space.models() == {"padim", "stfpm"} and space.max_epochs() == 100
    assert load_space(SPACES / "padim.yaml").max_epochs() == 0
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    cfg = space.sample(trial)
    assert f"layers[{cfg['backbone']}]" in trial.params  # one categorical per backbone: fixed choices per name
    assert "layers" not in trial.params


@pytest.mark.parametrize(
    "text,message",
    [
        ("model: [padim", "not valid YAML"),
        ("fixed: {model: padim}\ndimensions: {}", "no dimensions"),
        ("fixed: {model: padim}\nsearch: {}\ndimensions: {image_size: {choice: [64]}}", "unknown key 'search'"),
        ("fixed: {model: padim}\ndimensions: {colour: {choice: [red]}}", "unknown setting 'colour'"),
        ("fixed: {model: padim}\ndimensions: {image_size: {choice: [64], log: true}}", "apply to int and float"),
        ("fixed: {model: padim}\ndimensions: {image_size: {between: [64, 128]}}", "unknown key 'between'"),
        ("fixed: {model: padim}\ndimensions: {lr: {int: [1, 2]}}", "use `float"),
        ("fixed: {model: padim}\ndimensions: {lr: {float: [0, 1], log: true}}", "log range needs low > 0"),
        (
            "fixed: {model: padim}\ndimensions:\n  layers: {by: backbone, choice: {resnet18: [[layer1]]}}\n"
            "  backbone: {choice: [resnet18]}",
            "`by: backbone` must name a setting fixed or searched above",
        ),
        (
            "fixed: {model: padim}\ndimensions:\n  backbone: {choice: [resnet18, mobilenet_v2]}\n"
            "  layers: {by: backbone, choice: {resnet18: [[layer1]]}}",
            "no choices for backbone=mobilenet_v2",
        ),
        (
            "fixed: {model: padim, backbone: mobilenet_v2}\ndimensions: {layers: {choice: [[layer1, layer2]]}}",
            "has no feature layer 'layer1'",
        ),
        (
            "fixed: {backbone: mobilenet_v2}\ndimensions:\n  model: {choice: [padim, stfpm]}\n"
            "  n_features: {int: [16, 64]}",
            "applies to PADIM only",
        ),
        (
            "fixed: {model: padim, backbone: mobilenet_v2, layers: [features.3, features.6]}\n"
            "dimensions: {n_features: {int: [100, 200], at_most: channels}}",
            "is empty under its constraints",
        ),
        ("dimensions: {image_size: {choice: [64]}}", "no model"),
        ("fixed: {model: stfpm}\ndimensions: {epochs: {int: [0, 3]}}", "epochs must be >= 1"),
    ],
)
def test_bad_space_files_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(SpaceError, match=re.escape(message)):
        parse_space(text, "bad.yaml")


@pytest.mark.parametrize(
    "fix,message",
    [
        ("colour=red", "has no dimension 'colour'"),
        ("backbone", "expected NAME=VALUE"),
        ("backbone=vgg16", "vgg16 is not among the choices of 'backbone'"),
        ("n_features=5000", "outside the range of 'n_features'"),
        ("image_size=abc", "image_size must be an integer"),
        ("layers=layer1,layer2", "not among the choices for backbone=mobilenet_v2"),
    ],
)
def test_bad_fix_is_refused(fix: str, message: str) -> None:
    with pytest.raises(SpaceError, match=re.escape(message)):
        load_space(SPACES / "combined.yaml").fix([fix])


def test_cli_dry_run_and_bad_arguments(capsys) -> None:
    assert (
        cli.main(
            [
                "tune",
                "--space",
                str(SPACES / "combined.yaml"),
                "--samples",
                "3",
                "--dry-run",
                "--fix",
                "backbone=mobilenet_v2",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert sum(l.startswith(("0:", "1:", "2:")) for l in lines) == 3
    assert all("backbone=mobilenet_v2" in l for l in lines if l[:2] in ("0:", "1:", "2:"))
    assert cli.main(["tune", "--space", str(SPACES / "combined.yaml"), "--dry-run", "--fix", "colour=red"]) == 2
    assert "has no dimension 'colour'" in capsys.readouterr().err
    assert cli.main(["tune", "--out", "x", "--resume", "--samples", "4"]) == 2
    assert "drop --samples" in capsys.readouterr().err
    assert (
        cli.main(
            ["tune", "--data", "d", "--space", str(SPACES / "padim.yaml"), "--out", "x", "--weights", "mobilenet_v2"]
        )
        == 2
    )
    assert "expected BACKBONE=FILE" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------------------------------------


def _records(spec: dict[str, int], category: str = "c") -> list[Record]:
    return [
        Record(f"/{category}/{d}/{i:03d}.png", "test", int(d != "good"), d, category)
        for d, n in spec.items()
        for i in range(n)
    ]


def test_test_split_is_stratified_seeded_and_disjoint() -> None:
    test = _records({"good": 10, "crack": 6, "oil": 3, "rare": 1}) + _records({"good": 4, "hole": 2}, "d")
    search, held = O.split_test(test, 0.5, seed=0)
    assert {r.path for r in search}.isdisjoint({r.path for r in held})
    assert sorted(search + held, key=test.index) == test
    assert [r for r in test if r in search] == search  # order kept
    per = lambda part: {
        (r.category, r.defect): sum(1 for x in part if (x.category, x.defect) == (r.category, r.defect)) for r in part
    }
    assert per(search) == {("c", "good"): 5, ("c", "crack"): 3, ("c", "oil"): 2, ("d", "good"): 2, ("d", "hole"): 1}
    assert ("c", "rare") not in per(search)  # a single image stays held out
    assert O.split_test(test, 0.5, seed=0) == (search, held)
    assert O.split_test(test, 0.5, seed=1)[0] != search
    only_good = _records({"good": 5})
    assert O.split_test(only_good, 0.5, 0) == ([], only_good)
    with pytest.raises(UserError):
        O.split_test(test, 1.0, 0)
    assert O.resolve_objective("auto", test) == "val_auroc"
    assert O.resolve_objective("auto", only_good) == "synthetic_auroc"
    with pytest.raises(UserError, match="needs labelled anomalies"):
        O.resolve_objective("val_auroc", only_good)


def test_synthetic_anomalies_are_seeded_and_masked(demo_category: Path) -> None:
    normals = records_of_split(load_dataset(demo_category), "train")[:2]
    items = list(O.synthetic_images(normals, copies=3, seed=5))
    again = list(O.synthetic_images(normals, copies=3, seed=5))
    assert [lab for _, _, lab in items] == [0, 1, 1, 1, 0, 1, 1, 1]
    for (a, ma, la), (b, mb, _) in zip(items, again):
        assert (a == b).all() and (ma == mb).all()
        assert ma.any() == bool(la)
    clean = items[0][0]
    for image, mask, _label in items[1:4]:
        assert (image[~mask] == clean[~mask]).all() and (image[mask] != clean[mask]).any()
    areas = {
        k: synthetic_anomaly(clean, np.random.default_rng(i), k)[1].mean()
        for i, k in enumerate(("cutpaste", "scar", "patch"))
    }
    assert all(0 < v < 0.1 for v in areas.values()), areas


def test_objectives_match_the_evaluation_code_and_the_epoch_hook_leaves_the_model_alone(
    demo_category: Path, mobilenet_weights: Path
) -> None:
    records = load_dataset(demo_category)
    fit, val = split_train_val(records, 0.2, 0)
    search, _ = O.split_test(records_of_split(records, "test"), 0.5, 0)
    data = O.ObjectiveData(tuple(search), tuple(val[:2]), copies=2, seed=0)
    layers = ("features.3", "features.6")
    padim = rundir.build_model(
        ModelConfig("padim", "mobilenet_v2", layers, 32, image_size=64), weights_file=str(mobilenet_weights)
    )
    engine.fit_padim(padim, fit, 8, progress=False)
    values = data.evaluate(padim, batch_size=5)  # batches that do not divide the sets
    maps = engine.anomaly_maps(padim, search, 64, 8, progress=False)
    labels = np.array([r.label for r in search], bool)
    assert values["val_auroc"] == pytest.approx(metrics.auroc(maps.reshape(len(maps), -1).max(1), labels))
    # synthetic_auroc, recomputed by hand: each held-out normal image, then 2 seeded defective copies of it
    images, syn_labels = [], []
    for i, r in enumerate(val[:2]):
        clean = read_image(r.path)
        images.append(clean)
        syn_labels.append(False)
        for k in range(2):
            images.append(synthetic_anomaly(clean, np.random.default_rng([0, i, k]))[0])
            syn_labels.append(True)
    with torch.inference_mode():
        syn_maps = padim(to_tensor(images, 64))[:, 0].numpy()
    expected = metrics.auroc(syn_maps.reshape(len(images), -1).max(1).astype(np.float64), np.array(syn_labels))
    assert values["synthetic_auroc"] == pytest.approx(expected, abs=1e-6)
    assert values["synthetic_pixel_auroc"] is not None

    stfpm = rundir.build_model(
        ModelConfig("stfpm", "mobilenet_v2", layers, image_size=64), weights_file=str(mobilenet_weights)
    )
    stfpm.train()
    before = {k: v.clone() for k, v in stfpm.state_dict().items()}
    hook = O.EpochObjective(data, "synthetic_auroc", tuple(fit), batch_size=8)
    out = hook(stfpm, 0)
    assert out["objective"] == out["synthetic_auroc"] and "val_auroc" in out
    assert stfpm.training and all((before[k] == v).all() for k, v in stfpm.state_dict().items())
    assert hook(stfpm, 1) == pytest.approx(out)  # the same images every time


# --------------------------------------------------------------------------------------------------------
# results table and resources
# --------------------------------------------------------------------------------------------------------


def test_results_table_sorting_csv_and_summary(tmp_path: Path) -> None:
    rows = [
        {"trial": "a", "status": "failed", "error": "WeightsUnavailableError: no file", "model": "padim"},
        {"trial": "b", "status": "completed", "objective": 0.7, "model": "padim", "n_features": 40},
        {"trial": "c", "status": "pruned", "objective": 0.9, "model": "stfpm", "lr": 0.1},
        {"trial": "d", "status": "completed", "objective": 0.95, "model": "stfpm", "lr": 0.2, "epochs": 10},
        {"trial": "e", "status": "failed", "error": "WeightsUnavailableError: no file", "model": "stfpm"},
    ]
    table = R.sort_rows(rows)
    assert [r["trial"] for r in table] == ["d", "b", "c", "a", "e"] and [r["rank"] for r in table] == [1, 2, 3, 4, 5]
    assert R.counts(table) == {"completed": 2, "pruned": 1, "failed": 2, "interrupted": 0}
    assert R.failure_reasons(table) == [("WeightsUnavailableError: no file", 2)]
    assert "2 x WeightsUnavailableError: no file" in R.summary_line(table)
    R.write_csv(table, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["trial"] for r in back] == ["d", "b", "c", "a", "e"] and back[0]["objective"] == "0.95"
    text = R.format_table(table, "val_auroc").splitlines()
    assert text[0].split()[:4] == ["rank", "trial", "status", "val_auroc"] and "d" in text[1]

    class Wrapped(Exception):
        pass

    err = Wrapped("Traceback ...\n  File x\nWeightsUnavailableError: cannot load")
    err.cause = UserError("cannot load weights file /x.pth: bad\nmore")
    assert R.short_error(err) == "UserError: cannot load weights file /x.pth: bad"


def test_resources_budget_keeps_trials_from_starving_their_workers() -> None:
    from distributed_anomaly.tuning.budget import plan_budget

    assert plan_budget(4, 1, {"padim"}, None).concurrent == 1  # 1 trial + 1 actor + 2 decode tasks x 0.5
    assert plan_budget(16, 1, {"padim", "stfpm"}, None).per_trial == 3.0
    assert plan_budget(16, 1, {"stfpm"}, None).concurrent == 6  # 1 + 1 worker + 2 x 0.25 decode
    capped = plan_budget(16, 2, {"padim"}, 10)
    assert capped.concurrent == 3 and "lowered to 3" in capped.note
    assert plan_budget(16, 2, {"padim"}, 2).concurrent == 2
    with pytest.raises(UserError, match="one trial needs 3"):
        plan_budget(2, 1, {"padim"}, None)


# --------------------------------------------------------------------------------------------------------
# a real search: interrupted after its first trial, resumed, then checked end to end
# --------------------------------------------------------------------------------------------------------


def _study(db: Path) -> list[tuple[int, str, str]]:
    """(number, state, params) of the study's trials, read with plain sqlite3 as any other tool would."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
        params = dict(
            con.execute(
                "SELECT t.number, group_concat(p.param_name || '=' || p.param_value) FROM trials t "
                "JOIN trial_params p ON p.trial_id = t.trial_id GROUP BY t.number"
            ).fetchall()
        )
    return [(n, s, params.get(n, "")) for n, s in rows]


def _interrupt_after_first_completed_trial(db: Path, done: threading.Event, seen: dict, pid: int) -> None:
    """Ctrl-C for the `tune` process (Tune catches it and stops gracefully) once the study has a COMPLETE trial."""
    deadline = time.monotonic() + 1200
    while not done.is_set() and time.monotonic() < deadline:
        if db.exists():
            try:
                states = _study(db)
            except sqlite3.Error:
                states = []
            if any(s == "COMPLETE" for _, s, _ in states):
                seen["at_interrupt"] = states
                os.kill(pid, signal.SIGINT)
                return
        time.sleep(0.3)


@pytest.fixture(scope="module")
def search(ray_local, demo_category: Path, mobilenet_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 2-trial search of TINY_SPACE: interrupted after its first trial, then resumed to completion. With seed 0
    the sampler proposes STFPM first, then PADIM (`tune --dry-run` shows it), so both models and both fit
    paths (Ray Train, Ray Data) run as trials, one finished before the interrupt and one after."""
    work = tmp_path_factory.mktemp("tune")
    space = work / "tiny.yaml"
    space.write_text(TINY_SPACE)
    out = work / "tune_out"
    # The search runs as the CLI in its own process, as a user runs it: the Ctrl-C goes to that process, not
    # to pytest's, which holds the session's Ray driver, OpenVINO and torch threads. It joins the session's
    # Ray (4 logical CPUs on any machine) and runs one trial at a time, so what has finished when the
    # interrupt lands does not depend on the machine's core count.
    address = ray_local.get_runtime_context().gcs_address
    argv = [
        "tune",
        "--data",
        str(demo_category),
        "--space",
        str(space),
        "--samples",
        "2",
        "--out",
        str(out),
        "--weights",
        f"mobilenet_v2={mobilenet_weights}",
        "--seed",
        "0",
        "--max-concurrent",
        "1",
        "--address",
        address,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "distributed_anomaly"]
    done, seen = threading.Event(), {}
    start = time.monotonic()
    proc = subprocess.Popen([*cmd, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(
        target=_interrupt_after_first_completed_trial, args=(out / "study.db", done, seen, proc.pid), daemon=True
    )
    watcher.start()
    try:
        log, _ = proc.communicate(timeout=1500)
    finally:
        done.set()
        watcher.join(timeout=5)
        if proc.poll() is None:
            proc.kill()
    first = {
        "rc": proc.returncode,
        "seconds": time.monotonic() - start,
        "log": log,
        "summary": json.loads((out / "summary.json").read_text()),
        "trial_results": {p.parent.name: p.read_bytes() for p in (out / "search").glob("trial_*/result.json")},
        "checkpoints": {p.parent.name: p.stat().st_mtime for p in (out / "search").glob("trial_*/checkpoint_*")},
    }
    resumed = subprocess.run(
        [*cmd, "tune", "--out", str(out), "--resume", "--address", address],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    resumed_rc = resumed.returncode
    first["resume_log"] = resumed.stdout + resumed.stderr
    return {
        "argv": argv,
        "out": out,
        "first": first,
        "seen": seen,
        "resumed_rc": resumed_rc,
        "seconds": time.monotonic() - start,
        "data": demo_category,
    }


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)  # the search fixture: 2 trials, an interrupt and a resume
def test_interrupted_search_resumes_without_repeating_finished_trials(search) -> None:
    out, first = search["out"], search["first"]
    assert first["rc"] == 130, (
        f"the first run should stop on the interrupt and say how to resume:\n{first['log'][-3000:]}"
    )
    # one trial at a time on the session's 4 logical CPUs, whatever the machine's core count
    assert re.search(r"at most 1 at once \(\S+ of 4 CPUs each\)", first["log"]), first["log"][-3000:]
    assert first["summary"]["interrupted"] and first["summary"]["completed"] == 1
    assert [s for _, s, _ in search["seen"]["at_interrupt"]].count("COMPLETE") == 1
    assert search["resumed_rc"] == 0, first["resume_log"][-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["interrupted"] and summary["trials"] == 2 and summary["completed"] == 2
    # the trial finished before the interrupt was not run again: its results and checkpoint are untouched
    finished = [name for name, text in first["trial_results"].items() if b'"final": 1' in text]
    assert len(finished) == 1
    name = finished[0]
    assert (out / "search" / name / "result.json").read_bytes() == first["trial_results"][name]
    assert {p.stat().st_mtime for p in (out / "search" / name).glob("checkpoint_*")} == {first["checkpoints"][name]}
    # exactly 2 Tune trials, each one Optuna trial, each finished once
    trial_dirs = sorted((out / "search").glob("trial_*"))
    assert len(trial_dirs) == 2
    finals = [sum('"final": 1' in line for line in (d / "result.json").read_text().splitlines()) for d in trial_dirs]
    assert finals == [1, 1]
    numbers = [json.loads((d / "params.json").read_text())["optuna_trial"] for d in trial_dirs]
    assert sorted(numbers) == [0, 1]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_search_end_to_end_study_best_and_outputs(search, tmp_path: Path) -> None:
    out = search["out"]
    # the Optuna study in SQLite: 2 finished (COMPLETE) trials, both models
    study = _study(out / "study.db")
    assert [s for _, s, _ in study] == ["COMPLETE"] * 2
    models = {p.split("model=")[1].split(",")[0] for _, _, p in study}
    assert len(models) == 2  # model is stored as Optuna's categorical index: two distinct values
    rows = list(csv.DictReader(io.StringIO(Path(out / "results.csv").read_text())))
    assert [r["rank"] for r in rows] == ["1", "2"] and {r["model"] for r in rows} == {"padim", "stfpm"}
    objs = [float(r["objective"]) for r in rows]
    assert objs == sorted(objs, reverse=True)
    assert all(r["status"] == "completed" and r["val_auroc"] and r["synthetic_auroc"] for r in rows)
    # STFPM reported every epoch (objective included, for ASHA) and once more at the end
    stfpm = next(r for r in rows if r["model"] == "stfpm")
    result_file = out / "search" / f"trial_{stfpm['trial']}" / "result.json"
    lines = [json.loads(line) for line in result_file.read_text().splitlines()]
    assert [l.get("epoch") for l in lines] == [0, 1, None] and all("objective" in l for l in lines)
    assert all(l.get("train_placement_group") for l in lines[:2])  # what a stopped trial's cleanup releases
    assert not (out / "search" / f"trial_{stfpm['trial']}" / "ray_train").exists()  # nested checkpoints removed
    # TensorBoard logs per trial
    assert all(list(d.glob("events.out.tfevents.*")) for d in (out / "search").glob("trial_*"))
    # best/: a complete run directory of the best trial, metrics on the held-out part of the test split
    best = out / "best"
    tune_info = json.loads((best / "tune.json").read_text())
    assert tune_info["trial"] == rows[0]["trial"]
    assert set(tune_info["heldout_images"]).isdisjoint(tune_info["search_images"])
    held = json.loads((best / "metrics.json").read_text())
    assert held["num_test_images"] == len(tune_info["heldout_images"]) and "held-out" in held["evaluated_on"]
    assert (best / "report.html").is_file()
    from distributed_anomaly.training import evaluate_run

    copy = tmp_path / "best_copy"  # evaluate rewrites metrics.json: leave the fixture's best/ as the search wrote it
    shutil.copytree(best, copy)
    whole = evaluate_run(copy, progress=False)  # `best/` evaluates like any run directory
    test = records_of_split(load_dataset(search["data"]), "test")
    assert whole["num_test_images"] == len(test) and whole["image_auroc"] is not None
    cfg, _, _ = rundir.load_config(best)
    assert cfg.model == rows[0]["model"] and cfg.backbone == "mobilenet_v2" and cfg.image_size == 64


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_rerun_reuses_the_finished_search_and_export(search, tmp_path, monkeypatch, capsys):
    """`pipeline` over an OUT whose search finished (the fixture's, asked for with the same options): the
    search is reused, not rerun -- the request the CLI builds compares equal to the one the search stored --
    the best run is exported once, and a second rerun finds both stages done and says so. Other settings are
    refused. (A rerun as a `ray job` on two nodes: test_cluster_e2e.)"""
    from distributed_anomaly import pipeline

    out = tmp_path / "pipeline"
    shutil.copytree(search["out"], out / pipeline.TUNE)  # the fixture's search is read-only

    def no_search(*args, **kwargs):
        raise AssertionError("the finished search was run again")

    monkeypatch.setattr(pipeline, "tune_search", no_search)
    args = list(search["argv"][1:])  # the search's own options, without its --out and --address
    for flag in ("--out", "--address"):
        i = args.index(flag)
        del args[i : i + 2]
    argv = ["pipeline", *args, "--out", str(out)]
    assert cli.main(argv) == 0
    first = capsys.readouterr().err
    assert "search: already finished" in first and f"-> {out / pipeline.MODEL} (fp32)" in first  # exported
    assert cli.main(argv) == 0
    again = capsys.readouterr().err
    assert "search: already finished" in again and f"export: {out / pipeline.MODEL} already holds fp32" in again
    record = json.loads((out / "pipeline.json").read_text())
    assert record["stages"]["export"]["dir"] == str(out / pipeline.MODEL) and (out / "model" / "model.xml").is_file()
    assert cli.main([*argv[:-2], "--samples", "3", "--out", str(out)]) == 2  # another search: refused


def _render(browser: str, page: Path, tmp_path: Path) -> tuple[dict, np.ndarray]:
    """Screenshot and DOM probe of a page, as test_report does for the evaluation report."""
    probe_page = page.with_name("probe_" + page.name)
    probe_page.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    shot = tmp_path / "tune_report.png"
    commands = {
        "screenshot": [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'p1'}",
            f"--screenshot={shot}",
            page.resolve().as_uri(),
        ],
        "dom": [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'p2'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe_page.resolve().as_uri(),
        ],
    }
    try:
        out = run_chromium(commands)
    finally:
        probe_page.unlink(missing_ok=True)
    m = re.search(r'<div id="probe"([^>]*)>', out["dom"][0])
    assert m, "the probe did not run: " + out["dom"][0][-500:]
    return dict(re.findall(r'data-([a-z]+)="([^"]*)"', m.group(1))), np.asarray(Image.open(shot).convert("L"), float)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(900)
def test_tune_report_renders_in_headless_chromium(chromium: str, search, tmp_path: Path) -> None:
    from distributed_anomaly.tuning.report import SECTIONS

    report = search["out"] / "report.html"
    text = report.read_text(encoding="utf-8")
    # self-contained: inline PNG plots, no script, nothing fetched; the one link is the best trial's report
    imgs = re.findall(r'<img[^>]*src="([^"]+)"', text)
    assert len(imgs) >= 2 and all(s.startswith("data:image/png;base64,") for s in imgs)  # + importance if computable
    for pattern in (r"https?://", r"<script", r"<link", r"@import", r"url\("):
        assert not re.search(pattern, text, re.IGNORECASE), pattern
    links = [h for h in re.findall(r'href="([^"]+)"', text) if not h.startswith("#")]
    assert links == ["best/report.html"] and (search["out"] / links[0]).is_file()
    rows = list(csv.DictReader(io.StringIO(Path(search["out"] / "results.csv").read_text())))
    assert all(f'data-trial="{r["trial"]}"' in text for r in rows)

    attrs, img = _render(chromium, report, tmp_path)
    assert int(attrs["images"]) == len(imgs) and attrs["broken"] == "0"
    assert attrs["overflow"] == "0", "the page scrolls sideways at 1280 px"
    assert set(SECTIONS) <= set(attrs["sections"].split())
    assert img.shape == (4000, 1280)
    assert img.std() > 20, "screenshot looks blank"
    assert (img < 200).mean() > 0.03, "too little content drawn"
    assert img[:1200].std() > 10, "summary and trials not drawn"


def test_searcher_records_completed_pruned_and_failed_trials_in_the_study() -> None:
    """Tune trial outcomes as Optuna states: final report -> COMPLETE, stopped by ASHA before it -> PRUNED with
    the value it was stopped on, an exception -> FAIL; the define-by-run config carries the Optuna number."""
    import optuna

    from distributed_anomaly.tuning.tuner import DefineByRun, PrunedAwareOptunaSearch

    space = parse_space(TINY_SPACE, "tiny.yaml")
    searcher = PrunedAwareOptunaSearch(
        space=DefineByRun(space),
        metric="objective",
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=0),
        study_name="s",
    )
    configs = {t: searcher.suggest(t) for t in ("done", "pruned", "failed")}
    assert [c["optuna_trial"] for c in configs.values()] == [0, 1, 2]
    assert all(c["backbone"] == "mobilenet_v2" and c["image_size"] == 64 for c in configs.values())
    searcher.on_trial_result("done", {"objective": 0.6, "training_iteration": 1})
    searcher.on_trial_complete("done", {"objective": 0.7, "training_iteration": 2, "final": 1})
    searcher.on_trial_result("pruned", {"objective": 0.3, "training_iteration": 1})
    searcher.on_trial_complete("pruned", {"objective": 0.2, "training_iteration": 2})  # ASHA's last word
    searcher.on_trial_complete("failed", None, error=True)
    trials = searcher._ot_study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert trials[0].value == 0.7 and trials[1].intermediate_values == {1: 0.3, 2: 0.2} and trials[1].value == 0.2
    assert trials[0].user_attrs["config"]["backbone"] == "mobilenet_v2"  # fixed settings recorded per trial


@pytest.mark.ray
def test_a_stopped_trials_train_placement_group_is_released(ray_local, tmp_path: Path) -> None:
    """ASHA's stop kills a trial with its Ray Train controller; the workers' placement group it reported is
    removed by the driver (else it holds CPUs the next trials wait for), and so are its student checkpoints."""
    from ray.util.placement_group import placement_group, placement_group_table

    from distributed_anomaly.tuning.trial import TRAIN_PG_KEY
    from distributed_anomaly.tuning.tuner import TrialProgress

    pg = placement_group([{"CPU": 0.5}])
    ray_local.get(pg.ready(), timeout=120)

    class Trial:
        trial_id = "t"

        def __init__(self, **result) -> None:
            self.last_result = {TRAIN_PG_KEY: pg.id.hex(), "objective": 0.5, **result}

    checkpoints = tmp_path / "search" / "trial_t" / "ray_train"
    (checkpoints / "stfpm" / "checkpoint_000000").mkdir(parents=True)
    progress = TrialProgress(quiet=True, experiment=str(tmp_path / "search"))
    assert not progress.release_train_resources(Trial(final=1))  # a finished trial's run released it itself
    assert placement_group_table(pg)["state"] == "CREATED" and checkpoints.is_dir()
    assert progress.release_train_resources(Trial())
    assert placement_group_table(pg)["state"] == "REMOVED" and not checkpoints.exists()
    assert not progress.release_train_resources(Trial())


# --------------------------------------------------------------------------------------------------------
# failures are recorded, the search goes on
# --------------------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_failed_trials_are_recorded_and_the_search_goes_on(ray_local, demo_category: Path, tmp_path: Path) -> None:
    from distributed_anomaly.tuning.request import TuneRequest
    from distributed_anomaly.tuning.search import tune_search

    broken = tmp_path / "mobilenet_v2-broken.pth"
    broken.write_bytes(b"not a state dict")
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE.replace("model: {choice: [padim, stfpm]}", "model: {choice: [padim]}"))
    request = TuneRequest(
        data=str(demo_category),
        space_file=str(space),
        space_text=space.read_text(),
        samples=2,
        weights=(("mobilenet_v2", str(broken)),),
    )
    summary = tune_search(request, tmp_path / "out", progress=False)
    assert summary["trials"] == 2 and summary["failed"] == 2 and summary["completed"] == 0
    assert summary["best"] is None and not (tmp_path / "out" / "best").exists()
    assert len(summary["failures"]) == 1 and summary["failures"][0]["trials"] == 2
    assert summary["failures"][0]["error"].startswith("WeightsUnavailableError: cannot load weights file")
    assert [s for _, s, _ in _study(tmp_path / "out" / "study.db")] == ["FAIL", "FAIL"]
    rows = list(csv.DictReader(io.StringIO(Path(tmp_path / "out" / "results.csv").read_text())))
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all("cannot load weights" in r["error"] for r in rows)
    assert "cannot load weights file" in (tmp_path / "out" / "report.html").read_text()
    with pytest.raises(UserError, match="already holds a search"):
        tune_search(request, tmp_path / "out", progress=False)
