"""Data layouts other than MVTec (`folder`, `visa`), auto-detection, and non-square (H x W) image sizes.

Unit tests build tiny PNG datasets; the end-to-end tests rebuild the session's demo washer category
(conftest.demo_category) in the folder and VisA layouts, so the images are real and nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from distributed_anomaly.cli import main
from distributed_anomaly.config import ModelConfig, from_dict, to_dict
from distributed_anomaly.data.dataset import detect_format, load_dataset, resolve_layout
from distributed_anomaly.data.layout import DataLayout
from distributed_anomaly.data.mvtec import records_of_split
from distributed_anomaly.data.sizes import as_hw, parse_size, size_text
from distributed_anomaly.errors import DatasetLayoutError, UserError
from distributed_anomaly.models.padim import Padim
from distributed_anomaly.models.stfpm import Stfpm
from distributed_anomaly.tuning.request import TuneRequest


def _png(path: Path, size=(16, 12), mode="RGB", value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _folder(root: Path, n_good=10, defects=("bad", "scratch"), masks: str | None = "per-defect") -> Path:
    """good/ + one folder per defect; masks per defect folder (x_mask.png), flat (x.png) or none."""
    for i in range(n_good):
        _png(root / "good" / f"{i:03d}.png")
    for d in defects:
        for i in range(2):
            _png(root / d / f"{d}{i}.png")
            if masks == "per-defect":
                _png(root / "masks" / d / f"{d}{i}_mask.png", mode="L", value=255)
            elif masks == "flat":
                _png(root / "masks" / f"{d}{i}.png", mode="L", value=255)
    return root


def _visa(root: Path, objects=("candle", "pcb1"), rows_extra: list[dict] | None = None) -> Path:
    """VISA_ROOT with split_csv/1cls.csv, per object 4 train normals, 1 test normal, 2 test anomalies."""
    rows = []
    for obj in objects:
        for i in range(5):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _mk(root / rel)
            Image.new("RGB", (16, 12), 100).save(root / rel, format="JPEG")
            rows.append({"object": obj, "split": "train" if i < 4 else "test", "label": "normal", "image": rel})
        for i in range(2):
            rel, mrel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _mk(root / rel)
            Image.new("RGB", (16, 12), 200).save(root / rel, format="JPEG")
            _png(root / mrel, mode="L", value=1)  # VisA masks: any non-zero pixel is anomalous
            rows.append({"object": obj, "split": "test", "label": "anomaly", "image": rel, "mask": mrel})
    rows += rows_extra or []
    _write_csv(root / "split_csv" / "1cls.csv", rows)
    return root


def _mk(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)


def _write_csv(path: Path, rows: list[dict], columns=("object", "split", "label", "image", "mask")) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# --- folder ---


def test_folder_manifest_split_and_masks(tmp_path: Path) -> None:
    root = _folder(tmp_path / "line3")
    recs = load_dataset(root, DataLayout("folder"))
    train, test = records_of_split(recs, "train"), records_of_split(recs, "test")
    assert len(train) == 8 and all(r.label == 0 and r.defect == "good" for r in train)
    normals = [r for r in test if r.label == 0]
    assert len(normals) == 2 and {r.defect for r in test if r.label} == {"bad", "scratch"}
    assert not {r.path for r in normals} & {r.path for r in train}  # disjoint
    bad0 = next(r for r in test if r.path.endswith("bad/bad0.png"))
    assert bad0.mask_path.endswith("masks/bad/bad0_mask.png") and bad0.category == "line3"
    assert load_dataset(root, DataLayout("folder")) == recs  # seeded: the same split every time
    other = load_dataset(root, DataLayout("folder", holdout=0.5))
    assert len(records_of_split(other, "train")) == 5


def test_folder_explicit_options_and_flat_masks(tmp_path: Path) -> None:
    root = _folder(tmp_path / "cam", defects=("dent", "scratch", "unused"), masks=None)
    shutil.move(root / "good", root / "ok")
    for d in ("dent", "scratch"):
        for i in range(2):
            _png(root / "gt" / f"{d}{i}.png", mode="L", value=255)
    layout = DataLayout("folder", "ok", ("dent", "scratch"), "gt", 0.3)
    recs = load_dataset(root, layout)
    assert {r.defect for r in recs} == {"good", "dent", "scratch"}  # unused/ is not read
    assert next(r for r in recs if r.path.endswith("dent1.png")).mask_path.endswith("gt/dent1.png")
    assert len([r for r in recs if r.split == "test" and r.label == 0]) == 3
    # no masks at all: abnormal images without masks (pixel metrics undefined downstream)
    plain = _folder(tmp_path / "plain", masks=None)
    assert all(r.mask_path is None for r in load_dataset(plain, DataLayout("folder")))


@pytest.mark.parametrize(
    "breakage, layout, message",
    [
        (lambda r: (r / "masks" / "bad" / "bad1_mask.png").unlink(), {}, r"bad1.png has no mask: expected .*bad1.png"),
        (lambda r: _png(r / "masks" / "bad" / "zzz_mask.png", mode="L"), {}, "zzz_mask.png has no abnormal image"),
        (lambda r: _png(r / "masks" / "bad" / "bad0.png", mode="L"), {}, "bad0.png has 2 masks"),
        (lambda r: _png(r / "masks" / "dent" / "x.png", mode="L"), {}, "masks folder .*dent has no matching"),
        (lambda r: [p.unlink() for p in (r / "scratch").iterdir()], {}, "scratch holds no images"),
        (lambda r: None, {"normal_dir": "nope"}, "missing folder .*nope"),
        (lambda r: None, {"mask_dir": "gt"}, "mask folder .*gt .*does not exist"),
        (lambda r: None, {"holdout": 0.95}, "too few to hold out 95%"),
        (lambda r: None, {"holdout": 0.0}, "--holdout 0 leaves no normal test images"),
        (lambda r: [shutil.rmtree(r / d) for d in ("bad", "scratch", "masks")], {}, "no abnormal image folder"),
    ],
)
def test_folder_errors_name_the_path(tmp_path: Path, breakage, layout: dict, message: str) -> None:
    root = _folder(tmp_path / "cat")
    breakage(root)
    with pytest.raises(DatasetLayoutError, match=message):
        load_dataset(root, DataLayout("folder", **layout))


def test_folder_flat_masks_shared_by_two_defects_are_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "cat", defects=("a", "b"), masks=None)
    shutil.copy(root / "a" / "a0.png", root / "b" / "a0.png")  # a/a0.png and b/a0.png share one stem
    for name in ("a0", "a1", "b0", "b1"):
        _png(root / "masks" / f"{name}.png", mode="L")
    with pytest.raises(DatasetLayoutError, match="matches both .*a0.png and .*a0.png: put each defect type"):
        load_dataset(root, DataLayout("folder"))


# --- VisA ---


def test_visa_object_and_root(tmp_path: Path) -> None:
    root = _visa(tmp_path / "VisA")
    recs = load_dataset(root / "candle", DataLayout("visa"))
    assert {r.category for r in recs} == {"candle"} and len(records_of_split(recs, "train")) == 4
    anomalies = [r for r in recs if r.label == 1]
    assert len(anomalies) == 2 and all(r.defect == "anomaly" and r.split == "test" for r in anomalies)
    assert anomalies[0].mask_path == str(root / "candle/Data/Masks/Anomaly/000.png")
    assert all(r.mask_path is None for r in recs if r.label == 0)
    assert {r.category for r in load_dataset(root, DataLayout("visa"))} == {"candle", "pcb1"}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"object": "candle", "split": "val", "label": "normal", "image": "candle/x.JPG"}, "line 16: split 'val'"),
        ({"object": "candle", "split": "test", "label": "ok", "image": "candle/x.JPG"}, "line 16: label 'ok'"),
        (
            {"object": "candle", "split": "test", "label": "normal", "image": "candle/none.JPG"},
            "none.JPG does not exist",
        ),
        (
            {"object": "candle", "split": "test", "label": "anomaly", "image": "candle/Data/Images/Anomaly/000.JPG"},
            "has no mask",
        ),
        (
            {"object": "candle", "split": "train", "label": "anomaly", "image": "candle/Data/Images/Anomaly/000.JPG"},
            "anomalous training image",
        ),
    ],
)
def test_visa_row_errors_name_the_line(tmp_path: Path, extra: dict, message: str) -> None:
    root = _visa(tmp_path / "VisA", objects=("candle", "pcb1"), rows_extra=[extra])
    with pytest.raises(DatasetLayoutError, match=message):
        load_dataset(root / "candle", DataLayout("visa"))


def test_visa_csv_and_object_errors(tmp_path: Path) -> None:
    root = _visa(tmp_path / "VisA")
    (root / "capsules").mkdir()
    with pytest.raises(DatasetLayoutError, match="no rows for object 'capsules'.*objects there: candle, pcb1"):
        load_dataset(root / "capsules", DataLayout("visa"))
    _write_csv(root / "split_csv" / "1cls.csv", [], columns=("object", "split", "image"))
    with pytest.raises(DatasetLayoutError, match="lacks the column.*label, mask"):
        load_dataset(root / "candle", DataLayout("visa"))
    with pytest.raises(DatasetLayoutError, match="not a VisA folder"):
        load_dataset(tmp_path, DataLayout("visa"))


# --- auto-detection ---


def test_auto_detection_says_what_it_picked(tmp_path: Path, caplog) -> None:
    mv = tmp_path / "mv" / "bottle"
    for p in ("train/good/0.png", "train/good/1.png", "test/good/0.png"):
        _png(mv / p)
    folder, visa = _folder(tmp_path / "folder"), _visa(tmp_path / "VisA")
    for root, fmt in ((mv, "mvtec"), (mv.parent, "mvtec"), (folder, "folder"), (visa / "pcb1", "visa"), (visa, "visa")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="distributed_anomaly"):
            assert resolve_layout(root).format == fmt
        assert [r.getMessage() for r in caplog.records] == [
            f"data: {fmt} layout detected in {root} (--format to choose)"
        ]
    assert resolve_layout(folder, DataLayout("folder")).format == "folder"  # given: nothing to detect
    (tmp_path / "random" / "stuff").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="cannot tell the layout of .*random.*MVTec.*VisA.*--format"):
        detect_format(tmp_path / "random")
    with pytest.raises(UserError, match="--abnormal-dir, --holdout apply to --format folder, not mvtec"):
        resolve_layout(mv, DataLayout(abnormal_dirs=("x",), holdout=0.5))


def test_layouts_round_trip_through_json() -> None:
    layout = DataLayout("folder", "ok", ("a", "b"), "gt", 0.3)
    assert DataLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    assert DataLayout.from_dict(None) == DataLayout()  # runs and searches written before --format
    with pytest.raises(UserError, match="unknown data format 'coco'"):
        DataLayout("coco")
    req = TuneRequest("d", "s.yaml", "x", 2, data_layout=layout)
    assert TuneRequest.from_dict(json.loads(json.dumps(req.to_dict()))) == req
    old = {k: v for k, v in req.to_dict().items() if k != "data_layout"}
    assert TuneRequest.from_dict(old).data_layout == DataLayout()


# --- non-square sizes ---


def test_image_size_forms_and_old_configs() -> None:
    assert parse_size("256") == 256 and parse_size("256x512") == (256, 512) and parse_size("96X96") == 96
    assert as_hw(64) == (64, 64) and as_hw([64, 128]) == (64, 128) and size_text((64, 128)) == "64x128"
    for bad in ("256x", "x256", "abc", "16x512", "256x4096"):
        with pytest.raises(UserError):
            parse_size(bad)
    cfg = ModelConfig("padim", "resnet18", image_size=(64, 128))
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    assert to_dict(ModelConfig(image_size=(128, 128)))["image_size"] == 128  # square stays an int on disk
    old = {"model": "padim", "backbone": "resnet18", "layers": [], "n_features": None, "image_size": 96, "seed": 0}
    assert from_dict(ModelConfig, old).image_size == 96
    a = __import__("distributed_anomaly.cli", fromlist=["build_parser"]).build_parser()
    assert a.parse_args(["train", "--image-size", "64x128"]).image_size == (64, 128)


def test_cli_rejects_a_bad_image_size(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--image-size", "64by128"])
    assert "argument --image-size: expected S (square) or HxW, e.g. 256 or 256x512" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--image-size", "64x4096"])
    assert "between 32 and 2048 on each side, got 64x4096" in capsys.readouterr().err


def test_non_square_models_give_h_by_w_maps() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 96)
    padim = Padim("resnet18", ("layer1", "layer2"), 16, (64, 96), pretrained=False)
    assert padim.grid == (16, 24) and padim.mean.shape == (16 * 24, 16)
    from distributed_anomaly.stats import GaussianStats

    padim.set_gaussian(GaussianStats.from_batch(padim.embed(x)))
    assert padim(x).shape == (3, 1, 64, 96)
    assert Stfpm("resnet18", ("layer1", "layer2"), (64, 96), pretrained=False)(x).shape == (3, 1, 64, 96)
    with pytest.raises(UserError, match="image size 64x100: each side must be a multiple of 8"):
        Padim("resnet18", ("layer1", "layer2"), 16, (64, 100), pretrained=False)


def test_a_search_reads_and_compares_its_layout(tmp_path: Path) -> None:
    """tune's data split uses the request's layout; a pipeline rerun compares layouts like for like."""
    from distributed_anomaly.pipeline import _same_search
    from distributed_anomaly.tuning.split import prepare_data

    root = _folder(tmp_path / "line", n_good=20)
    req = TuneRequest(str(root), "s.yaml", "x", 2, objective="val_auroc", data_layout=DataLayout("folder"))
    data = prepare_data(req)
    assert len(data.test) == 4 + 4 and {r.defect for r in data.search_part + data.heldout} >= {"bad", "scratch"}
    stored = {**req.to_dict(), "data_layout": DataLayout("folder").to_dict()}
    assert _same_search(stored, TuneRequest(str(root), "s.yaml", "x", 2, objective="val_auroc").to_dict()) == []
    other = TuneRequest(str(root), "s.yaml", "x", 2, objective="val_auroc", data_layout=DataLayout(holdout=0.3))
    assert _same_search(stored, other.to_dict()) == ["data layout"]


def test_a_search_space_may_choose_non_square_sizes() -> None:
    from distributed_anomaly.tuning.space import SpaceError, preview, trial_configs
    from distributed_anomaly.tuning.space_file import parse_space

    space = parse_space("fixed: {model: padim, backbone: resnet18}\ndimensions: {image_size: {choice: [64, 64x128]}}")
    assert space.dimensions[0].choices == (64, "64x128")
    sizes = {trial_configs(c, pretrained=False)[0].image_size for c in preview(space, 6)}
    assert sizes <= {64, (64, 128)} and (64, 128) in sizes
    assert space.fix(["image_size=64X128"]).dimensions[0].value == "64x128"
    with pytest.raises(SpaceError, match="64x96 is not among the choices"):
        space.fix(["image_size=64x96"])
    ranged = parse_space("fixed: {model: padim}\ndimensions: {image_size: {int: [64, 256]}}")
    with pytest.raises(SpaceError, match="64x128 is outside the range"):
        ranged.fix(["image_size=64x128"])
    with pytest.raises(SpaceError, match="between 32 and 2048"):
        ranged.fix(["image_size=16x128"])
