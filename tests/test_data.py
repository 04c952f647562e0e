"""The MVTec layout checks and image decoding: every bad input gets a message naming the path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distributed_anomaly.data.images import read_image, read_mask, resize_mask, to_tensor
from distributed_anomaly.data.loader import iter_batches, load_masks
from distributed_anomaly.data.mvtec import load_category, load_dataset, records_of_split, split_train_val
from distributed_anomaly.errors import DatasetLayoutError, ImageReadError


def _png(path: Path, size=(16, 12), mode="RGB", value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _category(root: Path, n_train=4, defects=("scratch",)) -> Path:
    for i in range(n_train):
        _png(root / "train" / "good" / f"{i:03d}.png")
    _png(root / "test" / "good" / "000.png")
    for d in defects:
        _png(root / "test" / d / "000.png")
        _png(root / "ground_truth" / d / "000_mask.png", mode="L", value=255)
    return root


def test_manifest_of_a_valid_category(tmp_path: Path) -> None:
    root = _category(tmp_path / "bottle", defects=("crack", "scratch"))
    recs = load_category(root)
    assert [r.split for r in recs].count("train") == 4
    test = records_of_split(recs, "test")
    assert {(r.defect, r.label) for r in test} == {("good", 0), ("crack", 1), ("scratch", 1)}
    crack = next(r for r in test if r.defect == "crack")
    assert crack.mask_path.endswith("ground_truth/crack/000_mask.png") and crack.category == "bottle"
    assert all(r.mask_path is None for r in recs if r.label == 0)


def test_parent_folder_of_categories(tmp_path: Path) -> None:
    _category(tmp_path / "a")
    _category(tmp_path / "b")
    recs = load_dataset(tmp_path)
    assert {r.category for r in recs} == {"a", "b"}


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: __import__("shutil").rmtree(r / "train"), "missing folder .*train/good"),
        (lambda r: [p.unlink() for p in (r / "train" / "good").iterdir()], "train/good holds no images"),
        (lambda r: (r / "ground_truth" / "scratch" / "000_mask.png").unlink(), "test/scratch/000.png has no mask"),
        (lambda r: _png(r / "ground_truth" / "scratch" / "007_mask.png", mode="L"), "007_mask.png has no image"),
        (lambda r: [p.unlink() for p in (r / "test" / "scratch").iterdir()], "test/scratch holds no images"),
        (lambda r: _png(r / "ground_truth" / "dent" / "000_mask.png", mode="L"), "masks folder .*dent has no matching"),
    ],
)
def test_layout_errors_name_the_path(tmp_path: Path, breakage, message: str) -> None:
    root = _category(tmp_path / "cat")
    breakage(root)
    with pytest.raises(DatasetLayoutError, match=message):
        load_dataset(root)


def test_not_a_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="neither an MVTec category"):
        load_dataset(tmp_path / "empty")


def test_corrupt_and_truncated_images_fail_with_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(bad)
    good = _png(tmp_path / "good.png", size=(64, 64))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageReadError, match="trunc.png"):
        read_image(trunc)
    with pytest.raises(ImageReadError, match="<bytes>"):
        read_image(b"")


def test_corrupt_image_deep_in_a_batch_stream_names_the_file(tmp_path: Path) -> None:
    root = _category(tmp_path / "cat", n_train=10)
    (root / "train" / "good" / "007.png").write_bytes(b"\x89PNG garbage")
    recs = records_of_split(load_dataset(root), "train")
    with pytest.raises(ImageReadError, match="007.png"):
        for _ in iter_batches(recs, 32, batch_size=3):
            pass


def test_modes_become_rgb_uint8(tmp_path: Path) -> None:
    gray = read_image(_png(tmp_path / "g.png", mode="L", value=200))
    assert gray.shape == (12, 16, 3) and gray.dtype == np.uint8 and (gray == 200).all()
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "a.png")
    arr = read_image(tmp_path / "a.png")
    assert arr.shape == (4, 4, 3) and tuple(arr[0, 0]) == (10, 20, 30) and tuple(arr[1, 1]) == (0, 0, 0)
    deep = Image.fromarray(np.full((5, 6), 65535, dtype=np.uint16))
    deep.save(tmp_path / "d.png")
    arr16 = read_image(tmp_path / "d.png")
    assert arr16.shape == (5, 6, 3) and (arr16 == 255).all()
    half = Image.fromarray(np.full((5, 6), 32768, dtype=np.uint16))
    half.save(tmp_path / "h.png")
    assert int(read_image(tmp_path / "h.png")[0, 0, 0]) == 128


def test_mask_decoding_and_resize(tmp_path: Path) -> None:
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:6] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == bool and mask.sum() == 8
    assert resize_mask(mask, 16).sum() == 32


def test_to_tensor_resizes_and_normalises_mixed_sizes() -> None:
    a = np.full((10, 20, 3), 255, np.uint8)
    b = np.zeros((33, 17, 3), np.uint8)
    t = to_tensor([a, b], 16)
    assert t.shape == (2, 3, 16, 16) and t.dtype == torch.float32
    torch.testing.assert_close(t[0, 0], torch.full((16, 16), (1 - 0.485) / 0.229))
    torch.testing.assert_close(t[1, 2], torch.full((16, 16), -0.406 / 0.225))


def test_mask_size_mismatch_is_reported(tmp_path: Path) -> None:
    root = _category(tmp_path / "cat")
    _png(root / "ground_truth" / "scratch" / "000_mask.png", size=(8, 8), mode="L", value=255)
    test = records_of_split(load_dataset(root), "test")
    with pytest.raises(DatasetLayoutError, match="000_mask.png is 8x8 but its image"):
        load_masks(test, 16)


def test_split_is_seeded_disjoint_and_validated(tmp_path: Path) -> None:
    recs = load_dataset(_category(tmp_path / "cat", n_train=20))
    fit, val = split_train_val(recs, 0.1, seed=1)
    assert len(val) == 2 and len(fit) == 18 and not {r.path for r in fit} & {r.path for r in val}
    assert split_train_val(recs, 0.1, seed=1) == (fit, val)
    assert split_train_val(recs, 0.0, seed=1) == (records_of_split(recs, "train"), [])
    small = load_dataset(_category(tmp_path / "small", n_train=1))
    with pytest.raises(DatasetLayoutError, match="too few"):
        split_train_val(small, 0.1, seed=0)
