"""Distributed PADIM: Ray Data shards the images, workers accumulate exact Gaussian statistics.

The Ray fit must give the in-process engine.fit_padim's Gaussians (to float64 rounding) for any number of
workers and batch size, count every image exactly once, and stop on a corrupt image with a message naming it
(or skip it when asked, saying so). Across real nodes: test_cluster_fits.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PADIM_TRAIN_ARGS
from fits import RTOL, rel_err, tiny_padim

from distributed_anomaly import engine
from distributed_anomaly.data.mvtec import Record, load_category, records_of_split
from distributed_anomaly.errors import ImageReadError
from distributed_anomaly.models.padim import Padim


@pytest.fixture(scope="module")
def train_records(demo_category: Path) -> list[Record]:
    return records_of_split(load_category(demo_category), "train")


@pytest.fixture(scope="module")
def reference(train_records):
    """In-process fit: the statistics and the fitted model every Ray fit must reproduce."""
    model = tiny_padim()
    stats = engine.fit_padim(model, train_records, batch_size=8, progress=False)
    return stats, model


# 1 worker, and 3 workers with a batch size that divides nothing evenly; 2 workers (batch 4) are held to the same
# statistics by test_skip_corrupt_skips_with_warning_and_counts, which leaves one image out on top.
@pytest.mark.parametrize("workers,batch_size", [(1, 5), (3, 7)])
def test_ray_fit_equals_in_process_fit(ray_local, train_records, reference, workers, batch_size, capsys):
    from distributed_anomaly.distributed import fit_padim_ray

    ref_stats, ref_model = reference
    model = tiny_padim()
    stats, info = fit_padim_ray(model, train_records, batch_size=batch_size, workers=workers)
    assert stats.count == len(train_records)
    assert sum(w["images"] for w in info["workers"]) == len(train_records)
    assert info["num_skipped"] == 0 and info["images_per_s"] > 0
    assert info["partials"] == 1  # one node: its workers fold into one partial, the driver merges one
    assert rel_err(stats.mean, ref_stats.mean) < RTOL
    assert rel_err(stats.covariance(), ref_stats.covariance()) < RTOL
    # The model is finalised once, from the merged statistics.
    assert rel_err(model.mean, ref_model.mean) < 1e-5
    assert rel_err(model.inv_cov, ref_model.inv_cov) < 1e-4
    err = capsys.readouterr().err
    assert f"{len(train_records)}/{len(train_records)} images" in err and "images/s" in err  # progress line


def test_models_travel_as_constructor_args_plus_state_dict():
    """What the actors rebuild from (no weight download) computes exactly what the driver's model computes."""
    from distributed_anomaly.distributed.payload import build_from_payload, model_payload
    from distributed_anomaly.models.stfpm import Stfpm

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for model in (tiny_padim(), Stfpm("resnet18", ["layer1", "layer2"], 64, pretrained=False, seed=3)):
        model.eval()
        if isinstance(model, Padim):  # a fitted Gaussian travels too (for scoring) ...
            model.mean.normal_()
            model.inv_cov.copy_(torch.eye(model.n_features).expand_as(model.inv_cov))
        rebuilt = build_from_payload(model_payload(model))
        with torch.inference_mode():
            assert torch.equal(rebuilt(x), model(x))
    fit_payload = model_payload(tiny_padim(), with_gaussian=False)  # ... but not into the fit
    assert "mean" not in fit_payload["state"] and "inv_cov" not in fit_payload["state"]
    assert build_from_payload(fit_payload).n_features == 20


