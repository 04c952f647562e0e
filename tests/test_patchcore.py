"""PatchCore: the coreset (exact greedy against a reference, streaming within its bound), the model's pieces
against plain formulas, a fit end to end on both runtimes, the export with the bank in the IR, the search
space, and the Ray scoring actor (the Ray fit, on 1 worker and on 2 across two nodes: test_cluster_fits.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed_anomaly import engine, metrics, rundir
from distributed_anomaly.config import ModelConfig
from distributed_anomaly.data.dataset import load_dataset
from distributed_anomaly.data.images import read_image, to_tensor
from distributed_anomaly.data.mvtec import records_of_split
from distributed_anomaly.errors import UserError
from distributed_anomaly.models import coreset, patchcore
from distributed_anomaly.models.coreset import StreamingCoreset, coverage_radius, greedy_coreset, merge_candidates
from distributed_anomaly.models.patchcore import PatchCore, channel_pool, nearest

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def reference_greedy(x: np.ndarray, k: int, start: int) -> list[int]:
    """Algorithm 1 of the paper, literally: add the point farthest from the chosen set, k times."""
    chosen = [start]
    while len(chosen) < k:
        d = np.min([np.linalg.norm(x - x[c], axis=1) for c in chosen], axis=0)
        chosen.append(int(np.argmax(d)))
    return chosen


def clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    """Points around 20 centres of different spreads: a coreset has structure to find."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=g) * 4
    which = torch.randint(20, (n,), generator=g)
    return centres[which] + torch.randn(n, dim, generator=g) * (0.2 + which[:, None] / 20)


def test_exact_greedy_equals_the_reference() -> None:
    x = clustered(400, 8, seed=1).double()
    idx, radius = greedy_coreset(x, 40, start=7)
    assert idx.tolist() == reference_greedy(x.numpy(), 40, 7)
    assert radius == pytest.approx(coverage_radius(x, x[idx]), rel=1e-9)


def test_streaming_coreset_is_exact_in_one_chunk_and_within_its_bound_otherwise() -> None:
    x = clustered(6000, 16, seed=2)
    ratio = 0.05
    exact = StreamingCoreset(ratio, None, chunk_patches=10_000)
    for part in x.split(700):
        exact.add(part)
    one = exact.finish()
    assert one.exact and one.bank.shape == (math.ceil(ratio * 6000), 16) and one.candidates == 6000
    start = int((x - x.mean(0)).norm(dim=1).argmax())  # the farthest row from the mean
    assert torch.equal(one.bank, x[greedy_coreset(x, 300, start)[0]])  # the exact greedy coreset itself
    shuffled = StreamingCoreset(ratio, None, chunk_patches=10_000)
    shuffled.add(x[torch.randperm(6000, generator=torch.Generator().manual_seed(0))])
    assert set(map(tuple, shuffled.finish().bank.tolist())) == set(map(tuple, one.bank.tolist()))  # order-free
    r_exact = coverage_radius(x, one.bank)

    # Streaming over 1000-patch chunks, and sharded over two "workers" merged afterwards: same guarantees.
    stream = StreamingCoreset(ratio, None, chunk_patches=1000)
    shards = [StreamingCoreset(ratio, None, chunk_patches=1000) for _ in range(2)]
    for i, part in enumerate(x.split(700)):
        stream.add(part)
        shards[i % 2].add(part)
    streamed = stream.finish()
    merged = merge_candidates([s.candidates() for s in shards], ratio, None)
    for result in (streamed, merged):
        assert not result.exact and result.bank.shape == (300, 16) and result.patches == 6000
        assert result.candidates <= 2 * ratio * 6000 + 2 * 7  # O(bank): the chunk coresets, not the patches
        r = coverage_radius(x, result.bank)
        assert r <= result.radius_bound + 1e-4  # triangle inequality: chunk radius + merge radius
        assert r <= 4 * r_exact  # the stated guarantee
        assert r <= 1.25 * r_exact  # what this seeded set measures (docs/models.md gives the figures)


def test_projection_is_seeded_and_only_reduces() -> None:
    assert coreset.projection(128, seed=0) is None
    a, b = coreset.projection(384, seed=5), coreset.projection(384, seed=5)
    assert a.shape == (384, 128) and torch.equal(a, b)


def test_channel_pool_is_adaptive_average_pooling() -> None:
    x = torch.randn(3, 50, 384)
    assert torch.allclose(x @ channel_pool(384, 100), F.adaptive_avg_pool1d(x, 100), atol=1e-6)


def test_nearest_over_bank_blocks_equals_brute_force(monkeypatch) -> None:
    monkeypatch.setattr(patchcore, "BANK_BLOCK", 7)
    x, bank = torch.randn(50, 6), torch.randn(30, 6)
    dist2, idx = nearest(x, bank)
    full = torch.cdist(x, bank)
    assert torch.equal(idx, full.argmin(1))
    assert torch.allclose(dist2.sqrt(), full.min(1).values, atol=1e-5)


def test_image_weights_follow_the_paper() -> None:
    model = PatchCore("resnet18", ("layer2", "layer3"), n_features=4, image_size=32, pretrained=False)
    g = torch.Generator().manual_seed(0)
    model.set_bank(torch.randn(20, 4, generator=g))
    emb = torch.randn(2, 16, 4, generator=g)
    scores, index = model.patch_scores(emb)
    weights = model.image_weights(emb, scores, index)
    bank = model.memory_bank
    for b in range(2):
        top = int(scores[b].argmax())
        star = bank[int(index[b, top])]
        support = torch.cdist(star[None], bank)[0].argsort()[:9]  # N_b(m*), m* itself first
        dist = (bank[support] - emb[b, top]).norm(dim=1)
        expected = 1 - torch.exp(dist[0]) / torch.exp(dist).sum()
        assert float(weights[b]) == pytest.approx(float(expected), rel=1e-5)
        assert float(dist[0]) == pytest.approx(float(scores[b, top]), rel=1e-4)


