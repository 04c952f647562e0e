"""The one image reader (data.images): the pixel limit read from the header before any decoding, the formats
Pillow may use, reduced-scale JPEG decoding, and the error a user sees from `predict`.

Every header-only image here declares far more pixels than it holds: decoding it would fail or take memory, so
"refused without decoding" is checked by asserting that Pillow's decoder (ImageFile.load) never ran.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from bad_images import eps_bytes, header_only_png, psd_bytes
from PIL import Image, ImageFile

from distributed_anomaly.data import decode, images
from distributed_anomaly.data.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, max_pixels_setting, parse_max_pixels
from distributed_anomaly.errors import ImageReadError, ImageTooLargeError, UserError


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Records every call of Pillow's decoder (ImageFile.load) while still decoding."""
    calls: list[str] = []
    original = ImageFile.ImageFile.load

    def load(self):
        calls.append(self.format)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def test_oversized_header_is_refused_before_decoding(tmp_path: Path, decodes: list[str]) -> None:
    blob = header_only_png(13000, 13000)
    assert len(blob) < 1000
    with pytest.raises(ImageTooLargeError, match=r"<bytes> is 13000 x 13000 = 169\.0 megapixels.*limit of 40") as e:
        images.read_image(blob)
    assert e.value.pixels == 169_000_000 and e.value.limit == DEFAULT_MAX_PIXELS
    path = tmp_path / "huge.png"
    path.write_bytes(blob)
    with pytest.raises(ImageTooLargeError, match="huge.png"):
        images.read_image(path)
    with pytest.raises(ImageTooLargeError, match="huge.png"):  # as the training loader reads
        images.read_image(path, target_size=32)
    assert decodes == []  # nothing was decoded: the header alone decided
    row = images.decode_batch({"path": np.array([str(path)]), "idx": np.array([0])}, 32)
    assert not row["ok"][0] and "huge.png is 13000 x 13000" in row["error"][0]
    assert decodes == []


def test_the_limit_comes_from_the_argument_the_environment_or_the_default(monkeypatch, decodes) -> None:
    small = io.BytesIO()
    Image.new("RGB", (40, 30)).save(small, format="PNG")
    with pytest.raises(ImageTooLargeError, match="40 x 30 = 0.0 megapixels"):
        images.read_image(small.getvalue(), max_pixels=1199)
    assert decodes == []
    assert images.read_image(small.getvalue(), max_pixels=1200).shape == (30, 40, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    assert max_pixels_setting() == 1000
    with pytest.raises(ImageTooLargeError):
        images.read_image(small.getvalue())
    monkeypatch.delenv(MAX_PIXELS_ENV)
    assert max_pixels_setting() == DEFAULT_MAX_PIXELS and parse_max_pixels("4e7") == 40_000_000
    for bad in ("0", "-3", "1.5", "many"):
        with pytest.raises(UserError, match="max pixels"):
            parse_max_pixels(bad)


@pytest.mark.parametrize("kind", ["PSD", "EPS", "GIF"])
def test_only_the_documented_formats_are_opened(kind: str, decodes: list[str]) -> None:
    if kind == "GIF":
        buf = io.BytesIO()
        Image.new("P", (8, 8)).save(buf, format="GIF")
        blob = buf.getvalue()
    else:
        blob = psd_bytes() if kind == "PSD" else eps_bytes()
    assert Image.open(io.BytesIO(blob)).format == kind  # Pillow alone would open it
    with pytest.raises(ImageReadError, match="not a PNG, JPEG, BMP, TIFF or WebP image"):
        images.read_image(blob)
    assert decodes == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_the_documented_formats_decode(fmt: str) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    got, shape = images.load_image(buf.getvalue())
    assert got.shape == (24, 32, 3) and shape == (24, 32)
    if fmt != "JPEG":
        assert np.array_equal(got, rgb)


def test_large_jpegs_decode_at_reduced_scale_for_a_small_model() -> None:
    yy, xx = np.mgrid[0:1200, 0:1600]
    rgb = np.dstack([xx % 256, yy % 256, (xx + yy) % 256]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    full, shape = images.load_image(buf.getvalue())
    assert full.shape == (1200, 1600, 3) and shape == (1200, 1600)
    # Model side 128: at least 256 px kept per side, so libjpeg decodes at 1/4 (400 x 300).
    small, shape = images.load_image(buf.getvalue(), target_size=128)
    assert small.shape == (300, 400, 3) and shape == (1200, 1600)
    # Model side 512: the image is not 4x larger, so it is decoded in full.
    assert images.load_image(buf.getvalue(), target_size=512)[0].shape == (1200, 1600, 3)
    # What the model sees differs little from the full decode resized the same way.
    a, b = images.to_tensor(full, 128), images.to_tensor(small, 128)
    assert float((a - b).abs().mean()) < 0.05
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    assert images.load_image(png.getvalue(), target_size=128)[0].shape == (1200, 1600, 3)  # JPEG only


def test_sixteen_bit_images_rescale_block_by_block(monkeypatch) -> None:
    monkeypatch.setattr(decode, "_ROW_BLOCK", 7)  # several blocks, and a short last one (data.decode reads them)
    values = (np.arange(20 * 9, dtype=np.uint32).reshape(20, 9) * 367 % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    got = images.read_image(buf.getvalue())
    want = np.clip(np.round(values.astype(np.float64) / 65535.0 * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)


@pytest.mark.slow
def test_predict_names_an_oversized_image_in_one_line(
    padim_run: Path, demo_category: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from distributed_anomaly.cli import main

    monkeypatch.setenv(MAX_PIXELS_ENV, str(DEFAULT_MAX_PIXELS))  # the CLI sets it; restored after the test

    good = next((demo_category / "test" / "good").iterdir())
    huge = tmp_path / "huge.png"
    huge.write_bytes(header_only_png(13000, 13000))
    assert main(["predict", "--model", str(padim_run), "--out", str(tmp_path / "o"), str(good), str(huge)]) == 1
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if "huge.png" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{huge}: ERROR image {huge} is 13000 x 13000"), out.err
    assert "1 images scored, 1 failed" in out.out and (tmp_path / "o" / f"{good.stem}.json").is_file()
    # --max-pixels lowers the limit for this command: the demo image (its own size) is now refused too.
    h, w = images.image_shape(good)
    assert (
        main(
            [
                "predict",
                "--model",
                str(padim_run),
                "--out",
                str(tmp_path / "p"),
                "--max-pixels",
                str(h * w - 1),
                str(good),
            ]
        )
        == 1
    )
    assert f"{good}: ERROR image {good} is {w} x {h}" in capsys.readouterr().err


def test_the_limit_reaches_a_joined_clusters_workers(monkeypatch) -> None:
    from distributed_anomaly.distributed.ray_setup import _max_pixels_runtime_env

    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _max_pixels_runtime_env() is None
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    assert _max_pixels_runtime_env() == {"env_vars": {MAX_PIXELS_ENV: "1000"}}
    # Inside `ray job submit` whose runtime_env sets it already, Ray would refuse a second value: leave it.
    job = {"runtime_env": {"working_dir": ".", "env_vars": {MAX_PIXELS_ENV: "5"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert _max_pixels_runtime_env() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "."}}))
    assert _max_pixels_runtime_env() == {"env_vars": {MAX_PIXELS_ENV: "1000"}}
