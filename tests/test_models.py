"""PADIM and STFPM against direct, naive computations of the papers' formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed_anomaly.data.sizes import as_hw
from distributed_anomaly.errors import UserError
from distributed_anomaly.models.maps import upsample_blur
from distributed_anomaly.models.padim import (
    Padim,
    mahalanobis,
    mahalanobis_blocks,
    mahalanobis_deviations,
    whitening_blocks,
    whitening_factor,
)
from distributed_anomaly.models.stfpm import Stfpm, anomaly_map, stfpm_loss
from distributed_anomaly.stats import COVARIANCE_EPS, GaussianStats


def _tiny_padim(**kw) -> Padim:
    torch.manual_seed(0)
    return Padim("resnet18", ("layer1", "layer2"), kw.pop("n_features", 20), image_size=32, pretrained=False, **kw)


def test_padim_map_equals_naive_mahalanobis() -> None:
    model = _tiny_padim().eval()
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(12, 3, 32, 32, generator=gen)
    with torch.no_grad():
        model.set_gaussian(GaussianStats.from_batch(model.embed(train)))
        test = torch.randn(2, 3, 32, 32, generator=gen)
        got = model(test)
        # Naive: per position, numpy mean/cov over the training embeddings, explicit inverse, explicit sqrt form.
        emb_train = model.embed(train).double().numpy()
        emb_test = model.embed(test).double().numpy()
    n_pos = emb_train.shape[2]
    dist = np.zeros((2, n_pos))
    for p in range(n_pos):
        mu = emb_train[:, :, p].mean(0)
        cov = np.cov(emb_train[:, :, p], rowvar=False) + COVARIANCE_EPS * np.eye(20)
        inv = np.linalg.inv(cov)
        for b in range(2):
            d = emb_test[b, :, p] - mu
            dist[b, p] = np.sqrt(d @ inv @ d)
    naive = torch.from_numpy(dist).float().reshape(2, 1, *model.grid)
    naive = _blur_reference(F.interpolate(naive, size=(32, 32), mode="bilinear", align_corners=False), "reflect")
    torch.testing.assert_close(got, naive, rtol=1e-4, atol=1e-4)


def test_padim_embedding_layout_and_seeded_channels() -> None:
    a, b, c = _tiny_padim(seed=3), _tiny_padim(seed=3), _tiny_padim(seed=4)
    assert torch.equal(a.idx, b.idx) and not torch.equal(a.idx, c.idx)
    assert len(set(a.idx.tolist())) == 20 and int(a.idx.max()) < 64 + 128
    with torch.no_grad():
        emb = a.embed(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 20, (32 // 4) ** 2)


@pytest.mark.parametrize(("size", "n_features"), [(64, 40), ((48, 80), 40), (64, 2)])  # 2: a tap with none
def test_padim_embedding_equals_a_gather_from_the_full_concatenation(size, n_features) -> None:
    torch.manual_seed(0)
    model = Padim("resnet18", ("layer1", "layer2", "layer3"), n_features, image_size=size, pretrained=False).eval()
    if n_features == 2:
        assert min(int(sel.numel()) for _, sel in model.tap_channels()) == 0
    x = torch.randn(2, 3, *as_hw(size))
    with torch.no_grad():
        feats = model.extractor(x)
        maps = [feats[name] for name in model.extractor.layers]
        grid = maps[0].shape[-2:]
        full = torch.cat([maps[0]] + [F.interpolate(m, size=grid, mode="nearest") for m in maps[1:]], dim=1)
        expected = full.index_select(1, model.idx).flatten(2)
        assert torch.equal(model.embed(x), expected)
        assert torch.equal(model.embed_positions(x), expected.permute(2, 0, 1))


def test_padim_validates_n_features_and_image_size() -> None:
    with pytest.raises(UserError, match="0 < n_features <= 192"):
        _tiny_padim(n_features=193)
    with pytest.raises(UserError, match="multiple of 8"):
        Padim("resnet18", ("layer1", "layer2"), 10, image_size=36, pretrained=False)


def test_mahalanobis_with_identity_covariance_is_euclidean() -> None:
    emb = torch.randn(3, 4, 5)
    mean = torch.randn(5, 4)
    inv = torch.eye(4).expand(5, 4, 4).contiguous()
    expected = (emb - mean.T[None]).pow(2).sum(1).sqrt()
    torch.testing.assert_close(mahalanobis(emb, mean, inv), expected)


def test_map_blur_preserves_constants_and_mass_centre() -> None:
    const = torch.full((1, 1, 40, 40), 3.0)
    torch.testing.assert_close(upsample_blur(const, (40, 40)), const)  # same size: the blur alone
    spike = torch.zeros(1, 1, 41, 41)
    spike[0, 0, 20, 20] = 1.0
    out = upsample_blur(spike, (41, 41))
    assert out.argmax() == 20 * 41 + 20 and abs(float(out.sum()) - 1.0) < 1e-5


def _blur_reference(maps: torch.Tensor, pad_mode: str) -> torch.Tensor:
    """sigma 4 Gaussian (33 taps) along each axis of padded maps, written out here and not shared with the code."""
    taps = torch.arange(-16, 17, dtype=maps.dtype)
    kernel = torch.exp(-(taps**2) / 32.0)
    kernel = kernel / kernel.sum()
    padded = F.pad(maps, (16, 16, 16, 16), mode=pad_mode)
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))


@pytest.mark.parametrize(
    ("grid", "size", "dtype", "pad_mode"),
    [
        ((64, 64), (256, 256), torch.float32, "reflect"),  # the demo's PADIM map
        ((6, 10), (24, 40), torch.float64, "reflect"),  # non-square
        ((4, 4), (16, 16), torch.float32, "replicate"),  # smaller than the blur's radius
    ],
)
def test_upsample_blur_equals_interpolate_then_blur(grid, size, dtype, pad_mode) -> None:
    maps = torch.rand(3, 1, *grid, generator=torch.Generator().manual_seed(0), dtype=dtype)
    upsampled = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    expected = _blur_reference(upsampled, pad_mode)
    got = upsample_blur(maps, size)
    assert got.dtype == dtype and got.shape == (3, 1, *size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_stfpm_loss_and_map_match_paper_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    t = {"a": torch.randn(2, 4, 6, 6, generator=gen), "b": torch.randn(2, 8, 3, 3, generator=gen)}
    s = {k: torch.randn(v.shape, generator=gen) for k, v in t.items()}
    expected_loss = 0.0
    maps = []
    for k in t:
        tn = t[k] / t[k].norm(dim=1, keepdim=True)
        sn = s[k] / s[k].norm(dim=1, keepdim=True)
        sq = ((tn - sn) ** 2).sum(1)  # (B, h, w)
        h, w = sq.shape[-2:]
        expected_loss += float(0.5 / (h * w) * sq.sum())
        maps.append(F.interpolate(0.5 * sq[:, None], size=(12, 12), mode="bilinear", align_corners=False))
    assert abs(float(stfpm_loss(t, s)) - expected_loss) < 1e-4
    torch.testing.assert_close(anomaly_map(t, s, (12, 12)), maps[0] * maps[1])


def test_stfpm_teacher_frozen_student_trainable() -> None:
    model = Stfpm("resnet18", ("layer1", "layer2"), image_size=32, pretrained=False, seed=0)
    model.train()
    assert not model.teacher.training and model.student.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    opt = torch.optim.SGD(model.student.parameters(), lr=0.1)
    model.loss(torch.randn(2, 3, 32, 32)).backward()
    opt.step()
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # batch-norm running stats included
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_stfpm_student_init_is_seeded() -> None:
    a = Stfpm("resnet18", ("layer1",), image_size=32, pretrained=False, seed=5)
    b = Stfpm("resnet18", ("layer1",), image_size=32, pretrained=False, seed=5)
    for (k, v), w in zip(a.student.state_dict().items(), b.student.state_dict().values()):
        assert torch.equal(v, w), k


def test_batchnorm_recompute_gives_exact_statistics_of_the_kept_weights(demo_category) -> None:
    """After training, the student's running statistics are replaced by those of its final weights."""
    from distributed_anomaly.data.loader import load_batch
    from distributed_anomaly.data.mvtec import load_dataset, records_of_split
    from distributed_anomaly.engine import recompute_batchnorm

    records = records_of_split(load_dataset(demo_category), "train")[:6]
    model = Stfpm("resnet18", ("layer1",), image_size=32, pretrained=False, seed=0)
    bns = [m for m in model.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:  # stale statistics, as a moving average over earlier weights leaves them
        m.running_mean.fill_(3.0)
        m.running_var.fill_(7.0)
    weights = {k: v.clone() for k, v in model.student.named_parameters()}
    captured: list[torch.Tensor] = []
    hook = bns[0].register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    with torch.no_grad():  # the first batch norm's input does not depend on any batch-norm statistics
        model.student(load_batch(records, 32))
    hook.remove()
    x = captured[0]

    assert recompute_batchnorm(model, records, batch_size=len(records)) == len(records)
    torch.testing.assert_close(bns[0].running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bns[0].running_var, x.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert all(not torch.equal(m.running_mean, torch.full_like(m.running_mean, 3.0)) for m in bns)
    assert all(m.momentum == 0.1 for m in bns) and not model.training and not model.teacher.training
    for k, v in model.student.named_parameters():
        assert torch.equal(v, weights[k]), k  # only statistics change
    # a cap draws a seeded subset
    assert recompute_batchnorm(model, records, batch_size=2, max_images=4) == 4


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_block_triangular_head_equals_the_plain_formula(blocks: int) -> None:
    """||U d||^2 over row blocks of the Cholesky factor of Sigma^-1 (the head the export traces) against
    d^T Sigma^-1 d, for a feature count the blocks do not divide."""
    gen = torch.Generator().manual_seed(blocks)
    a = torch.randn(5, 7, 7, generator=gen)
    inv_cov = a @ a.transpose(1, 2) / 7 + 0.1 * torch.eye(7)
    dev = torch.randn(3, 5, 7, generator=gen) * 4
    white = whitening_factor(inv_cov)
    torch.testing.assert_close(white.transpose(1, 2) @ white, inv_cov, rtol=1e-5, atol=1e-5)
    assert torch.equal(white, white.tril())
    factors = whitening_blocks(white, blocks)
    assert len(factors) == blocks and factors[-1][0] == 7
    assert sum(f.numel() for _, f in factors) < inv_cov.numel() or blocks == 1
    torch.testing.assert_close(
        mahalanobis_blocks(dev, factors), mahalanobis_deviations(dev, inv_cov), rtol=1e-5, atol=1e-6
    )


def test_unfitted_padim_scores_with_the_plain_formula() -> None:
    """An all-zero Sigma^-1 (before the fit) has no Cholesky factor: maps are zeros, not an error."""
    model = _tiny_padim().eval()
    assert model.head_blocks() == []
    with torch.no_grad():
        assert float(model(torch.randn(1, 3, 32, 32)).abs().max()) == 0.0


def test_the_fit_s_whitening_factor_is_the_loaded_model_s() -> None:
    """A fitted model's W = L^-1 and the one a loaded model derives from Sigma^-1 alone: one factor, one head."""
    model = _tiny_padim().eval()
    with torch.no_grad():
        model.set_gaussian(GaussianStats.from_batch(model.embed(torch.randn(12, 3, 32, 32))))
    fitted = [f.clone() for _, f in model.head_blocks()]
    loaded = _tiny_padim().eval()
    loaded.load_state_dict(model.state_dict())
    for a, (_, b) in zip(fitted, loaded.head_blocks()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
