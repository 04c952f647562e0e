"""The folder and VisA layouts end to end on real images, and a non-square (H x W) model through training,
export, prediction and Serve.

The session's demo washer category (conftest.demo_category) is rebuilt in the folder and VisA layouts, so
nothing is downloaded; the models are tiny PADIMs (resnet18, seeded random weights, layer1+2, 16 features).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distributed_anomaly.cli import main
from distributed_anomaly.config import ModelConfig, TrainConfig
from distributed_anomaly.data.dataset import load_dataset
from distributed_anomaly.data.layout import DataLayout
from distributed_anomaly.data.mvtec import records_of_split

pytestmark = pytest.mark.slow  # trains real (tiny) models


def demo_as_folder(category: Path, root: Path) -> Path:
    """The demo category as a factory folder: good/ (train and test normals), <defect>/, masks/<defect>/."""
    for split in ("train", "test"):
        for p in sorted((category / split / "good").glob("*.png")):
            _copy(p, root / "good" / f"{split}_{p.name}")
    for d in sorted(x for x in (category / "test").iterdir() if x.is_dir() and x.name != "good"):
        for p in sorted(d.glob("*.png")):
            _copy(p, root / d.name / p.name)
            _copy(
                category / "ground_truth" / d.name / f"{p.stem}_mask.png",
                root / "masks" / d.name / f"{p.stem}_mask.png",
            )
    return root


def demo_as_visa(category: Path, visa_root: Path) -> Path:
    """The demo category as VisA publishes an object: Data/Images, Data/Masks and split_csv/1cls.csv."""
    obj, rows = category.name, []
    for split in ("train", "test"):
        for p in sorted((category / split / "good").glob("*.png")):
            rel = f"{obj}/Data/Images/Normal/{split}_{p.name}"
            rows.append({"object": obj, "split": split, "label": "normal", "image": _copy(p, visa_root / rel, rel)})
    for d in sorted(x for x in (category / "test").iterdir() if x.is_dir() and x.name != "good"):
        for p in sorted(d.glob("*.png")):
            rel, mrel = f"{obj}/Data/Images/Anomaly/{d.name}_{p.name}", f"{obj}/Data/Masks/Anomaly/{d.name}_{p.name}"
            _copy(category / "ground_truth" / d.name / f"{p.stem}_mask.png", visa_root / mrel)
            rows.append(
                {
                    "object": obj,
                    "split": "test",
                    "label": "anomaly",
                    "image": _copy(p, visa_root / rel, rel),
                    "mask": mrel,
                }
            )
    (visa_root / "split_csv").mkdir()
    with open(visa_root / "split_csv" / "1cls.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return visa_root / obj


def _copy(src: Path, dest: Path, ret: str | None = None) -> str:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return ret or str(dest)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory, demo_category: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {
        "folder": demo_as_folder(demo_category, root / "line7"),
        "visa": demo_as_visa(demo_category, root / "VisA"),
    }


TINY_PADIM = ["--model", "padim", "--no-pretrained", "--layers", "layer1,layer2", "--n-features", "16", "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["folder", "visa"])
def test_train_and_evaluate_detect_and_keep_the_layout(layouts, fmt: str, tmp_path: Path, capsys) -> None:
    """`train` detects the layout, records it, and `evaluate` reads the data the same way (same metrics)."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(layouts[fmt]), "--out", str(run), "--image-size", "64", *TINY_PADIM]) == 0
    info = json.loads((run / "config.json").read_text())["info"]
    assert info["data_layout"]["format"] == fmt
    metrics = json.loads((run / "metrics.json").read_text())
    # 12 anomalies; 6 normals: VisA's test rows (the demo's test/good), the folder's 20 % holdout of 30
    assert metrics["num_test_images"] == 18 and metrics["num_anomalous_images"] == 12
    assert metrics["image_auroc"] is not None and metrics["pixel_auroc"] is not None  # masks were read
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    # `train` scores with the fit's own Cholesky factor, `evaluate` with the one a loaded model derives from the
    # stored Sigma^-1 (padim.whitening_factor): maps agree to ~1e-7 relative, which can reorder near-equal pixels.
    assert again["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    assert again["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"], abs=1e-6)
    assert main(["evaluate", "--run", str(run), "--format", "mvtec"]) == 2  # refused without --data, not ignored
    assert "give --data too" in capsys.readouterr().err


# --- a non-square model through training, export, prediction and Serve ---

WIDE = (64, 128)  # height, width


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory, layouts) -> dict:
    """PADIM at 64x128 trained on the folder layout (given explicitly), exported to OpenVINO fp32."""
    from distributed_anomaly.export import export_run
    from distributed_anomaly.training import train

    root = tmp_path_factory.mktemp("wide")
    run = root / "run"
    cfg = ModelConfig("padim", "resnet18", ("layer1", "layer2"), 16, image_size=WIDE)
    train(layouts["folder"], run, cfg, TrainConfig(pretrained=False), progress=False, layout=DataLayout("folder"))
    test = records_of_split(load_dataset(layouts["folder"], DataLayout("folder")), "test")
    return {"run": run, "ir": export_run(run, root / "ir"), "test": test}


