"""OpenVINO export: the IR scores like torch (fp32 exactly, fp16/int8 within documented tolerances), Model API
reads it, and broken IR folders fail with a clear message.

The session's shared runs (conftest.py: PADIM at 128 px, STFPM at 64 px, MobileNetV2 offline weights, few
images) and their exports, each made once per session.

Model API and bf16: on CPUs with bf16 support (AVX512_BF16 or AMX), OpenVINO's CPU plugin infers in bf16 by
default. Our `OpenVINOInferencer` asks for f32 (INFERENCE_PRECISION_HINT); Model API does not, so a Model API
user who wants our f32 maps must pass the hint in the adapter's plugin configuration (see `_model_api`):

    from model_api.adapters import OpenvinoAdapter, create_core, get_user_config
    config = {**get_user_config("CPU", "1", None), "INFERENCE_PRECISION_HINT": "f32"}
    model = Model.create_model(OpenvinoAdapter(create_core(), "model.xml", device="CPU", plugin_config=config))

(`Model.create_model(path, ...)` has no way to pass it: its `configuration` is the model wrapper's settings.)
With it, maps and scores agree with ours to rounding on any CPU. With Model API's defaults on a bf16 CPU, labels
agree and scores / maps stay within BF16_SCORE_TOL / BF16_MAP_TOL (measured below); on other CPUs the defaults
are f32 and agree to rounding as well.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distributed_anomaly import metrics, predict, torch_runner
from distributed_anomaly.data.images import read_image, to_tensor
from distributed_anomaly.data.mvtec import load_dataset, records_of_split
from distributed_anomaly.errors import RunDirError, UserError
from distributed_anomaly.export import export_run
from distributed_anomaly.inference import OpenVINOInferencer
from distributed_anomaly.irformat import INPUT_NAME, OUTPUT_NAME

# Every test that uses the shared runs or exports is `slow` (conftest.py marks the users of `exports`); the CLI
# parser test is not. The first test to ask for the runs trains them and exports: a longer time limit.
pytestmark = pytest.mark.timeout(600)

SIZES = {"padim": 128, "stfpm": 64}  # the shared runs' image sizes (conftest.py)
# Documented tolerances (export.py docstring), as shares of the range of the torch maps on the demo test split:
# MAP_TOL bounds every pixel, SCORE_TOL every image score (the map's maximum).
# int8 per pixel, measured on the shared runs (AVX512 CPU, OpenVINO 2026.4, NNCF 3.4): max 0.125 (PADIM) /
# 0.158 (STFPM), mean 0.017 / 0.024; bounded by 0.25 every pixel and 0.04 on average.
MAP_TOL = {"fp32": 1e-3, "fp16": 2e-2, "int8": 0.25}
INT8_MEAN_MAP_TOL = 0.04
SCORE_TOL = {"fp32": 1e-3, "fp16": 1e-2, "int8": 0.15}
AUROC_TOL = {"fp32": 1e-3, "fp16": 1e-2, "int8": 1e-2}


def assert_auroc_close(
    ref_scores: np.ndarray, got_scores: np.ndarray, labels: np.ndarray, tol: float, score_tol: float
) -> None:
    """|AUROC - torch AUROC| <= tol, plus the share of (anomalous, normal) pairs whose torch scores are so close
    (within 2 * score_tol) that the documented score error may legitimately swap them. For a model that
    separates the classes by more than that (PADIM here) this is exactly `tol`; one swap out of the demo's
    6 x 12 pairs is already 0.014, so a weak model (STFPM after one epoch) gets only its near-ties excused."""
    pos, neg = ref_scores[labels], ref_scores[~labels]
    near = np.abs(pos[:, None] - neg[None, :]) <= 2 * score_tol
    allowed = tol + near.mean()
    diff = abs(metrics.auroc(got_scores, labels) - metrics.auroc(ref_scores, labels))
    assert diff <= allowed + 1e-12, f"AUROC moved by {diff:.4f} > {allowed:.4f}"


@pytest.fixture(scope="module")
def runs(exports) -> dict[str, Path]:
    for model, run in exports.runs.items():
        assert json.loads((run / "config.json").read_text())["model"]["image_size"] == SIZES[model]
    return exports.runs


@pytest.fixture(scope="module")
def test_split(demo_category: Path):
    records = records_of_split(load_dataset(demo_category), "test")
    images = [read_image(r.path) for r in records]
    return images, np.array([r.label for r in records], dtype=bool)


@pytest.fixture(scope="module")
def torch_maps(runs, test_split) -> dict[str, np.ndarray]:
    images, _ = test_split
    return {m: torch_runner.TorchRunner.from_run(runs[m]).raw_maps(to_tensor(images, SIZES[m])) for m in runs}


def _image_auroc(maps: np.ndarray, labels: np.ndarray) -> float:
    return metrics.auroc(maps.reshape(len(maps), -1).max(1), labels)


@pytest.mark.parametrize("model", ["padim", "stfpm"])
def test_fp32_scores_like_torch(model, runs, exports, test_split, torch_maps) -> None:
    images, labels = test_split
    size = SIZES[model]
    inf = OpenVINOInferencer(exports(model, "fp32"), num_threads=2)
    ref = torch_maps[model]
    got = inf.anomaly_maps(to_tensor(images, size))
    assert got.shape == ref.shape == (len(images), size, size) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= MAP_TOL["fp32"] * (ref.max() - ref.min())
    assert abs(_image_auroc(got, labels) - _image_auroc(ref, labels)) <= AUROC_TOL["fp32"]  # no excuses
    # Whole predictions (in the images' own 128 px coordinates) through the shared post-processing.
    ours = inf.predict(images)
    theirs = torch_runner.predict_arrays(*_torch_model(runs[model]), images, size)
    assert len(ours) == len(theirs) == len(images)
    for a, b in zip(ours, theirs):
        assert a.label == b.label
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.boxes[:, :4], b.boxes[:, :4])
        np.testing.assert_allclose(a.boxes[:, 4], b.boxes[:, 4], atol=1e-3)
        assert a.score == pytest.approx(b.score, abs=1e-3)


def _torch_model(run: Path):
    from distributed_anomaly import rundir

    _, model, post = rundir.load_model(run)
    return model, post


@pytest.mark.parametrize(
    "model,precision", [("padim", "fp16"), ("stfpm", "fp16"), ("padim", "int8"), ("stfpm", "int8")]
)
def test_reduced_precision_within_tolerance(model, precision, exports, test_split, torch_maps) -> None:
    images, labels = test_split
    inf = OpenVINOInferencer(exports(model, precision))
    assert inf.metadata["precision"] == precision
    ref = torch_maps[model]
    got = inf.anomaly_maps(to_tensor(images, SIZES[model]))
    scale = ref.max() - ref.min()
    err = np.abs(got - ref) / scale
    print(f"{model} {precision} vs torch, share of the map range: max {err.max():.4f}, mean {err.mean():.4f}")
    assert err.max() <= MAP_TOL[precision]  # every pixel
    if precision == "int8":
        assert err.mean() <= INT8_MEAN_MAP_TOL
    ref_scores, got_scores = ref.reshape(len(ref), -1).max(1), got.reshape(len(got), -1).max(1)
    assert np.abs(got_scores - ref_scores).max() <= SCORE_TOL[precision] * scale
    assert_auroc_close(ref_scores, got_scores, labels, AUROC_TOL[precision], SCORE_TOL[precision] * scale)
    if model == "padim":  # separable: the tolerance above is the plain one, and labels agree
        assert metrics.auroc(got_scores, labels) == pytest.approx(metrics.auroc(ref_scores, labels), abs=0.01)
        torch_post = torch_runner.TorchRunner.from_run(exports.runs[model]).postprocessor
        assert [p.label for p in inf.postprocessor.predict_batch(got)] == [
            p.label for p in torch_post.predict_batch(ref)
        ]
    if precision == "int8":  # thresholds refitted on the quantized model's own maps
        assert inf.postprocessor.extra["recalibrated_for"] == "int8"
        assert inf.postprocessor.threshold_source == inf.metadata["threshold_source"]


def _quantised_ops(ir: Path) -> int:
    """FakeQuantize / FakeConvert operations in the IR as OpenVINO reads it (NNCF's int8 / fp8 quantisation)."""
    import openvino as ov

    ops = ov.Core().read_model(ir / "model.xml").get_ops()
    return sum(op.get_type_name() in ("FakeQuantize", "FakeConvert") for op in ops)


def _runtime_layers(inf: OpenVINOInferencer) -> list[tuple[str, str]]:
    """(layer type, runtime precision) of every layer the CPU plugin compiled (its runtime model)."""
    return [
        (op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
        for op in inf.compiled.get_runtime_model().get_ops()
    ]


@pytest.mark.parametrize("model", ["padim", "stfpm"])
def test_int8_ir_is_quantised_and_the_cpu_runs_it_in_int8(model, exports) -> None:
    """The int8 IR holds NNCF's quantisation nodes (the fp32 IR none). On CPUs with int8 support (all x86 ones
    OpenVINO's CPU plugin runs int8 on report INT8 in OPTIMIZATION_CAPABILITIES) the plugin executes nearly
    all convolutions with u8/i8 inputs (measured: PADIM 39 of 41, the rest f32; STFPM 78 of 78); the anomaly
    head (PADIM's Mahalanobis FullyConnected) stays f32."""
    import openvino as ov

    fp32, int8 = OpenVINOInferencer(exports(model, "fp32")), OpenVINOInferencer(exports(model, "int8"))
    assert _quantised_ops(exports(model, "fp32")) == 0
    quantised = _quantised_ops(exports(model, "int8"))
    assert quantised >= 10, quantised  # measured 46 (PADIM) / 91 (STFPM): one per quantised input and weight
    assert not [p for _, p in _runtime_layers(fp32) if p in ("i8", "u8")]
    layers = _runtime_layers(int8)
    convs = [p for t, p in layers if t == "Convolution"]
    if "INT8" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        int8_convs = sum(p in ("i8", "u8") for p in convs)
        print(f"{model} int8: {quantised} quantisation nodes, {int8_convs} of {len(convs)} convolutions in 8 bit")
        assert int8_convs >= 0.9 * len(convs) > 0, layers
    else:  # no int8 kernels: the quantisation stays in the graph and runs in float
        assert any(t == "FakeQuantize" for t, _ in layers), layers
    assert all(p == "f32" for t, p in layers if t == "FullyConnected")


def test_export_files_metadata_and_io(runs, exports) -> None:
    import openvino as ov

    ir = exports("padim", "fp32")
    assert sorted(p.name for p in ir.iterdir()) == ["metadata.json", "model.bin", "model.xml", "postprocess.json"]
    assert not [p for p in ir.parent.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    meta = json.loads((ir / "metadata.json").read_text())
    post = json.loads((runs["padim"] / "postprocess.json").read_text())
    assert json.loads((ir / "postprocess.json").read_text()) == post
    SIZE = SIZES["padim"]
    assert meta["model"] == "padim" and meta["backbone"] == "mobilenet_v2" and meta["image_size"] == SIZE
    assert meta["image_threshold"] == post["image_threshold"] and meta["source_run"] == str(runs["padim"].resolve())
    assert meta["input"]["name"] == INPUT_NAME and meta["output"]["name"] == OUTPUT_NAME

    model = ov.Core().read_model(ir / "model.xml")
    assert [i.get_any_name() for i in model.inputs] == ["image"]
    assert [o.get_any_name() for o in model.outputs] == ["anomaly_map"]
    assert model.inputs[0].get_partial_shape() == ov.PartialShape([-1, 3, SIZE, SIZE])
    info = lambda k: model.get_rt_info(["model_info", k]).astype(str)
    assert info("model_type") == "AnomalyDetection"
    assert float(info("image_threshold")) == post["image_threshold"]  # full precision, not 6 digits
    assert float(info("normalization_scale")) == pytest.approx(post["norm_max"] - post["norm_min"], rel=1e-12)
    assert [float(v) for v in info("mean_values").split()] == pytest.approx([123.675, 116.28, 103.53])

    # Dynamic batch: 1 and 3 images in one compiled model; fp16 weights are half the size.
    inf = OpenVINOInferencer(ir, num_threads=1)
    assert inf.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    # Not pinned to cores (other processes share the node), unless the caller asks.
    assert inf.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert (
        OpenVINOInferencer(ir, 1, config={"ENABLE_CPU_PINNING": True}).compiled.get_property("ENABLE_CPU_PINNING")
        is True
    )
    for b in (1, 3):
        assert inf.anomaly_maps(np.zeros((b, 3, SIZE, SIZE), np.float32)).shape == (b, SIZE, SIZE)
    fp16 = exports("padim", "fp16")
    assert (fp16 / "model.bin").stat().st_size < 0.6 * (ir / "model.bin").stat().st_size


def test_reexport_replaces_and_refuses_foreign_folder(runs, exports, tmp_path) -> None:
    target = tmp_path / "ir"
    shutil.copytree(exports("stfpm", "fp32"), target)  # an earlier export
    export_run(runs["stfpm"], target, "fp16")
    assert json.loads((target / "metadata.json").read_text())["precision"] == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ir"]  # old copy and temp folder gone
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an earlier export"):
        export_run(runs["stfpm"], foreign)
    with pytest.raises(UserError, match="unknown precision"):
        export_run(runs["stfpm"], tmp_path / "x", "int4")
    with pytest.raises(RunDirError, match="config.json is missing"):
        export_run(tmp_path / "notes", tmp_path / "y")
    assert (foreign / "keep.txt").read_text() == "mine" and not (tmp_path / "x").exists()


def test_predict_command_accepts_ir_folder(runs, exports, demo_category, tmp_path) -> None:
    images = sorted((demo_category / "test").rglob("*.png"))[:4]
    a = predict.predict(runs["padim"], images, tmp_path / "torch")
    b = predict.predict(exports("padim", "fp32"), images, tmp_path / "ov")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["label"] == y["label"] and x["score"] == pytest.approx(y["score"], abs=1e-3)
        assert [bx[:4] for bx in x["boxes"]] == [by[:4] for by in y["boxes"]]
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == sorted(p.name for p in (tmp_path / "torch").iterdir())


F32_HINT = {"INFERENCE_PRECISION_HINT": "f32"}  # what a Model API user passes to get f32 maps on any CPU
# Model API with its defaults against ours on a CPU whose default inference precision is bf16, measured on an
# AVX512_BF16 CPU (OpenVINO 2026.4, the shared runs' 18 test images): normalised image score (0..1) max 0.038
# (PADIM) / 0.026 (STFPM); anomaly map (0..255) max 36 / 9 per pixel, mean 0.47 / 0.38; no label differed. Bounds
# with margin: score 0.08, map 64 per pixel and 1.5 on average; labels agree except where our score is within
# the score bound of the threshold (0.5).
BF16_SCORE_TOL = 0.08
BF16_MAP_TOL = 64
BF16_MEAN_MAP_TOL = 1.5


def _model_api(ir: Path, plugin_config: dict | None):
    """Model API's model for IR: with its defaults (`Model.create_model(path)`), or through an `OpenvinoAdapter`
    whose plugin configuration is Model API's own CPU settings plus `plugin_config`."""
    from model_api.adapters import OpenvinoAdapter, create_core, get_user_config
    from model_api.models import Model

    xml = str(ir / "model.xml")
    if plugin_config is None:
        return Model.create_model(xml, device="CPU")
    config = {**get_user_config("CPU", "1", None), **plugin_config}
    return Model.create_model(OpenvinoAdapter(create_core(), xml, device="CPU", plugin_config=config))


def _model_api_vs_ours(model: str, exports, test_split, plugin_config: dict | None):
    """(Model API's compiled precision hint, [(ours, theirs)] per test image) on S x S images (no resize
    differences); Model API takes BGR, like cv2.imread."""
    images, _ = test_split
    size = SIZES[model]
    small = [np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)) for img in images]
    ir = exports(model, "fp32")
    ours = OpenVINOInferencer(ir).predict(small)
    mapi = _model_api(ir, plugin_config)
    assert type(mapi).__name__ == "AnomalyDetection"
    hint = mapi.inference_adapter.compiled_model.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type
    return hint, [(p, mapi(np.ascontiguousarray(img[..., ::-1]))) for img, p in zip(small, ours)]


def _their_score(r) -> float:
    """Model API reports 1 - normalised score for images it calls normal."""
    return r.pred_score if r.pred_label == "Anomaly" else 1 - r.pred_score


@pytest.mark.parametrize("model", ["padim", "stfpm"])
def test_model_api_with_the_f32_hint_reads_the_ir_like_us(model, exports, test_split) -> None:
    """OpenVINO Model API's AnomalyDetection, given INFERENCE_PRECISION_HINT f32 in its plugin configuration:
    same labels, scores and maps as ours on any CPU (bf16-capable ones included)."""
    import openvino as ov

    hint, pairs = _model_api_vs_ours(model, exports, test_split, F32_HINT)
    assert hint == ov.Type.f32, hint
    for p, r in pairs:
        assert r.pred_label == ("Anomaly" if p.label else "Normal")
        assert _their_score(r) == pytest.approx(p.score, abs=1e-4)
        np.testing.assert_allclose(r.anomaly_map.astype(float), np.round(p.anomaly_map * 255), atol=1)


@pytest.mark.parametrize("model", ["padim", "stfpm"])
def test_model_api_defaults_agree_within_the_bf16_tolerance(model, exports, test_split) -> None:
    """Model API with its own defaults: on a CPU whose OpenVINO default is bf16 (AVX512_BF16 / AMX) it infers in
    bf16; labels agree and scores / maps stay within the measured BF16 tolerances. Elsewhere the default is f32
    and the results agree to rounding, as with the hint."""
    import openvino as ov

    hint, pairs = _model_api_vs_ours(model, exports, test_split, None)
    assert hint in (ov.Type.f32, ov.Type.bf16), hint  # the CPU plugin's defaults on x86 (f16 only if asked)
    if hint == ov.Type.bf16:
        score_tol, map_tol, mean_map_tol = BF16_SCORE_TOL, BF16_MAP_TOL, BF16_MEAN_MAP_TOL
    else:  # f32 by default: as with the hint
        score_tol, map_tol, mean_map_tol = 1e-4, 1, 1
    score_err = np.array([abs(_their_score(r) - p.score) for p, r in pairs])
    map_err = np.stack([np.abs(r.anomaly_map.astype(float) - np.round(p.anomaly_map * 255)) for p, r in pairs])
    flips = [i for i, (p, r) in enumerate(pairs) if r.pred_label != ("Anomaly" if p.label else "Normal")]
    print(
        f"Model API defaults ({hint}) vs ours, {model}: score max {score_err.max():.4g}, map max "
        f"{map_err.max():g} mean {map_err.mean():.3g} (0..255), labels differ on {flips}"
    )
    assert score_err.max() <= score_tol
    assert map_err.max() <= map_tol and map_err.mean() <= mean_map_tol
    assert all(abs(pairs[i][0].score - 0.5) <= score_tol for i in flips), flips  # only near-ties may differ


@pytest.mark.parametrize("broken", ["model.bin", "metadata.json", "postprocess.json"])
def test_incomplete_ir_folder_is_a_clear_error(exports, tmp_path, broken) -> None:
    ir = tmp_path / "ir"
    shutil.copytree(exports("stfpm", "fp32"), ir)
    (ir / broken).unlink()
    with pytest.raises(RunDirError, match=f"missing {broken}"):
        OpenVINOInferencer(ir)
    with pytest.raises(RunDirError, match=f"missing {broken}"):
        predict.predict(ir, [__file__], tmp_path / "out")


def test_model_bin_is_checked_against_the_sha256_in_metadata(exports, tmp_path) -> None:
    """metadata.json records model.bin's SHA-256; a truncated or swapped model.bin is a clear error on load,
    and an export without the hash (format 1) is asked to be re-exported."""
    ir = tmp_path / "ir"
    shutil.copytree(exports("stfpm", "fp32"), ir)
    meta = json.loads((ir / "metadata.json").read_text())
    assert meta["model_bin_sha256"] == hashlib.sha256((ir / "model.bin").read_bytes()).hexdigest()
    assert meta["format_version"] == 2
    data = (ir / "model.bin").read_bytes()
    (ir / "model.bin").write_bytes(data[: len(data) // 2])  # a truncated copy
    with pytest.raises(RunDirError, match="model.bin is not the model its metadata describes"):
        OpenVINOInferencer(ir)
    shutil.copy(exports("padim", "fp32") / "model.bin", ir / "model.bin")  # another export's weights
    with pytest.raises(RunDirError, match="SHA-256"):
        predict.predict(ir, [__file__], tmp_path / "out")
    shutil.copy(exports("stfpm", "fp32") / "model.bin", ir / "model.bin")
    assert OpenVINOInferencer(ir).bin_sha256 == meta["model_bin_sha256"]
    del meta["model_bin_sha256"]
    (ir / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(RunDirError, match="re-run `export`"):
        OpenVINOInferencer(ir)


def test_foreign_metadata_and_bad_xml_are_clear_errors(exports, tmp_path) -> None:
    ir = tmp_path / "ir"
    shutil.copytree(exports("stfpm", "fp32"), ir)
    (ir / "metadata.json").write_text('{"model": "padim"}')
    with pytest.raises(RunDirError, match="not metadata written by `export`"):
        OpenVINOInferencer(ir)
    (ir / "metadata.json").write_text("{not json")
    with pytest.raises(RunDirError, match="cannot read"):
        OpenVINOInferencer(ir)
    shutil.copy(exports("stfpm", "fp32") / "metadata.json", ir / "metadata.json")
    (ir / "model.xml").write_text("<net>")
    with pytest.raises(RunDirError, match="OpenVINO cannot read"):
        OpenVINOInferencer(ir)
    with pytest.raises(RunDirError, match="not a folder"):
        OpenVINOInferencer(tmp_path / "nope")


def test_export_cli_parser(monkeypatch, capsys) -> None:
    from distributed_anomaly import export

    calls = []
    monkeypatch.setattr(export, "export_run", lambda *a, **k: calls.append((a, k)) or Path(a[1]))
    from distributed_anomaly.cli import build_parser

    parser = build_parser()
    a = parser.parse_args(
        ["export", "--run", "runs/r", "--out", "ir/r", "--precision", "int8", "--calibration-images", "50"]
    )
    assert a.func(a) == 0
    from distributed_anomaly.data.layout import DataLayout

    assert calls == [(("runs/r", "ir/r", "int8", 50), {"task": "segmentation", "data": None, "layout": DataLayout()})]
    assert "exported runs/r (int8) to ir/r" in capsys.readouterr().out
    assert parser.parse_args(["export", "--run", "r", "--out", "o"]).precision == "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--run", "r", "--out", "o", "--precision", "int4"])
