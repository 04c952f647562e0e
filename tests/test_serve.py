"""Ray Serve: the pure request/response rules, then the real application on the session's local Ray over real
HTTP to 127.0.0.1 (each task, every bad input, unknown models, the API key, the body limit, batching), the
deployment handles, the `serve` CLI as a process, and the `serve run`/`serve deploy` builder and config.

Two tiny PADIM models (resnet18 with seeded random weights, layer1+2, 64 px) on the two demo categories;
answers are compared with `OpenVINOInferencer` on the same images through the same response builder.
"""

from __future__ import annotations

import _thread
import base64
import concurrent.futures as cf
import hashlib
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from bad_images import eps_bytes, header_only_png, psd_bytes
from conftest import SERVING_SIZE
from PIL import Image
from ray_cluster import free_ports
from serving import deployed

from distributed_anomaly.distributed.ray_setup import INLINE_ARGUMENT_ENV
from distributed_anomaly.errors import UserError
from distributed_anomaly.inference import OpenVINOInferencer
from distributed_anomaly.irformat import BIN_SHA256, FORMAT
from distributed_anomaly.postprocess import PostProcessor
from distributed_anomaly.runner import predict_images
from distributed_anomaly.serve import registry, requests, responses, settings

ROOT = Path(__file__).resolve().parents[1]
SIZE = SERVING_SIZE  # the image size of conftest.serving_irs
KEY = "test-key-123"
MAX_BODY = 1_000_000  # the integration server's limit (the default, 20 MB, is checked in the unit tests)


