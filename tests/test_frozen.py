"""The frozen-network runtimes (frozen.py) and the fit's moment accumulator (moments.MomentAccumulator).

OpenVINO features must give the torch path's statistics within 1e-4 relative (means and covariances) and the
same AUROC to 3 decimals; the accumulator must equal a float64 pass however the images are split; the
converted extractor is cached per backbone, taps, image size and weights, and a half-written entry is rebuilt.
"""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_anomaly import engine, frozen, frozen_ir
from distributed_anomaly.data.loader import iter_batches
from distributed_anomaly.data.mvtec import load_category, records_of_split
from distributed_anomaly.metrics import auroc
from distributed_anomaly.models.padim import Padim
from distributed_anomaly.moments import MomentAccumulator, moments_to_stats
from distributed_anomaly.stats import GaussianStats, gaussian_from_moments


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def _patches(n: int, p: int = 6, c: int = 4, offset: float = 50.0, seed: int = 0) -> torch.Tensor:
    """(N, P, C) float32 embeddings with means far from zero (where naive float32 sums lose digits)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=gen)
    return (torch.randn(n, p, c, generator=gen) @ mix + offset + torch.rand(p, c, generator=gen) * 10).float()


def test_accumulator_equals_a_float64_pass_for_any_batching() -> None:
    x = _patches(301)
    reference = GaussianStats.from_batch(x.double().transpose(1, 2))
    for sizes in ([301], [1, 300], [7] * 43, [150, 1, 150]):
        acc = MomentAccumulator(6, 4)
        start = 0
        for size in sizes:
            acc.add_patches(x[start : start + size])
            start += size
        stats = gaussian_from_moments(acc)
        assert stats.count == 301
        assert _rel(stats.mean, reference.mean) < 1e-6
        assert _rel(stats.covariance(), reference.covariance()) < 1e-4


def test_moments_to_stats_equals_the_plain_formula_across_blocks() -> None:
    """37 positions: two full conversion blocks and a partial one, into new arrays and into given ones."""
    rng = np.random.default_rng(5)
    count, shift = 11, rng.standard_normal((37, 5)).astype(np.float32)
    s1, s2 = rng.standard_normal((37, 5)), rng.standard_normal((37, 5, 5)).astype(np.float32)
    offset = s1 / count
    want_m2 = s2.astype(np.float64) - count * offset[:, :, None] * offset[:, None, :]
    mean, m2 = moments_to_stats(count, shift, s1, s2)
    np.testing.assert_allclose(mean, shift + offset, rtol=1e-12)
    np.testing.assert_allclose(m2, want_m2, rtol=1e-12, atol=1e-12)
    out = (np.full((37, 5), np.nan), np.full((37, 5, 5), np.nan))
    assert moments_to_stats(count, shift, s1, s2, out=out)[1] is out[1]
    np.testing.assert_array_equal(out[1], m2)


def test_accumulator_keeps_copies_of_deviations_in_a_reused_buffer() -> None:
    """The OpenVINO stream hands over views of its output buffers, refilled by the next chunk: what the
    accumulator stages for a later fold must be its own copy."""
    x = _patches(41).numpy()
    acc = MomentAccumulator(6, 4)
    acc.add_patches(x[:1])
    buffer = np.empty((3, 6, 4), dtype=np.float32)
    for start in range(1, 41, 3):
        dev = buffer[: len(x[start : start + 3])]
        dev[:] = x[start : start + 3] - acc.shift
        acc.add_deviations(dev, dev.sum(0))
        buffer.fill(np.nan)  # the next chunk overwrites it
    reference = GaussianStats.from_batch(torch.from_numpy(x).double().transpose(1, 2))
    stats = gaussian_from_moments(acc)
    assert stats.count == 41
    assert _rel(stats.covariance(), reference.covariance()) < 1e-4


def test_staged_deviations_fold_once_when_chunks_are_read_concurrently() -> None:
    """A Ray node's store actor is threaded: the driver asks for several position chunks of one partial at once,
    and each read folds what is staged. The stage must be folded exactly once."""
    x = _patches(9, p=512, c=32, seed=2).numpy()
    for _ in range(5):
        acc = MomentAccumulator(512, 32)
        acc.add_patches(x)  # 9 images: staged, not folded
        barrier = threading.Barrier(4)

        def read(p0: int, acc=acc, barrier=barrier) -> np.ndarray:
            barrier.wait()
            return moments_to_stats(*acc.raw_chunk(p0, p0 + 128))[1]  # a node's chunk, converted as the driver does

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            m2 = np.concatenate(list(pool.map(read, range(0, 512, 128))))
        reference = GaussianStats.from_batch(torch.from_numpy(x).double().transpose(1, 2))
        assert _rel(torch.from_numpy(m2), reference.m2) < 1e-4


def test_partials_of_different_shifts_merge_exactly() -> None:
    """Two workers, each shifted by its own first batch, merged as GaussianStats: one pass over all."""
    x = _patches(120, seed=1)
    a, b = MomentAccumulator(6, 4), MomentAccumulator(6, 4)
    a.add_patches(x[:50])
    b.add_patches(x[50:51] + 5.0)  # a shift far from b's other images: still exact
    b.add_patches(x[51:])
    b_ref = torch.cat([x[50:51] + 5.0, x[51:]])
    merged = gaussian_from_moments(a).merge(gaussian_from_moments(b))
    reference = GaussianStats.from_batch(torch.cat([x[:50], b_ref]).double().transpose(1, 2))
    assert merged.count == 120
    assert _rel(merged.covariance(), reference.covariance()) < 1e-4
    assert _rel(merged.mean, reference.mean) < 1e-6


def test_workers_of_a_node_fold_into_one_partial_from_the_node_shift() -> None:
    """NodePartials (the store actor's class, called here in process): the first worker's batch mean fixes the
    node's shift, a second worker with a far-off first batch takes its deviations from that shift too, and
    the one partial equals a float64 pass over every image, with each worker's count kept for the driver."""
    from distributed_anomaly.distributed.node_fit import NodePartials

    x = _patches(90, seed=2).numpy()
    node = NodePartials(6, 4, threads=1)
    shift_a = node.node_shift(x[:10].mean(0))
    shift_b = node.node_shift(x[10:12].mean(0) + 5.0)
    assert np.array_equal(shift_a, shift_b) and np.allclose(shift_a, x[:10].mean(0))
    for worker, lo, hi in (("a", 0, 10), ("b", 10, 12), ("a", 12, 50), ("b", 50, 90)):
        dev = x[lo:hi] - shift_a
        node.update(worker, dev, dev.sum(0))
    assert node.worker_counts() == {"a": 48, "b": 42}
    count, shift, s1, s2 = node.chunk(0, 6)  # shipped as accumulated: S2 in float32
    assert count == 90 and s2.dtype == np.float32 and s1.dtype == np.float64 and np.array_equal(shift, shift_a)
    mean, m2 = moments_to_stats(count, shift, s1, s2)  # where it lands, in float64
    assert (mean.dtype, m2.dtype) == (np.float64, np.float64)
    reference = GaussianStats.from_batch(torch.from_numpy(x).double().transpose(1, 2))
    assert _rel(torch.from_numpy(m2), reference.m2) < 1e-4
    assert _rel(torch.from_numpy(mean), reference.mean) < 1e-6
    node.drop()
    assert node.acc is None


def test_the_driver_merges_raw_node_chunks_like_one_pass() -> None:
    """padim_fit._merge_chunk as the driver runs it: two nodes' raw moments (different shifts) pulled in chunks
    of positions, the first converted into the accumulator, the second through a reused buffer and merged."""
    from distributed_anomaly.distributed.padim_fit import _merge_chunk

    x = _patches(70, seed=4).numpy()
    nodes = [MomentAccumulator(6, 4), MomentAccumulator(6, 4)]
    nodes[0].add_patches(x[:30])
    nodes[1].add_patches(x[30:31] - 3.0)
    nodes[1].add_patches(x[31:])
    data = np.concatenate([x[:30], x[30:31] - 3.0, x[31:]])
    acc = GaussianStats.empty(6, 4, torch.float64)
    buffer = GaussianStats.empty(4, 4, torch.float64)  # larger than a chunk: views of it are used
    total = 0
    for node in nodes:
        for p0, p1 in ((0, 3), (3, 5), (5, 6)):
            _merge_chunk(acc, total, p0, p1, node.raw_chunk(p0, p1), buffer if total else None)
        total += node.count
    acc.count = total
    reference = GaussianStats.from_batch(torch.from_numpy(data).double().transpose(1, 2))
    assert _rel(acc.mean, reference.mean) < 1e-6 and _rel(acc.m2, reference.m2) < 1e-4


def test_accumulator_refuses_deviations_without_a_shift_and_wrong_shapes() -> None:
    acc = MomentAccumulator(6, 4)
    with pytest.raises(ValueError, match="first batch"):
        acc.add_deviations(torch.zeros(2, 6, 4), torch.zeros(6, 4))
    acc.add_patches(_patches(3))
    with pytest.raises(ValueError, match="deviations must be"):
        acc.add_deviations(torch.zeros(2, 4, 6), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="fixed once"):
        acc.set_shift(torch.zeros(6, 4))


@pytest.fixture(scope="module")
def small_model() -> Padim:
    """resnet18 (seeded random weights), 64 px, two taps of different strides: the tail's upsampling runs."""
    return Padim("resnet18", ["layer1", "layer2"], n_features=40, image_size=64, pretrained=False, seed=3).eval()


def test_openvino_patches_equal_torch_patches(small_model: Padim) -> None:
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    shift = torch.randn(small_model.n_positions, small_model.n_features)
    dev_t, sum_t = frozen.TorchPatches(small_model)(images, shift)
    dev_o, sum_o = frozen.OpenVinoPatches(small_model, threads=2)(images, shift)
    assert dev_o.shape == (3, small_model.n_positions, small_model.n_features)
    assert _rel(dev_o, dev_t) < 1e-4
    assert _rel(sum_o, sum_t) < 1e-4
    streamed = [d.clone() for d, _ in frozen.OpenVinoPatches(small_model).stream([images[:2], images[2:]], shift)]
    assert _rel(torch.cat(streamed), dev_t) < 1e-4


def test_frozen_networks_leave_their_threads_unpinned(small_model: Padim) -> None:
    """Several processes on a node run a frozen network (a Ray fit's pool actors, Ray Train workers' teachers):
    OpenVINO's default pinning put all of them on the same core."""
    patches = frozen.OpenVinoPatches(small_model, threads=1).compiled.compiled
    teacher = frozen.OpenVinoTeacher(small_model, threads=1).compiled.compiled
    assert patches.get_property("ENABLE_CPU_PINNING") is False
    assert teacher.get_property("ENABLE_CPU_PINNING") is False


def test_openvino_runs_large_batches_in_sub_batches(small_model: Padim, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch larger than SUB_BATCH runs a few images per OpenVINO call (the network's buffers stay small): the
    same deviations and sum as in one call; a stream yields the chunks in order."""
    images = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    shift = torch.randn(small_model.n_positions, small_model.n_features)
    whole = frozen.OpenVinoPatches(small_model, threads=1)(images, shift)
    monkeypatch.setattr(frozen_ir.CompiledPatches, "SUB_BATCH", 3)
    split = frozen.OpenVinoPatches(small_model, threads=1)
    dev, total = split(images, shift)
    assert dev.shape == whole[0].shape and _rel(dev, whole[0]) < 1e-6 and _rel(total, whole[1]) < 1e-6
    chunks = [(d.clone(), t.clone()) for d, t in split.stream([images[:5], images[5:]], shift)]
    assert [len(d) for d, _ in chunks] == [3, 2, 2]
    assert _rel(torch.cat([d for d, _ in chunks]), whole[0]) < 1e-6
    assert _rel(sum(t for _, t in chunks), whole[1]) < 1e-6


def test_the_converted_extractor_is_cached_per_weights(
    small_model: Padim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(frozen.CACHE_ENV, str(tmp_path))
    first = frozen.taps_model_path(small_model)
    assert (first.parent / "complete.json").is_file()

    def no_conversion(*_args) -> None:
        raise AssertionError("converted again although the cache holds this extractor")

    with monkeypatch.context() as m:
        m.setattr(frozen, "_convert_taps", no_conversion)
        assert frozen.taps_model_path(small_model) == first
    other = Padim("resnet18", ["layer1", "layer2"], n_features=40, image_size=64, pretrained=False, seed=4)
    assert frozen.extractor_key(other) != frozen.extractor_key(small_model)  # other weights
    resized = Padim("resnet18", ["layer1", "layer2"], n_features=40, image_size=96, pretrained=False, seed=3)
    assert frozen.extractor_key(resized) != frozen.extractor_key(small_model)
    reseeded_head = Padim("resnet18", ["layer1", "layer2"], n_features=20, image_size=64, pretrained=False, seed=3)
    assert frozen.extractor_key(reseeded_head) == frozen.extractor_key(small_model)  # same network, other tail
    (first.parent / "complete.json").unlink()  # a half-written entry: rebuilt, not trusted
    assert frozen.taps_model_path(small_model) == first
    assert (first.parent / "complete.json").is_file()


def test_unknown_runtime_and_precision_are_refused(small_model: Padim) -> None:
    with pytest.raises(ValueError, match="unknown runtime"):
        frozen.patch_runtime(small_model, "tensorrt")
    with pytest.raises(ValueError, match="f32 only"):
        frozen.patch_runtime(small_model, "torch", precision="bf16")


def test_openvino_fit_matches_torch_fit_on_demo_data(demo_category: Path, mobilenet_weights: Path) -> None:
    """MobileNetV2 (ImageNet weights), 128 px: statistics within 1e-4 relative, AUROC equal to 3 decimals."""
    records = load_category(demo_category)
    train, test = records_of_split(records, "train"), records_of_split(records, "test")
    results = {}
    for runtime in ("torch", "openvino"):
        model = Padim("mobilenet_v2", image_size=128, weights_file=mobilenet_weights).eval()
        stats = engine.fit_padim(model, train, batch_size=8, progress=False, runtime=runtime)
        maps = engine.anomaly_maps(model, test, 128, 8, progress=False, runtime=runtime)
        results[runtime] = (stats, maps)
    (s_t, m_t), (s_o, m_o) = results["torch"], results["openvino"]
    assert s_o.count == s_t.count == len(train)
    assert _rel(s_o.mean, s_t.mean) < 1e-4
    assert _rel(s_o.covariance(), s_t.covariance()) < 1e-4
    labels = np.array([r.label for r in test])
    score_t, score_o = m_t.reshape(len(test), -1).max(1), m_o.reshape(len(test), -1).max(1)
    assert round(auroc(score_o, labels), 3) == round(auroc(score_t, labels), 3)
    assert np.abs(m_o - m_t).max() <= 1e-3 * np.ptp(m_t)


def test_streamed_scoring_keeps_record_order(demo_category: Path) -> None:
    """The streamed scoring path (next batch in OpenVINO while the head scores this one) returns each image's
    own map, in record order, as scoring one image at a time in torch does."""
    records = load_category(demo_category)
    model = Padim("resnet18", ["layer1", "layer2"], n_features=40, image_size=64, pretrained=False, seed=3)
    engine.fit_padim(model, records_of_split(records, "train"), batch_size=8, progress=False)
    test = records_of_split(records, "test")[:5]
    assert len(list(iter_batches(test, 64, 2))) == 3  # two full batches and a short one
    by_stream = engine.anomaly_maps(model, test, 64, 2, progress=False, runtime="openvino")
    one_by_one = np.concatenate([engine.anomaly_maps(model, [r], 64, 1, False, runtime="torch") for r in test])
    assert np.ptp(one_by_one) > 0
    assert np.abs(by_stream - one_by_one).max() <= 1e-3 * np.ptp(one_by_one)


def test_openvino_teacher_equals_the_torch_teacher_and_trains_alike(demo_category: Path) -> None:
    """STFPM's teacher on OpenVINO: the same features, so one epoch of training gives the same losses."""
    from distributed_anomaly.models.stfpm import Stfpm

    def model() -> Stfpm:
        return Stfpm("resnet18", ["layer1", "layer2"], image_size=64, pretrained=False, seed=5)

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ref = model()
    with torch.no_grad():
        expected = ref.teacher(images)
    got = frozen.OpenVinoTeacher(ref)(images)
    assert list(got) == list(expected)
    assert all(_rel(got[k], expected[k]) < 1e-4 for k in expected)
    assert frozen.teacher_runtime(ref, "torch") is None
    records = records_of_split(load_category(demo_category), "train")[:12]
    losses = {}
    for runtime in ("torch", "openvino"):
        m = model()
        result = engine.train_stfpm(
            m, records[:8], records[8:], epochs=1, batch_size=4, lr=0.4, momentum=0.9, weight_decay=1e-4,
            patience=3, progress=False, runtime=runtime,
        )  # fmt: skip
        losses[runtime] = (result.history[0].train_loss, result.history[0].val_loss)
    assert losses["openvino"] == pytest.approx(losses["torch"], rel=1e-3)


def test_an_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv(frozen.CACHE_ENV, str(blocker))
    path = frozen.cache_dir()
    assert path.is_dir() and not str(path).startswith(str(blocker))
