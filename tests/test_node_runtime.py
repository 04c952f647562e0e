"""What runs on a node of a Ray PADIM fit is torch-free (issue 17, item 4), and the model input is the same there.

The OpenVINO pool actors decode with data.decode (numpy and Pillow), run the driver's patched IR (frozen_ir) and
fold moments in numpy (moments), so their processes never load torch, checked with sys.modules inside the actors
of a real fit, and the statistics still equal the in-process fit's. data.decode.normalise (Pillow's float
resampler) stays within 2e-5 (normalised units) of torch's antialiased bilinear interpolate, which it replaced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed_anomaly import engine
from distributed_anomaly.data.decode import IMAGENET_MEAN, IMAGENET_STD, normalise
from distributed_anomaly.data.mvtec import load_category, records_of_split
from distributed_anomaly.models.padim import Padim


def _torch_reference(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
    if t.shape[1:] != hw:
        t = F.interpolate(t[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
    return ((t - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)).numpy()


@pytest.mark.parametrize(
    "shape,hw",
    [((300, 240, 3), (64, 64)), ((50, 70, 3), (64, 96)), ((64, 64, 3), (64, 64)), ((1024, 512, 3), (100, 90))],
)
def test_normalise_matches_torch_antialiased_interpolate(shape, hw) -> None:
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    got = normalise(img, hw)
    assert got.shape == (1, 3, *hw) and got.dtype == np.float32
    # In normalised units: 5e-6 of the [0, 1] range (float32 weights at non-integer scale factors).
    np.testing.assert_allclose(got[0], _torch_reference(img, hw), rtol=0, atol=2e-5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.ray
def test_openvino_pool_actors_load_no_torch_and_fit_the_same_statistics(ray_local, demo_category: Path) -> None:
    from distributed_anomaly.distributed import fit_padim_ray

    records = records_of_split(load_category(demo_category), "train")

    def tiny() -> Padim:
        return Padim("resnet18", ["layer1", "layer2"], n_features=20, image_size=64, pretrained=False, seed=0)

    reference = engine.fit_padim(tiny(), records, batch_size=8, progress=False)
    stats, info = fit_padim_ray(
        tiny(), records, batch_size=6, workers=2, progress=False, runtime="openvino", decode_in_actors=True
    )
    assert info["runtime"] == "openvino" and info["decode_in_actors"] is True
    assert sum(w["images"] for w in info["workers"]) == len(records) == stats.count
    assert [w["torch_loaded"] for w in info["workers"]] == [False] * len(info["workers"])
    assert _rel(stats.mean, reference.mean) < 1e-6
    assert _rel(stats.covariance(), reference.covariance()) < 1e-6


@pytest.mark.ray
def test_ray_stfpm_teacher_on_openvino_matches_the_torch_teacher(ray_local, demo_category: Path, tmp_path) -> None:
    """One SGD step (8 images, batch 8) of Ray Train's loop (local mode) with the teacher compiled from the driver's
    IR, against the same step in process with the torch teacher: equal loss and student, within the OpenVINO
    teacher's feature tolerance (the batch's order does not matter to a summed loss and batch statistics)."""
    from distributed_anomaly import rundir
    from distributed_anomaly.config import ModelConfig, TrainConfig
    from distributed_anomaly.distributed.stfpm_train import train_stfpm_ray

    cfg = ModelConfig(model="stfpm", backbone="resnet18", layers=("layer1", "layer2"), image_size=64)
    tcfg = TrainConfig(epochs=1, batch_size=8, pretrained=False).resolved("stfpm")
    fit = records_of_split(load_category(demo_category), "train")[:8]
    reference = rundir.build_model(cfg, pretrained=False)
    steps = {k: getattr(tcfg, k) for k in ("epochs", "batch_size", "lr", "momentum", "weight_decay", "patience")}
    torch_run = engine.train_stfpm(reference, fit, [], **steps, progress=False, runtime="torch")
    trained, info = train_stfpm_ray(
        cfg,
        tcfg,
        fit,
        [],
        workers=0,
        model=rundir.build_model(cfg, pretrained=False),
        storage=str(tmp_path),
        progress=False,
    )
    assert info["teacher_runtime"] == "openvino"
    assert info["history"][0]["train_loss"] == pytest.approx(torch_run.history[0].train_loss, rel=1e-3)
    for k, v in reference.student.state_dict().items():
        torch.testing.assert_close(trained.student.state_dict()[k], v, rtol=1e-3, atol=1e-5)
