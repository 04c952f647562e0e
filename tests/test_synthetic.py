"""The synthetic MVTec-style dataset: layout, exact masks, determinism and argument checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from distributed_anomaly.data import demo
from distributed_anomaly.data.demo import CATEGORIES, DEFECT_TYPES, generate, render_sample

SIZE = 128
SMALL = dict(image_size=SIZE, n_train=3, n_test_good=2, n_per_defect=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _png(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    dirs = generate(root, seed=0, **SMALL)
    assert dirs == [root / c for c in CATEGORIES]
    return root


def test_categories_have_at_least_three_defect_types() -> None:
    assert len(CATEGORIES) >= 2
    for c in CATEGORIES:
        assert len(DEFECT_TYPES[c]) >= 3


@pytest.mark.parametrize("category", CATEGORIES)
def test_layout_is_mvtec(dataset: Path, category: str) -> None:
    cat = dataset / category
    names = lambda folder: sorted(p.name for p in folder.iterdir())
    assert names(cat / "train") == ["good"]
    assert names(cat / "train" / "good") == ["000.png", "001.png", "002.png"]
    assert names(cat / "test") == sorted(["good", *DEFECT_TYPES[category]])
    assert names(cat / "test" / "good") == ["000.png", "001.png"]
    assert names(cat / "ground_truth") == sorted(DEFECT_TYPES[category])  # no masks for good images
    for d in DEFECT_TYPES[category]:
        assert names(cat / "test" / d) == ["000.png", "001.png"]
        assert names(cat / "ground_truth" / d) == ["000_mask.png", "001_mask.png"]
    readme = (cat / "README.txt").read_text()
    assert "CC0" in readme and "skimage" in readme


@pytest.mark.parametrize("category", CATEGORIES)
def test_images_are_rgb_uint8(dataset: Path, category: str) -> None:
    for p in sorted((dataset / category).glob("test/*/*.png")) + sorted((dataset / category).glob("train/good/*.png")):
        im = _png(p)
        assert im.mode == "RGB" and im.size == (SIZE, SIZE)
        arr = np.asarray(im)
        assert arr.dtype == np.uint8 and arr.shape == (SIZE, SIZE, 3)
        assert arr.std() > 5  # textured, not a flat fill


@pytest.mark.parametrize("category", CATEGORIES)
def test_masks_are_binary_non_empty_and_realistically_sized(dataset: Path, category: str) -> None:
    for d in DEFECT_TYPES[category]:
        for img_path in sorted((dataset / category / "test" / d).glob("*.png")):
            mask_img = _png(dataset / category / "ground_truth" / d / f"{img_path.stem}_mask.png")
            assert mask_img.mode == "L" and mask_img.size == _png(img_path).size
            mask = np.asarray(mask_img)
            assert set(np.unique(mask)) == {0, 255}
            frac = (mask > 0).mean()
            assert demo.MIN_DEFECT_FRACTION <= frac <= demo.MAX_DEFECT_FRACTION, (img_path, frac)


@pytest.mark.parametrize("category,defect", [(c, d) for c in CATEGORIES for d in DEFECT_TYPES[c]])
def test_mask_is_exactly_the_changed_pixels(category: str, defect: str) -> None:
    # Same streams with and without the defect: every changed pixel is masked, and nearly
    # every masked pixel changed (a faint alpha can round to the same byte now and then).
    for index in range(3):
        clean, none = demo.render(category, SIZE, 5, f"test/{defect}", index, None)
        bad, mask = demo.render(category, SIZE, 5, f"test/{defect}", index, defect)
        assert none is None and mask is not None and mask.any()
        changed = (clean != bad).any(axis=-1)
        assert not (changed & ~mask).any()
        assert changed[mask].mean() > 0.9


def _object_region(img: np.ndarray) -> np.ndarray:
    """The washer is bright metal on a dark table: a luminance threshold finds it."""
    return img.astype(np.float32).mean(axis=-1) > 72


@pytest.mark.parametrize("defect", DEFECT_TYPES["washer"])
def test_washer_defects_lie_on_the_object(defect: str) -> None:
    for index in range(4):
        clean, _ = demo.render("washer", SIZE, 1, f"test/{defect}", index, None)
        _, mask = demo.render("washer", SIZE, 1, f"test/{defect}", index, defect)
        region = ndimage.binary_dilation(_object_region(clean), iterations=1)
        assert mask.any() and not (mask & ~region).any()


def test_washer_is_aligned_across_images(dataset: Path) -> None:
    regions = [_object_region(np.asarray(_png(p))) for p in sorted((dataset / "washer").glob("train/good/*.png"))]
    union, inter = np.logical_or.reduce(regions), np.logical_and.reduce(regions)
    assert inter.sum() / union.sum() > 0.85  # nearly the same place every time
    # Defect masks in the written files overlap the object region.
    for mask_path in sorted((dataset / "washer" / "ground_truth").glob("*/*.png")):
        mask = np.asarray(_png(mask_path)) > 0
        assert (mask & ndimage.binary_dilation(union, iterations=2)).sum() >= 0.95 * mask.sum()


def test_same_seed_gives_identical_bytes(dataset: Path, tmp_path: Path) -> None:
    generate(tmp_path, seed=0, **SMALL)
    assert _files(tmp_path) == _files(dataset)


def test_different_seed_gives_different_images(dataset: Path, tmp_path: Path) -> None:
    generate(tmp_path, seed=1, **SMALL)
    a, b = _files(dataset), _files(tmp_path)
    assert a.keys() == b.keys()
    pngs = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert all(a[k] != b[k] for k in pngs)


def test_normal_images_differ_from_each_other(dataset: Path) -> None:
    for c in CATEGORIES:
        imgs = [np.asarray(_png(p)) for p in sorted((dataset / c).glob("train/good/*.png"))]
        assert not np.array_equal(imgs[0], imgs[1])


def test_images_do_not_depend_on_other_categories_or_counts(dataset: Path, tmp_path: Path) -> None:
    generate(tmp_path, seed=0, categories=["washer"], image_size=SIZE, n_train=2, n_test_good=1, n_per_defect=1)
    assert [p.name for p in tmp_path.iterdir()] == ["washer"]
    for rel in ["train/good/001.png", "test/good/000.png", "test/notch/000.png", "ground_truth/notch/000_mask.png"]:
        assert (tmp_path / "washer" / rel).read_bytes() == (dataset / "washer" / rel).read_bytes()


def test_render_sample_matches_written_file(dataset: Path) -> None:
    defect = DEFECT_TYPES["tile"][0]
    img, mask = render_sample("tile", defect, seed=0, index=1, image_size=SIZE)
    assert np.array_equal(img, np.asarray(_png(dataset / "tile" / "test" / defect / "001.png")))
    assert np.array_equal(mask, np.asarray(_png(dataset / "tile" / "ground_truth" / defect / "001_mask.png")))
    good, no_mask = render_sample("washer", None, seed=0, index=0, image_size=SIZE)
    assert no_mask is None
    assert np.array_equal(good, np.asarray(_png(dataset / "washer" / "test" / "good" / "000.png")))


def test_regenerating_replaces_own_output(tmp_path: Path) -> None:
    generate(tmp_path, seed=0, categories=["tile"], image_size=64, n_train=3, n_test_good=1, n_per_defect=1)
    generate(tmp_path, seed=0, categories=["tile"], image_size=64, n_train=2, n_test_good=1, n_per_defect=1)
    assert sorted(p.name for p in (tmp_path / "tile" / "train" / "good").iterdir()) == ["000.png", "001.png"]


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    real = tmp_path / "tile" / "train" / "good"
    real.mkdir(parents=True)
    (real / "000.png").write_bytes(b"a real image")
    with pytest.raises(FileExistsError, match="refusing"):
        generate(tmp_path, categories=["tile"], **SMALL)
    assert (real / "000.png").read_bytes() == b"a real image"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_train=0),
        dict(n_test_good=0),
        dict(n_per_defect=0),
        dict(image_size=63),
        dict(seed=-1),
        dict(categories=[]),
        dict(n_train=2.5),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_unknown_category_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        generate(tmp_path, categories=["tile", "carpet"], **SMALL)
    for c in CATEGORIES:
        assert c in str(err.value)
    assert not any(tmp_path.iterdir())  # checked before anything is written


def test_render_sample_validates() -> None:
    with pytest.raises(ValueError, match="valid"):
        render_sample("tile", "notch")
    with pytest.raises(ValueError):
        render_sample("nope")
