"""Backbone registry: taps, weights sources, and the offline error users see."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from distributed_anomaly.errors import UserError, WeightsUnavailableError
from distributed_anomaly.models import backbones as bb
from distributed_anomaly.models import specs


@pytest.mark.parametrize("name", sorted(specs.BACKBONES))
def test_taps_have_declared_channels_and_strides(name: str) -> None:
    spec = specs.BACKBONES[name]
    if name == "wide_resnet50_2":
        layers = ("layer1",)  # keep the test light; deeper taps are covered by the registry table
    else:
        layers = spec.default_layers
    fx = bb.FeatureExtractor(name, layers, pretrained=False).eval()
    with torch.no_grad():
        out = fx(torch.zeros(1, 3, 64, 64))
    for layer in layers:
        channels, stride = spec.taps[layer]
        assert out[layer].shape == (1, channels, 64 // stride, 64 // stride), layer


def test_unknown_backbone_and_bad_layers() -> None:
    with pytest.raises(UserError, match="unknown backbone 'vgg'.*mobilenet_v2, resnet18, wide_resnet50_2"):
        bb.FeatureExtractor("vgg", pretrained=False)
    with pytest.raises(UserError, match="no feature layer 'layer9'"):
        bb.FeatureExtractor("resnet18", ("layer1", "layer9"), pretrained=False)
    with pytest.raises(UserError, match="ordered shallow to deep"):
        bb.FeatureExtractor("resnet18", ("layer2", "layer1"), pretrained=False)


def test_offline_without_cache_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailableError) as info:
        bb.FeatureExtractor("resnet18", pretrained=True)
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "--weights FILE" in msg and "--no-pretrained" in msg


def test_local_weights_file_and_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mobilenet_weights: Path
) -> None:
    fx = bb.FeatureExtractor("mobilenet_v2", weights_file=mobilenet_weights)
    reference = torch.load(mobilenet_weights, weights_only=True)
    torch.testing.assert_close(fx.stages["s0"][0].weight, reference["features.0.0.weight"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = bb.install_weights_file(mobilenet_weights, "mobilenet_v2")
    assert target == tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    cached = bb.FeatureExtractor("mobilenet_v2", pretrained=True)  # from the cache, hash checked, no download
    torch.testing.assert_close(cached.stages["s0"][0].weight, reference["features.0.0.weight"])


def test_bad_weights_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        bb.FeatureExtractor("resnet18", weights_file=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(WeightsUnavailableError, match="cannot load weights file"):
        bb.FeatureExtractor("resnet18", weights_file=junk)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(WeightsUnavailableError, match="do not fit"):
        bb.FeatureExtractor("resnet18", weights_file=wrong)


def test_random_weights_are_seeded() -> None:
    a = bb.FeatureExtractor("resnet18", ("layer1",), pretrained=False, seed=1)
    b = bb.FeatureExtractor("resnet18", ("layer1",), pretrained=False, seed=1)
    c = bb.FeatureExtractor("resnet18", ("layer1",), pretrained=False, seed=2)
    w = lambda fx: fx.stages["s0"][0].weight
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))