def png_bytes(arr: np.ndarray) -> bytes:
    """uint8 (H, W) grey, (H, W, 3) RGB, (H, W, 4) RGBA, or uint16 (H, W) 16-bit grey, as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def multipart(fields: dict[str, tuple | str], boundary: str = "XyZb0und4ry") -> tuple[bytes, str]:
    """A multipart/form-data body by hand (so the unit tests also cover what browsers and curl send)."""
    out = b""
    for name, value in fields.items():
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, data = value
            out += (
                (
                    f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n"
                ).encode()
                + data
                + b"\r\n"
            )
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def fake_ir(folder: Path, **meta) -> Path:
    """Files enough for the registry (which reads metadata only; replicas compile)."""
    folder.mkdir(parents=True)
    for name in ("model.xml", "model.bin"):
        (folder / name).write_text(f"<{name} of {folder.name}>")
    (folder / "postprocess.json").write_text("{}")
    sha = hashlib.sha256((folder / "model.bin").read_bytes()).hexdigest()
    (folder / "metadata.json").write_text(
        json.dumps(
            {"format": FORMAT, "model": "padim", "image_size": 64, "image_threshold": 1.5, BIN_SHA256: sha, **meta}
        )
    )
    return folder


# ------------------------------------------------------------------------------------------------------
# Pure logic, no Ray.


def test_registry_names_versions_and_errors(tmp_path: Path) -> None:
    a = fake_ir(tmp_path / "washer")
    fake_ir(tmp_path / "lines" / "tile")
    fake_ir(tmp_path / "lines" / "grid", backbone="resnet18")
    (tmp_path / "lines" / "notes").mkdir()  # not an IR folder: ignored inside a folder of models
    entries = registry.discover_models([a, tmp_path / "lines", f"other={a}"])
    assert list(entries) == ["washer", "grid", "tile", "other"]
    assert entries["washer"].path == str(a.resolve()) and entries["grid"].info["backbone"] == "resnet18"
    assert entries["washer"].info["image_threshold"] == 1.5 and entries["washer"].info["image_size"] == 64
    assert entries["washer"].version == entries["other"].version and len(entries["washer"].version) == 12
    assert entries["washer"].version != entries["tile"].version  # different files
    assert registry.ModelEntry.from_dict(entries["tile"].to_dict()) == entries["tile"]
    (a / "metadata.json").write_text(
        json.dumps({**json.loads((a / "metadata.json").read_text()), "exported_at": "later"})
    )
    assert registry.discover_models([a])["washer"].version != entries["washer"].version  # a re-export is a new version

    with pytest.raises(UserError, match="two models are named 'washer'"):
        registry.discover_models([a, f"washer={tmp_path / 'lines' / 'tile'}"])
    with pytest.raises(UserError, match="no such folder"):
        registry.discover_models([tmp_path / "missing"])
    with pytest.raises(UserError, match="neither an IR folder"):
        registry.discover_models([tmp_path / "lines" / "notes"])
    with pytest.raises(UserError, match="no model given"):
        registry.discover_models([])
    with pytest.raises(UserError, match="must be letters"):
        registry.discover_models([fake_ir(tmp_path / "bad name")])
    (tmp_path / "lines" / "tile" / "model.bin").unlink()
    with pytest.raises(UserError, match="missing model.bin"):
        registry.discover_models([tmp_path / "lines" / "tile"])
    (fake_ir(tmp_path / "foreign") / "metadata.json").write_text('{"model": "padim"}')
    with pytest.raises(UserError, match="not metadata written by `export`"):
        registry.discover_models([tmp_path / "foreign"])


def test_request_rules() -> None:
    assert requests.parse_task(None) == "segmentation" and requests.parse_task(" Detection ") == "detection"
    with pytest.raises(requests.BadRequest, match="unknown task 'x'"):
        requests.parse_task("x")
    assert requests.resolve_model(None, ["a"]) == "a" and requests.resolve_model("b", ["a", "b"]) == "b"
    with pytest.raises(requests.UnknownModel, match="unknown model 'c'; served models: a, b") as e:
        requests.resolve_model("c", ["a", "b"])
    assert e.value.status == 404
    with pytest.raises(requests.BadRequest, match="2 models are served"):
        requests.resolve_model(None, ["a", "b"])
    assert requests.model_from_request({"model": "q"}, {"x-model": "h"}) == "q"
    assert requests.model_from_request({}, {"x-model": "h"}) == "h"
    assert requests.model_from_request({}, {"serve_multiplexed_model_id": "s"}) == "s"
    assert requests.model_from_request({}, {}) is None

    requests.check_api_key(None, {})  # no key configured: open
    requests.check_api_key("k", {"x-api-key": "k"})
    requests.check_api_key("k", {"authorization": "Bearer k"})
    for headers in ({}, {"x-api-key": "K"}, {"authorization": "Basic k"}, {"authorization": "Bearer "}):
        with pytest.raises(requests.Unauthorized):
            requests.check_api_key("k", headers)

    assert settings.DEFAULT_MAX_BODY_BYTES == 20 * 1024 * 1024
    requests.check_content_length(None, 10)
    requests.check_content_length("10", 10)
    with pytest.raises(requests.PayloadTooLarge, match="11 bytes is over the limit of 10"):
        requests.check_content_length("11", 10)
    with pytest.raises(requests.BadRequest, match="invalid Content-Length"):
        requests.check_content_length("ten", 10)
    chunks: list[bytes] = []
    size = requests.accumulate(chunks, b"12345", 0, 10)
    size = requests.accumulate(chunks, b"12345", size, 10)
    with pytest.raises(requests.PayloadTooLarge):
        requests.accumulate(chunks, b"1", size, 10)
    assert chunks == [b"12345", b"12345"]

    # Exceptions keep their class, status and message when Ray pickles them between processes.
    err = pickle.loads(pickle.dumps(requests.UnknownModel("nope")))
    assert type(err) is requests.UnknownModel and err.status == 404 and err.body() == {"error": "nope", "status": 404}


def test_parse_body_raw_and_multipart() -> None:
    png = png_bytes(np.zeros((4, 4, 3), np.uint8))
    assert requests.parse_body(png, "image/png").data == png
    assert requests.parse_body(png, None).data == png
    body, ctype = multipart({"task": "detection", "file": ("a.png", png), "model": "tile"})
    up = requests.parse_body(body, ctype)
    assert up.data == png and up.filename == "a.png" and up.fields == {"task": "detection", "model": "tile"}
    body, ctype = multipart({"upload": ("b.png", png)})  # any field with a file name
    assert requests.parse_body(body, ctype).data == png
    body = httpx.Request("POST", "http://x", files={"file": ("c.png", png, "image/png")}, data={"task": "x"})
    body.read()
    up = requests.parse_body(body.content, body.headers["content-type"])  # what httpx/requests/curl -F send
    assert up.data == png and up.fields == {"task": "x"}

    with pytest.raises(requests.BadRequest, match="empty request body"):
        requests.parse_body(b"", "application/octet-stream")
    with pytest.raises(requests.BadRequest, match="no file part"):
        requests.parse_body(*multipart({"task": "detection"}))
    with pytest.raises(requests.BadRequest, match="is empty"):
        requests.parse_body(*multipart({"file": ("a.png", b"")}))
    with pytest.raises(requests.BadRequest, match="without a boundary"):
        requests.parse_body(png, "multipart/form-data")
    with pytest.raises(requests.BadRequest, match="malformed multipart"):
        requests.parse_body(b"not multipart at all", "multipart/form-data; boundary=abc")


def test_decode_image_any_mode_and_bad_bytes() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(requests.decode_image(png_bytes(rgb)), rgb)
    grey = requests.decode_image(png_bytes(rgb[..., 0]))
    assert grey.shape == (5, 7, 3) and np.array_equal(grey[..., 2], rgb[..., 0])
    assert requests.decode_image(png_bytes(np.dstack([rgb, np.full((5, 7), 255, np.uint8)]))).shape == (5, 7, 3)
    assert requests.decode_image(png_bytes(rgb[..., 0].astype(np.uint16) * 257)).shape == (5, 7, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buf, format="PNG")
    assert requests.decode_image(buf.getvalue()).shape == (5, 7, 3)
    with pytest.raises(requests.BadRequest, match="zero bytes"):
        requests.decode_image(b"")
    not_ours = r"not a decodable image \(9 bytes\): not a PNG, JPEG, BMP, TIFF or WebP image$"
    with pytest.raises(requests.BadRequest, match=not_ours):
        requests.decode_image(b"not a png")
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buf, format="GIF")  # a format we do not document
    with pytest.raises(requests.BadRequest, match="not a PNG, JPEG"):
        requests.decode_image(buf.getvalue())
    with pytest.raises(requests.PayloadTooLarge, match=r"image is 7 x 5 = 0.0 megapixels, over the limit"):
        requests.decode_upload(png_bytes(rgb), max_pixels=34)
    with pytest.raises(requests.BadRequest, match="truncated"):
        requests.decode_image(png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[:200])

    assert np.array_equal(requests.as_rgb(rgb), rgb) and requests.as_rgb(png_bytes(rgb)).shape == (5, 7, 3)
    assert requests.as_rgb(rgb[..., :1]).shape == (5, 7, 3) and requests.as_rgb(rgb[..., 0]).shape == (5, 7, 3)
    assert np.array_equal(requests.as_rgb(np.dstack([rgb, rgb[..., :1]])), rgb)
    with pytest.raises(requests.BadRequest, match="must be uint8"):
        requests.as_rgb(rgb.astype(np.float32))
    with pytest.raises(requests.BadRequest, match=r"got \(5, 7, 2\)"):
        requests.as_rgb(rgb[..., :2])
    with pytest.raises(requests.BadRequest, match="got"):
        requests.as_rgb(np.zeros((0, 3, 3), np.uint8))


def test_prediction_response_per_task() -> None:
    post = PostProcessor(
        image_threshold=2.0,
        pixel_threshold=2.0,
        norm_min=0.0,
        norm_max=4.0,
        threshold_source="user",
        min_region_fraction=0.0,
    )
    raw = np.zeros((20, 30), np.float32)
    raw[5:9, 10:16] = 3.0
    pred = post(raw)
    entry = registry.ModelEntry("washer", "/ir/washer", "abc123def456", {"image_threshold": 2.0})
    seg = responses.prediction_response(pred, "segmentation", entry, (20, 30, 3))
    assert seg["model"] == "washer" and seg["version"] == "abc123def456" and seg["task"] == "segmentation"
    assert seg["score"] == 0.75 and seg["raw_score"] == 3.0 and seg["label"] == 1 and seg["label_name"] == "anomalous"
    assert seg["threshold"] == 2.0 and seg["score_threshold"] == 0.5 and (seg["width"], seg["height"]) == (30, 20)
    assert seg["boxes"] == [[10, 5, 16, 9, 0.75]]
    assert np.array_equal(responses.decode_mask(seg["mask"]), raw >= 2.0) and seg["mask_format"] == "png;base64"
    assert base64.b64decode(seg["mask"])[:4] == b"\x89PNG"
    det = responses.prediction_response(pred, "detection", entry, (20, 30, 3))
    assert det["boxes"] == seg["boxes"] and "mask" not in det
    cls = responses.prediction_response(pred, "classification", entry, (20, 30, 3))
    assert "boxes" not in cls and "mask" not in cls and cls["score"] == 0.75
    json.dumps(seg, allow_nan=False)  # plain JSON types only

    no_thr = PostProcessor(None, None, 0.0, 4.0, "none")
    seg = responses.prediction_response(
        no_thr(raw), "segmentation", registry.ModelEntry("m", "/m", "v", {}), (20, 30, 3)
    )
    assert seg["label"] is None and seg["mask"] is None and seg["threshold"] is None


def test_app_config_from_builder_args() -> None:
    cfg = settings.AppConfig.from_args(
        {"models": "ir/a, ir/b", "replicas": "2", "cpus_per_replica": "1.5", "max_batch_size": "4", "max_body_mb": "2"}
    )  # strings, as `serve run k=v` gives
    assert cfg.models == ["ir/a", "ir/b"] and cfg.replicas == 2 and cfg.cpus_per_replica == 1.5
    assert cfg.max_batch_size == 4 and cfg.max_body_bytes == 2 * 1024 * 1024 and cfg.api_key is None
    cfg = settings.AppConfig.from_args({"models": ["ir/a"], "api_key": "k"})
    assert cfg.max_body_bytes == settings.DEFAULT_MAX_BODY_BYTES and cfg.max_batch_size == 8 and cfg.api_key == "k"
    with pytest.raises(UserError, match="unknown application argument"):
        settings.AppConfig.from_args({"models": "a", "replica": 2})
    with pytest.raises(UserError, match="needs models"):
        settings.AppConfig.from_args({})
    with pytest.raises(UserError, match="not a number"):
        settings.AppConfig.from_args({"models": "a", "replicas": "two"})
    with pytest.raises(UserError, match="max_batch_size must be >= 1"):
        settings.AppConfig.from_args({"models": "a", "max_batch_size": 0})
    assert [settings.threads_for_cpus(c) for c in (None, 0.0, 0.5, 1.0, 2.0, 3.7)] == [1, 1, 1, 1, 2, 3]


def test_serve_cli_parser(monkeypatch) -> None:
    from distributed_anomaly.cli import build_parser
    from distributed_anomaly.serve import server

    seen = []
    monkeypatch.setattr(
        server, "serve_forever", lambda cfg, host, port, address, **kw: seen.append((cfg, host, port, address)) or 0
    )
    monkeypatch.setenv(settings.API_KEY_ENV, "from-env")
    a = build_parser().parse_args(
        [
            "serve",
            "--model",
            "ir/a",
            "ir/b",
            "--port",
            "9000",
            "--replicas",
            "2",
            "--max-batch-size",
            "16",
            "--max-body-mb",
            "5",
            "--batch-wait-ms",
            "20",
        ]
    )
    assert a.func(a) == 0
    cfg, host, port, address = seen[0]
    assert (host, port, address) == ("127.0.0.1", 9000, None)
    assert cfg.models == ["ir/a", "ir/b"] and cfg.replicas == 2 and cfg.max_batch_size == 16
    assert cfg.max_body_bytes == 5 * 1024 * 1024 and cfg.batch_wait_timeout_s == pytest.approx(0.02)
    assert cfg.api_key == "from-env"
    a = build_parser().parse_args(
        ["serve", "--model", "x", "--api-key", "flag", "--address", "auto", "--host", "0.0.0.0"]
    )
    assert a.func(a) == 0 and seen[1][0].api_key == "flag" and seen[1][1:] == ("0.0.0.0", 8000, "auto")
    assert seen[1][0].max_body_bytes == settings.DEFAULT_MAX_BODY_BYTES
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])  # --model is required


def test_server_start_checks() -> None:
    from distributed_anomaly.serve.server import (
        check_port_free,
        display_host,
        wait_until_healthy,
    )

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}.*choose another with --port"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again once closed
    with pytest.raises(UserError, match="--port must be 1-65535"):
        check_port_free("127.0.0.1", 70000)
    assert display_host("0.0.0.0") == "127.0.0.1" and display_host("10.1.2.3") == "10.1.2.3"
    with pytest.raises(UserError, match="did not become healthy"):
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout_s=0.5)


# ------------------------------------------------------------------------------------------------------
# The application on the local Ray cluster.


@pytest.fixture(scope="module")
def images(demo_root: Path) -> dict[str, list[tuple[str, bytes]]]:
    """(name, PNG bytes) per category: two normal and four defective test images."""
    out = {}
    for cat in ("washer", "tile"):
        test = demo_root / cat / "test"
        paths = sorted((test / "good").glob("*.png"))[:2] + [
            min(d.glob("*.png")) for d in sorted(test.iterdir()) if d.is_dir() and d.name != "good"
        ]
        out[cat] = [(f"{p.parent.name}/{p.name}", p.read_bytes()) for p in paths]
    return out


@pytest.fixture(scope="module")
def reference(serving_irs):
    """What the inferencer answers for an image, through the same response builder as the server."""
    entries = registry.discover_models([serving_irs["washer"], serving_irs["tile"]])
    inferencers = {name: OpenVINOInferencer(e.path, num_threads=1) for name, e in entries.items()}

    def answer(model: str, data: bytes, task: str) -> dict:
        img, shape = requests.decode_for_model(data, None, SIZE)  # as the ingress decodes and resizes
        pred = predict_images(inferencers[model], [img], [shape])[0]
        return responses.prediction_response(pred, task, entries[model], shape)

    answer.entries = entries
    return answer


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_forever_stops_cleanly_on_either_signal(monkeypatch, stop_signal) -> None:
    """`serve`'s signal handling, without Ray: on Ctrl-C (SIGINT) or a service manager's SIGTERM it stops the
    server it started, prints "stopped", returns 0 and puts the previous handlers back -- also when starting
    replaced the handler (as `ray.init` replaces SIGTERM's). The real process is stopped in
    test_cli_serves_until_interrupted."""
    from distributed_anomaly.serve import server as srv

    stopped: list[bool] = []

    class FakeServer:
        def stop(self) -> None:
            stopped.append(True)

    def fake_start(*args, **kwargs) -> FakeServer:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(15))  # what ray.init does
        # The signal as Python delivers it, to the handler in place then (_thread.interrupt_main): a real one
        # (os.kill) would also reach the native threads of the session's Ray in this process.
        threading.Timer(0.3, _thread.interrupt_main, args=(stop_signal,)).start()
        return FakeServer()

    before = {sig: signal.getsignal(sig) for sig in srv.STOP_SIGNALS}
    monkeypatch.setattr(srv, "start_server", fake_start)
    monkeypatch.setattr(srv, "_banner", lambda *args: "Ctrl-C to stop")
    out = io.StringIO()
    assert srv.serve_forever(settings.AppConfig.from_args({"models": ["ir/a"]}), "127.0.0.1", 1, out=out) == 0
    assert stopped == [True] and out.getvalue() == "Ctrl-C to stop\nstopping ...\nstopped\n"
    assert {sig: signal.getsignal(sig) for sig in srv.STOP_SIGNALS} == before


@pytest.mark.ray
def test_a_model_size_image_travels_inside_the_call(ray_local) -> None:
    """The local Ray that ensure_ray starts passes arguments up to INLINE_ARGUMENT_BYTES inside the call (its
    workers read RAY_max_direct_call_object_size): the ingress's 256 x 256 RGB array for the model replica goes
    without the object store (bench/serve_cpu.py: Ray's own CPU per request 4.1-5.6 -> 1.2-1.5 core-ms)."""

    @ray_local.remote(num_cpus=0)
    def inline_limit() -> int:
        return int(os.environ.get(INLINE_ARGUMENT_ENV, "102400"))  # Ray's default: 100 KiB

    image_bytes = len(pickle.dumps(np.zeros((256, 256, 3), dtype=np.uint8)))
    assert ray_local.get(inline_limit.remote()) >= image_bytes > 102400


@pytest.mark.ray
@pytest.mark.slow
def test_cli_serves_until_interrupted(serve_http, serving_irs, images, tmp_path) -> None:
    """`distributed-anomaly serve` as a user runs it on a shared cluster (this session's, where Serve already
    runs): it joins Serve's proxy and says so, prints a live URL, answers with the key from --api-key-file, and
    on a service manager's SIGTERM (whose handler ray.init replaces) deletes its application -- only it: Serve
    keeps running for the cluster's other users -- and exits 0. Both signals without Ray in
    test_serve_forever_stops_cleanly_on_either_signal; what stop undoes in each case (Serve, Ray) in
    test_serve_guards.py::test_stop_undoes_exactly_what_start_did."""
    import ray

    from distributed_anomaly.serve.deployments import APP_NAME
    from distributed_anomaly.serve.server import serve_client

    port = free_ports(1)[0]  # does not apply: the proxy already runs on serve_http (the banner says so)
    env = {k: v for k, v in os.environ.items() if k != settings.API_KEY_ENV}
    (tmp_path / "key").write_text("env-key\n")
    key_args = ["--api-key-file", str(tmp_path / "key")]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed_anomaly",
            "serve",
            "--model",
            f"product={serving_irs['washer']}",
            "--port",
            str(port),
            "--address",
            ray.get_runtime_context().gcs_address,
            *key_args,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("Ctrl-C to stop" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "no URL printed in 180 s:\n" + "".join(lines)
            time.sleep(0.2)
        out = "".join(lines)
        url = f"http://127.0.0.1:{serve_http}"
        assert f"URL      {url} (Serve was already running on this cluster" in out, out
        assert "serving 1 model(s): product; requests need the API key" in out
        _, data = images["washer"][2]
        r = httpx.post(f"{url}/predict?task=classification", content=data, headers={"X-API-Key": "env-key"}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "product", r.text
        assert httpx.post(f"{url}/predict", content=data, timeout=60).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    assert "stopped" in "".join(lines)
    assert APP_NAME not in serve_client().get_serve_details()["applications"]  # its application, deleted
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 404  # by a proxy that still answers


@pytest.fixture(scope="module")
def server(serve_http, serving_irs):
    cfg = settings.AppConfig(
        models=[str(serving_irs["washer"]), str(serving_irs["tile"])],
        replicas=1,
        cpus_per_replica=1,
        max_batch_size=4,
        batch_wait_timeout_s=0.05,
        max_body_bytes=MAX_BODY,
        api_key=KEY,
    )
    with deployed(cfg, serve_http) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=120) as c:
        yield c


def model_stats(server) -> dict:
    from ray import serve

    from distributed_anomaly.serve.deployments import MODEL_DEPLOYMENT

    return serve.get_deployment_handle(MODEL_DEPLOYMENT, server.app_name).stats.remote().result()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_http_answers_equal_the_inferencer(client, images, reference, task) -> None:
    boxes_seen = 0
    for model in ("washer", "tile"):
        for name, data in images[model]:
            r = client.post(
                "/predict", params={"task": task, "model": model}, content=data, headers={"Content-Type": "image/png"}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body == reference(model, data, task), f"{model} {name}"  # every field, floats exactly
            assert body["model"] == model and body["version"] == reference.entries[model].version
            assert 0.0 <= body["score"] <= 1.0 and body["label"] in (0, 1)
            assert (body["label"] == 1) == (body["score"] >= 0.5)
            if task == "segmentation":
                mask = responses.decode_mask(body["mask"])
                assert mask.shape == (body["height"], body["width"]) == (128, 128)
            boxes_seen += len(body.get("boxes", []))
    if task != "classification":
        assert boxes_seen > 0  # the defective images give boxes, so their format was checked above


@pytest.mark.ray
@pytest.mark.slow
def test_multipart_header_model_and_odd_images(client, images, reference) -> None:
    _, data = images["tile"][3]
    r = client.post(
        "/predict",
        files={"file": ("part.png", data, "image/png")},
        data={"task": "detection"},
        headers={"X-Model": "tile"},
    )
    assert r.status_code == 200 and r.json() == reference("tile", data, "detection")
    r = client.post("/predict", files={"file": ("part.png", data)}, data={"model": "tile"})  # form field
    assert r.status_code == 200 and r.json() == reference("tile", data, "segmentation")
    # Any mode and size: grey, RGBA, 16-bit, a JPEG, a 1 x 1 image; answers are in the image's own size.
    rgb = requests.decode_image(data)
    buf = io.BytesIO()
    Image.fromarray(rgb).resize((301, 77)).save(buf, format="JPEG")
    big = io.BytesIO()  # at least 4x the model's 64 px: the ingress decodes it at 1/2 scale (data.images)
    Image.fromarray(rgb).resize((600, 400)).save(big, format="JPEG")
    odd = {
        "large jpeg": big.getvalue(),
        "grey": png_bytes(rgb[..., 0]),
        "rgba": png_bytes(np.dstack([rgb, rgb[..., 0]])),
        "16bit": png_bytes(rgb[..., 0].astype(np.uint16) * 257),
        "jpeg": buf.getvalue(),
        "tiny": png_bytes(rgb[:1, :1]),
    }
    for kind, blob in odd.items():
        r = client.post("/predict?model=washer&task=segmentation", content=blob)
        assert r.status_code == 200, (kind, r.text)
        body = r.json()
        assert body == reference("washer", blob, "segmentation"), kind
        assert responses.decode_mask(body["mask"]).shape == (body["height"], body["width"])
    assert r.json()["width"] == r.json()["height"] == 1


@pytest.mark.ray
@pytest.mark.slow
def test_bad_requests_get_json_errors_and_the_server_keeps_answering(server, client, images, reference) -> None:
    _, good = images["washer"][2]
    pid = model_stats(server)["pid"]
    too_big = b"\0" * (MAX_BODY + 1)
    rng = np.random.default_rng(1)
    truncated = png_bytes(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))[:300]
    mp_no_file, ct_no_file = multipart({"task": "detection"})
    mp_empty, ct_empty = multipart({"file": ("a.png", b"")})
    gif_buf = io.BytesIO()
    Image.new("P", (8, 8)).save(gif_buf, format="GIF")
    gif = gif_buf.getvalue()

    def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"\0" * 65536

    cases = [
        ("not an image", dict(content=b"this is not an image"), 400, "not a decodable image"),
        ("truncated", dict(content=truncated), 400, "truncated"),
        ("zero bytes", dict(content=b""), 400, "empty request body"),
        ("multipart without file", dict(content=mp_no_file, headers={"Content-Type": ct_no_file}), 400, "no file"),
        ("multipart empty file", dict(content=mp_empty, headers={"Content-Type": ct_empty}), 400, "is empty"),
        ("multipart not an image", dict(files={"file": ("x.png", b"GIF89a-nope")}), 400, "not a decodable"),
        ("bad task", dict(content=good, params={"task": "ocr"}), 400, "unknown task 'ocr'"),
        ("unknown model", dict(content=good, params={"model": "gearbox"}), 404, "unknown model 'gearbox'"),
        (
            "unknown model header",
            dict(content=good, params={}, headers={"X-Model": "gearbox"}),
            404,
            "served models: washer",
        ),
        ("no model", dict(content=good, params={}), 400, "2 models are served"),
        ("too large", dict(content=too_big), 413, "over the limit"),
        ("13000 x 13000 header", dict(content=header_only_png(13000, 13000)), 413, "13000 x 13000 = 169.0 megapixels"),
        ("PSD", dict(content=psd_bytes()), 400, "not a PNG, JPEG, BMP, TIFF or WebP image"),
        ("EPS", dict(content=eps_bytes()), 400, "not a PNG, JPEG, BMP, TIFF or WebP image"),
        ("GIF", dict(content=gif), 400, "not a PNG, JPEG, BMP, TIFF or WebP image"),
        ("too large, streamed", dict(content=chunks()), 413, "over the limit"),
        ("no key", dict(content=good, headers={"X-API-Key": ""}), 401, "API key"),
        ("wrong key", dict(content=good, headers={"X-API-Key": "nope"}), 401, "API key"),
    ]
    for label, kwargs, status, message in cases:
        kwargs.setdefault("params", {"model": "washer"})
        r = client.post("/predict", **kwargs)
        assert r.status_code == status, (label, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json", label
        body = r.json()
        assert message in body["error"] and body["status"] == status, (label, body)
        # The request id Serve's proxy answers with is in the body too (and in the replica's log lines).
        assert body["request_id"] and body["request_id"] == r.headers["x-request-id"], (label, r.headers)
    # Every bad request was answered by the ingress; the model replica neither crashed nor restarted.
    assert model_stats(server)["pid"] == pid
    assert client.get("/healthz").json()["status"] == "ok"
    for task in ("classification", "segmentation"):
        r = client.post("/predict", params={"model": "washer", "task": task}, content=good)
        assert r.status_code == 200 and r.json() == reference("washer", good, task)
    r = httpx.post(f"{server.url}/predict?model=washer", content=good, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200


@pytest.mark.ray
@pytest.mark.slow
def test_concurrent_requests_are_batched_and_exact(server, client, images, reference) -> None:
    jobs = [(m, d, t) for m in ("washer", "tile") for _, d in images[m] for t in ("detection", "segmentation")]
    before = model_stats(server)

    def post(job):
        model, data, task = job
        return client.post("/predict", params={"model": model, "task": task}, content=data)

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, jobs))
    assert [r.status_code for r in answers] == [200] * len(jobs)
    for (model, data, task), r in zip(jobs, answers):
        got, want = r.json(), reference(model, data, task)
        # In a batch the network runs once for several images; OpenVINO's float sums may then differ in
        # the last bits from one image at a time, so scores are compared to 1e-5 here, structure exactly.
        assert got["model"] == model and got["label"] == want["label"]
        assert [b[:4] for b in got["boxes"]] == [b[:4] for b in want["boxes"]]
        assert [b[4] for b in got["boxes"]] == pytest.approx([b[4] for b in want["boxes"]], rel=1e-5, abs=1e-6)
        assert got["score"] == pytest.approx(want["score"], rel=1e-5, abs=1e-6)
        assert got["raw_score"] == pytest.approx(want["raw_score"], rel=1e-5)
        if task == "segmentation":
            assert np.mean(responses.decode_mask(got["mask"]) != responses.decode_mask(want["mask"])) < 1e-3
    after = model_stats(server)
    assert after["images"] - before["images"] == len(jobs)
    assert after["batches"] - before["batches"] < len(jobs)  # several images per OpenVINO call
    assert after["max_batch"] >= 2
    # Compiled once per replica (at start-up), never again; threads = the replica's CPUs.
    assert sorted(after["compiled"]) == ["tile", "washer"]
    assert after["num_cpus"] == 1.0 and after["num_threads"] == 1
    # Serve's request-path settings reached the replica (the ingress called it over gRPC to get here).
    from distributed_anomaly.serve.deployments import REPLICA_ENV

    assert after["serve_env"] == REPLICA_ENV


@pytest.mark.ray
@pytest.mark.slow
def test_healthz_metadata_and_docs(server, client, reference) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok", "models": ["washer", "tile"]}  # no key
    assert httpx.get(f"{server.url}/metadata").status_code == 401
    meta = client.get("/metadata").json()
    assert [m["name"] for m in meta["models"]] == ["washer", "tile"] and meta["default_model"] is None
    for m in meta["models"]:
        e = reference.entries[m["name"]]
        assert m["version"] == e.version and m["image_size"] == SIZE and m["backbone"] == "resnet18"
        assert m["image_threshold"] == e.info["image_threshold"] and m["model"] == "padim"
        assert m["precision"] == "fp32" and m["threshold_source"] == "normal_3sigma"
    assert meta["max_body_bytes"] == MAX_BODY and meta["api_key_required"] is True
    assert meta["max_batch_size"] == 4 and meta["tasks"] == ["classification", "detection", "segmentation"]
    spec = httpx.get(f"{server.url}/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/octet-stream" in body
    assert {p["name"] for p in spec["paths"]["/predict"]["post"]["parameters"]} >= {"task", "model"}
    assert httpx.get(f"{server.url}/docs").status_code == 200
    r = httpx.get(f"{server.url}/nowhere")
    assert r.status_code == 404 and r.json()["status"] == 404


@pytest.mark.ray
@pytest.mark.slow
def test_python_handles(server, images, reference) -> None:
    from ray import serve

    from distributed_anomaly.serve.deployments import MODEL_DEPLOYMENT

    _, data = images["washer"][3]
    rgb = requests.decode_image(data)
    # The application's handle (what serve.run returns): arrays or bytes, model by argument.
    assert server.handle.predict.remote(rgb, "detection", "washer").result() == reference("washer", data, "detection")
    assert server.handle.predict.remote(data, model="washer").result() == reference("washer", data, "segmentation")
    # The model deployment directly, the model chosen by multiplexed id.
    model = serve.get_deployment_handle(MODEL_DEPLOYMENT, server.app_name)
    got = model.options(multiplexed_model_id="tile").predict.remote(rgb, task="classification").result()
    assert got == reference("tile", data, "classification")
    with pytest.raises(requests.UnknownModel, match="unknown model 'gearbox'"):
        server.handle.predict.remote(rgb, model="gearbox").result()
    with pytest.raises(requests.UnknownModel):
        model.options(multiplexed_model_id="gearbox").predict.remote(rgb).result()
    with pytest.raises(requests.BadRequest, match="must be uint8"):
        model.predict.remote(rgb.astype(np.float64), model="washer").result()
    with pytest.raises(requests.BadRequest, match="2 models are served"):
        model.predict.remote(rgb).result()
    assert server.handle.predict.remote(rgb, "classification", "washer").result()["model"] == "washer"


@pytest.mark.ray
@pytest.mark.slow
def test_replicas_run_openvino_without_torch(server, client, images) -> None:
    """Both deployments' replicas (after real requests) have OpenVINO's library mapped and torch's not: the
    replicas import no torch (pyproject's import contract says the same of their modules, statically)."""
    from distributed_anomaly.serve.server import serve_client

    assert client.post("/predict?model=tile", content=images["tile"][0][1]).status_code == 200
    deployments = serve_client().get_serve_details()["applications"][server.app_name]["deployments"]
    libraries = {}
    for name, deployment in deployments.items():
        for replica in deployment["replicas"]:
            maps = Path(f"/proc/{replica['pid']}/maps").read_text()
            libraries[name] = {lib for lib in ("libtorch_cpu", "libopenvino.so") if lib in maps}
    assert libraries == {"AnomalyIngress": set(), "AnomalyModel": {"libopenvino.so"}}, libraries


@pytest.mark.slow
def test_builder_and_deploy_config(serving_irs) -> None:
    """`serve run distributed_anomaly.serve:app models=...` and cluster/serve_config.yaml build the same app."""
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from distributed_anomaly import serve as da_serve

    washer, tile = serving_irs["washer"], serving_irs["tile"]
    app = da_serve.app({"models": f"{washer},{tile}", "max_batch_size": "4"})  # `serve run` strings
    assert isinstance(app, Application)
    config = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    spec = schema.applications[0]
    module, attr = spec.import_path.split(":")
    assert (module, attr) == ("distributed_anomaly.serve", "app") and spec.route_prefix == "/"
    args = {**spec.args, "models": [str(washer), str(tile)]}  # the file's paths are the cluster's
    assert isinstance(getattr(__import__(module, fromlist=[attr]), attr)(args), Application)
    deployed = settings.AppConfig.from_args(spec.args)
    assert deployed.max_body_bytes == settings.DEFAULT_MAX_BODY_BYTES
    assert deployed.max_pixels == settings.DEFAULT_MAX_PIXELS
    assert deployed.max_queued_requests == settings.DEFAULT_MAX_QUEUED_REQUESTS
    assert schema.http_options.request_timeout_s == settings.DEFAULT_REQUEST_TIMEOUT_S
    with pytest.raises(UserError, match="no such folder"):
        da_serve.app({"models": "/nonexistent/ir"})