def test_options_are_checked() -> None:
    with pytest.raises(UserError, match="coreset-ratio must be in"):
        ModelConfig("patchcore", coreset_ratio=1.5)
    with pytest.raises(UserError, match="PatchCore only"):
        ModelConfig("padim", num_neighbors=3)
    cfg = ModelConfig("patchcore", "mobilenet_v2")
    assert cfg.layers == ("features.6", "features.13")
    assert ModelConfig("patchcore").layers == ("layer2", "layer3")


@pytest.mark.slow
def test_fit_end_to_end_and_runtimes_agree(patchcore_run: Path, demo_category: Path) -> None:
    info = json.loads((patchcore_run / "config.json").read_text())["info"]
    bank = info["coreset"]
    # 21 training images x 8 x 8 patches, 10 % of them, the exact greedy coreset (one chunk).
    assert bank["patches"] == info["num_train_images"] * 64 and bank["exact"]
    assert bank["bank_size"] == math.ceil(0.1 * bank["patches"])
    assert json.loads((patchcore_run / "metrics.json").read_text())["image_auroc"] >= 0.9
    _, model, _ = rundir.load_model(patchcore_run)
    assert model.memory_bank.shape == (bank["bank_size"], 128)  # 32 + 96 channels, not pooled
    test = records_of_split(load_dataset(demo_category), "test")
    ov = engine.anomaly_maps(model, test, SIZE, 8, progress=False, runtime="openvino")
    eager = engine.anomaly_maps(model, test, SIZE, 8, progress=False, runtime="torch")
    assert np.abs(ov - eager).max() <= 1e-4 * (eager.max() - eager.min())


@pytest.mark.slow
def test_export_holds_the_bank_and_scores_like_torch(patchcore_run: Path, demo_category: Path, tmp_path: Path) -> None:
    import openvino as ov

    from distributed_anomaly.export import export_run
    from distributed_anomaly.inference import OpenVINOInferencer
    from distributed_anomaly.torch_runner import TorchRunner

    ir = export_run(patchcore_run, tmp_path / "ir")
    meta = json.loads((ir / "metadata.json").read_text())
    assert meta["model"] == "patchcore" and meta["memory_bank"]["in_graph"] and meta["num_neighbors"] == 9
    graph = ov.Core().read_model(ir / "model.xml")
    assert {"MatMul", "ReduceMin", "TopK"} <= {op.get_type_name() for op in graph.get_ops()}  # search in the graph
    assert graph.get_rt_info(["model_info", "model_type"]).astype(str) == "AnomalyDetection"  # what Model API reads
    records = records_of_split(load_dataset(demo_category), "test")
    images = [read_image(r.path) for r in records]
    ref = TorchRunner.from_run(patchcore_run).raw_maps(to_tensor(images, SIZE))
    got = OpenVINOInferencer(ir, num_threads=2).anomaly_maps(to_tensor(images, SIZE))
    assert np.abs(got - ref).max() <= 1e-3 * (ref.max() - ref.min())
    labels = np.array([r.label for r in records], dtype=bool)
    auroc = [metrics.auroc(m.reshape(len(m), -1).max(1), labels) for m in (got, ref)]
    assert abs(auroc[0] - auroc[1]) <= 0.001


def test_search_space_loads_and_every_combination_is_valid() -> None:
    from distributed_anomaly.tuning.space_file import load_space

    space = load_space(ROOT / "search_spaces" / "patchcore.yaml")
    assert space.models() == {"patchcore"}
    space.validate()


def test_ray_scoring_actor_gives_the_in_process_maps(patchcore_run: Path, demo_category: Path) -> None:
    """`train --workers N` scores PatchCore's test split on the Ray Data pool that scores PADIM's
    (distributed.scoring, tested on Ray in test_distributed_padim.py): its actor, rebuilt from the payload the
    driver puts in the object store (the bank travels in it), gives engine.anomaly_maps' nearest-neighbour maps,
    and an unreadable image's row stays empty."""
    from distributed_anomaly.distributed.payload import model_payload
    from distributed_anomaly.distributed.scoring import ModelScorer

    _, model, _ = rundir.load_model(patchcore_run)
    test = records_of_split(load_dataset(demo_category), "test")[:5]
    want = engine.anomaly_maps(model, test, SIZE, 8, progress=False, runtime="torch")
    pixels = to_tensor([read_image(r.path) for r in test], SIZE).numpy()
    ok = np.array([True, True, False, True, True])
    batch = {"idx": np.arange(5), "pixels": pixels, "ok": ok, "error": np.array(["", "", "bad", "", ""])}
    for runtime, tol in (("torch", 1e-5), ("openvino", 1e-3)):  # 1 thread here, 2 in process: rounding
        got = ModelScorer(model_payload(model), 1, runtime, "f32")(batch)
        assert np.array_equal(got["ok"], ok) and not got["map"][2].any()
        np.testing.assert_allclose(got["map"][ok], want[ok], rtol=tol, atol=tol * float(want.max()))