def _wide_image(test) -> np.ndarray:
    """A 128 x 256 image (two demo images side by side), as a wide camera gives."""
    from distributed_anomaly.data.images import read_image

    anomalous = next(r for r in test if r.label)
    return np.concatenate([read_image(test[0].path), read_image(anomalous.path)], axis=1)


@pytest.mark.slow
def test_non_square_model_trains_exports_and_predicts(wide) -> None:
    import openvino as ov

    from distributed_anomaly.data.images import read_image, to_tensor
    from distributed_anomaly.inference import OpenVINOInferencer
    from distributed_anomaly.torch_runner import TorchRunner
    from distributed_anomaly.training import evaluate_run

    assert json.loads((wide["run"] / "config.json").read_text())["model"]["image_size"] == list(WIDE)
    meta = json.loads((wide["ir"] / "metadata.json").read_text())
    assert meta["image_size"] == list(WIDE) and meta["input"]["shape"] == [-1, 3, *WIDE]
    assert meta["output"]["shape"] == [-1, 1, *WIDE]
    xml = ov.Core().read_model(wide["ir"] / "model.xml")
    assert xml.get_rt_info(["model_info", "image_shape"]).astype(str) == "64 128"  # Model API: height width
    batch = to_tensor([read_image(r.path) for r in wide["test"][:4]], WIDE)
    torch_maps = TorchRunner.from_run(wide["run"]).raw_maps(batch)
    inf = OpenVINOInferencer(wide["ir"], num_threads=1)
    ov_maps = inf.anomaly_maps(batch)
    assert torch_maps.shape == ov_maps.shape == (4, *WIDE)
    assert np.abs(torch_maps - ov_maps).max() <= 1e-3 * np.ptp(torch_maps)
    pred = inf.predict([_wide_image(wide["test"])])[0]
    assert pred.anomaly_map.shape == (128, 256) and pred.mask.shape == (128, 256)  # the image's own size
    metrics = evaluate_run(wide["run"], progress=False, report=True)
    assert metrics["num_test_images"] == len(wide["test"])
    assert "64x128 px" in Path(metrics["report"]).read_text()


@pytest.mark.ray
@pytest.mark.slow
def test_serve_answers_a_non_square_model_in_the_image_size(serve_http, wide) -> None:
    """Over HTTP, a wide image scored by the 64x128 model: the answer is the inferencer's, mask in 128 x 256."""
    import io

    import httpx
    from serving import deployed

    from distributed_anomaly.inference import OpenVINOInferencer
    from distributed_anomaly.runner import predict_images
    from distributed_anomaly.serve import registry, requests, responses, settings

    buf = io.BytesIO()
    Image.fromarray(_wide_image(wide["test"])).save(buf, format="PNG")
    entry = registry.discover_models([f"wide={wide['ir']}"])["wide"]
    img, shape = requests.decode_for_model(buf.getvalue(), None, WIDE)  # as the ingress decodes and resizes
    pred = predict_images(OpenVINOInferencer(wide["ir"], num_threads=1), [img], [shape])[0]
    expected = responses.prediction_response(pred, "segmentation", entry, shape)
    with deployed(settings.AppConfig(models=[f"wide={wide['ir']}"], replicas=1, cpus_per_replica=1), serve_http) as srv:
        r = httpx.post(f"{srv.url}/predict", content=buf.getvalue(), timeout=120)
        assert r.status_code == 200, r.text
        got = r.json()
        meta = httpx.get(f"{srv.url}/metadata", timeout=60).json()
    assert got == expected and (got["width"], got["height"]) == (256, 128)
    assert responses.decode_mask(got["mask"]).shape == (128, 256)
    assert meta["models"][0]["image_size"] == list(WIDE)