@pytest.fixture(scope="module")
def corrupt_records(train_records, tmp_path_factory) -> tuple[list[Record], str]:
    """The training images copied, with one deep in the list truncated (a half-written PNG)."""
    folder = tmp_path_factory.mktemp("corrupt") / "train" / "good"
    folder.mkdir(parents=True)
    records = []
    for r in train_records:
        dst = folder / Path(r.path).name
        shutil.copyfile(r.path, dst)
        records.append(Record(str(dst), r.split, r.label, r.defect, r.category))
    bad = records[len(records) - 5].path
    data = Path(bad).read_bytes()
    Path(bad).write_bytes(data[: len(data) // 3])
    return records, bad


def test_corrupt_image_stops_the_fit_naming_the_file(ray_local, corrupt_records):
    from distributed_anomaly.distributed import fit_padim_ray

    records, bad = corrupt_records
    with pytest.raises(ImageReadError) as exc_info:
        fit_padim_ray(tiny_padim(), records, batch_size=4, workers=2, progress=False)
    assert bad in str(exc_info.value) and "--skip-corrupt" in str(exc_info.value)
    assert "Traceback" not in str(exc_info.value)


def test_skip_corrupt_skips_with_warning_and_counts(ray_local, corrupt_records, capsys):
    from distributed_anomaly.distributed import fit_padim_ray

    records, bad = corrupt_records
    stats, info = fit_padim_ray(tiny_padim(), records, batch_size=4, workers=2, progress=False, skip_corrupt=True)
    assert info["skipped"] == [bad] and info["num_skipped"] == 1
    assert stats.count == len(records) - 1
    assert bad in capsys.readouterr().err
    good = [r for r in records if r.path != bad]
    ref = engine.fit_padim(tiny_padim(), good, batch_size=8, progress=False)
    assert rel_err(stats.mean, ref.mean) < RTOL
    assert rel_err(stats.covariance(), ref.covariance()) < RTOL


def test_cli_train_on_ray_equals_in_process(ray_local, demo_category, tmp_path, monkeypatch, capsys):
    """`train --workers 2`: Ray Data fit, calibration and test scoring give the in-process run's model and metrics.
    Calibration and test images are scored in one Ray Data pass (one pool start), whose maps, in record order,
    are the ones the run's model computes in this process. The command uses this process's Ray, and does not
    claim to start one."""
    from distributed_anomaly import rundir
    from distributed_anomaly.cli import main
    from distributed_anomaly.distributed import scoring

    passes = []
    real = scoring.anomaly_maps_ray

    def recorded(model, records, *args, **kwargs):
        maps = real(model, records, *args, **kwargs)
        passes.append((list(records), maps))
        return maps

    monkeypatch.setattr(scoring, "anomaly_maps_ray", recorded)

    common = [
        "train",
        "--data",
        str(demo_category),
        *TINY_PADIM_TRAIN_ARGS,
        "--batch-size",
        "5",
        "--quiet",
    ]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "ray"), "--workers", "2"]) == 0
    assert "starting a local Ray" not in capsys.readouterr().err
    local = json.loads((tmp_path / "local" / rundir.METRICS).read_text())
    on_ray = json.loads((tmp_path / "ray" / rundir.METRICS).read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"):
        assert on_ray[key] == pytest.approx(local[key], abs=1e-6), key
    _, _, info = rundir.load_config(tmp_path / "ray")
    assert info["ray"] and info["images_counted"] == info["num_train_images"]
    assert len(passes) == 1 and info["num_val_images"] > 0
    records, maps = passes[0]
    assert len(records) == info["num_val_images"] + on_ray["num_test_images"]
    cfg, model, _ = rundir.load_model(tmp_path / "ray")
    expected = engine.anomaly_maps(model, records, cfg.image_size, batch_size=5, progress=False)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-5)
    assert info["ray_fit"]["num_skipped"] == 0
    assert sum(w["images"] for w in info["ray_fit"]["workers"]) == info["num_train_images"]
    post_local = json.loads((tmp_path / "local" / rundir.POSTPROCESS).read_text())
    post_ray = json.loads((tmp_path / "ray" / rundir.POSTPROCESS).read_text())
    assert post_ray["image_threshold"] == pytest.approx(post_local["image_threshold"], rel=1e-5)
