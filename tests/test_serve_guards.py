"""Serve's guards without a cluster: a failing image in a batch fails only its own request, the replica health
check, error answers that carry a request id and nothing internal, 503 with Retry-After, /metadata without
credentials, the API key from a file or the environment (a YAML number too), and the queue and health settings
the application is built with. The same guards over real HTTP are in test_serve.py."""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from ray import serve
from starlette.requests import Request

from distributed_anomaly.errors import UserError
from distributed_anomaly.postprocess import PostProcessor
from distributed_anomaly.serve import http, requests, responses, settings
from distributed_anomaly.serve.deployments import AnomalyIngress, AnomalyModel
from distributed_anomaly.serve.registry import ModelEntry

SIZE = 16
POISON = 7  # an image whose pixels are all this value makes the fake network fail
POISON_RED = (POISON / 255.0 - 0.485) / 0.229  # its red channel once ImageNet-normalised (data.decode.normalise)


class FakeNetwork:
    """A runner.ModelRunner whose OpenVINO call fails for any batch holding a POISON image."""

    image_size = SIZE

    def __init__(self) -> None:
        self.postprocessor = PostProcessor(1.0, 1.0, 0.0, 2.0, "user")
        self.calls: list[int] = []

    def raw_maps(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        if any(np.allclose(x[0], POISON_RED, atol=1e-4) for x in batch):
            raise RuntimeError("ActorID(ffff0001) on node 10.1.2.3: OpenVINO exception at s3://bucket/ir?key=secret")
        return batch.mean(axis=1).clip(0.0, 2.0)


@pytest.fixture(autouse=True)
def replica_context(monkeypatch) -> None:
    """serve.batch reads the replica's max_ongoing_requests from Serve's replica context; outside a replica
    there is none, so give it the deployment's."""
    from types import SimpleNamespace

    config = SimpleNamespace(max_ongoing_requests=32)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(_deployment_config=config))


def model_replica(network: FakeNetwork) -> AnomalyModel:
    """The model deployment's class as a replica would hold it, without Ray. serve.batch keeps one queue per
    decorated function, bound to the first event loop that uses it: a subclass per test batches the same
    method body (`__wrapped__`) through a queue of its own, leaving the deployment's class untouched."""
    base = AnomalyModel.func_or_class

    class Replica(base):  # type: ignore[misc, valid-type]
        _predict_batch = serve.batch(max_batch_size=8, batch_wait_timeout_s=0.5)(base._predict_batch.__wrapped__)

    replica = Replica.__new__(Replica)
    entry = ModelEntry("washer", "/ir/washer", "abc123", {"image_size": SIZE, "image_threshold": 1.0})
    replica.entries, replica.names, replica.max_pixels = {"washer": entry}, ["washer"], None
    replica._pool = ThreadPoolExecutor(max_workers=1)
    replica._stats = {"batches": 0, "images": 0, "max_batch": 0, "compiled": ["washer"]}
    replica._init_operating_state()

    async def load(name: str) -> FakeNetwork:
        return network

    replica._load = load
    return replica


def test_a_failing_image_fails_only_its_own_request(caplog) -> None:
    network = FakeNetwork()
    replica = model_replica(network)
    good = np.full((20, 30, 3), 200, np.uint8)
    poison = np.full((SIZE, SIZE, 3), POISON, np.uint8)

    async def three_requests():
        calls = [replica.predict(img, "classification", "washer") for img in (good, poison, good[:10])]
        return await asyncio.gather(*calls, return_exceptions=True)

    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        first, failed, third = asyncio.run(three_requests())
    assert replica._stats["batches"] == 1 and replica._stats["max_batch"] == 3  # one batch held all three
    assert network.calls[0] == 3  # scored together first; the failure then isolated image by image
    assert first["model"] == "washer" and (first["width"], first["height"]) == (30, 20)
    assert (third["width"], third["height"]) == (30, 10)
    assert isinstance(failed, requests.ScoringFailed) and failed.status == 500
    assert "10.1.2.3" not in failed.message and "ActorID" not in failed.message and "s3://" not in failed.message
    assert "10.1.2.3" in caplog.text  # the details went to the log


def test_health_check_runs_a_tiny_inference() -> None:
    network = FakeNetwork()
    replica = model_replica(network)
    asyncio.run(replica.check_health())
    assert network.calls == [1]

    class Broken(FakeNetwork):
        def raw_maps(self, batch):
            return np.full((1, SIZE, SIZE), np.nan, np.float32)

    replica = model_replica(Broken())
    with pytest.raises(RuntimeError, match="no finite anomaly map"):
        asyncio.run(replica.check_health())


def make_request(request_id: str | None = "req-42") -> Request:
    headers = [(b"x-request-id", request_id.encode())] if request_id else []
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers, "query_string": b""})


def test_error_answers_carry_the_request_id_and_nothing_internal(caplog) -> None:
    request = make_request()
    busy = asyncio.run(http._http_error(request, requests.Unavailable("the model deployment is busy; retry")))
    assert busy.status_code == 503 and busy.headers["retry-after"] == str(settings.RETRY_AFTER_S)
    assert json.loads(busy.body) == {
        "error": "the model deployment is busy; retry",
        "status": 503,
        "request_id": "req-42",
    }
    secret = RuntimeError("Traceback ... ActorID(ffff0001) node 10.1.2.3 s3://key:secret@bucket/ir")
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        crash = asyncio.run(http._unexpected_error(request, secret))
    body = json.loads(crash.body)
    assert crash.status_code == 500 and body["request_id"] == "req-42" and "req-42" in body["error"]
    assert not any(s in body["error"] for s in ("ActorID", "10.1.2.3", "s3://", "Traceback"))
    assert "req-42" in caplog.text and "10.1.2.3" in caplog.text

    # What the model deployment call raises (Ray's wrappers name actors and nodes) is logged, not answered.
    ingress = AnomalyIngress.func_or_class.__new__(AnomalyIngress.func_or_class)

    class Handle:
        class predict:
            @staticmethod
            async def remote(*args):
                raise RuntimeError("RayActorError: ActorID(ffff0001) died on node 10.1.2.3")

    ingress._handles = {"washer": Handle()}
    with pytest.raises(requests.ServerError) as err:
        asyncio.run(ingress._forward("washer", np.zeros((2, 2, 3), np.uint8), "classification", (2, 2), "req-7"))
    assert "req-7" in err.value.message and "10.1.2.3" not in err.value.message and "ActorID" not in err.value.message

    class BackPressureError(Exception):
        pass

    async def overloaded(*args):
        raise BackPressureError("Request dropped due to backpressure (num_queued_requests=100)")

    Handle.predict.remote = staticmethod(overloaded)
    with pytest.raises(requests.Unavailable) as err:
        asyncio.run(ingress._forward("washer", np.zeros((2, 2, 3), np.uint8), "classification", (2, 2), "req-8"))
    assert err.value.status == 503 and err.value.headers == {"Retry-After": str(settings.RETRY_AFTER_S)}


def test_metadata_shows_no_credentials_or_query_strings() -> None:
    assert responses.public_location("s3://AKIA:secret@bucket/ir/washer?endpoint_override=x&key=y#f") == (
        "s3://bucket/ir/washer"
    )
    assert responses.public_location("/shared/ir/washer") == "/shared/ir/washer"
    entries = {
        "washer": ModelEntry("washer", "gs://tok@Bucket/ir/washer?access_token=t", "v1", {"image_size": 64}),
        "tile": ModelEntry("tile", "/ir/tile", "v2", {}),
    }
    meta = responses.metadata_response(entries, {"max_pixels": 1})
    assert [m["path"] for m in meta["models"]] == ["gs://Bucket/ir/washer", "/ir/tile"]
    assert "tok" not in json.dumps(meta) and "access_token" not in json.dumps(meta)


def test_api_key_from_a_file_the_environment_or_yaml(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(settings.API_KEY_ENV, raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("  s3cr3t  \nignored second line\n")
    assert settings.resolve_api_key(None, str(key_file)) == "s3cr3t"
    assert settings.resolve_api_key("flag", None) == "flag" and settings.resolve_api_key(None, None) is None
    monkeypatch.setenv(settings.API_KEY_ENV, "from-env")
    assert settings.resolve_api_key(None, None) == "from-env"
    with pytest.raises(UserError, match="not both"):
        settings.resolve_api_key("flag", str(key_file))
    with pytest.raises(UserError, match="cannot read the API key file"):
        settings.resolve_api_key(None, str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        settings.resolve_api_key(None, str(tmp_path / "empty"))
    # `api_key: 12345` in a serve_config.yaml arrives as an int.
    assert settings.AppConfig.from_args({"models": "a", "api_key": 12345}).api_key == "12345"
    assert requests.check_api_key("12345", {"x-api-key": "12345"}) is None
    cfg = settings.AppConfig.from_args({"models": "a", "max_pixels": "1e6", "max_queued_requests": "5"})
    assert cfg.max_pixels == 1_000_000 and cfg.max_queued_requests == 5
    with pytest.raises(UserError, match="max_pixels"):
        settings.AppConfig.from_args({"models": "a", "max_pixels": "lots"})
    assert settings.is_local_host("127.0.0.1") and not settings.is_local_host("0.0.0.0")


def test_cli_warns_when_listening_beyond_localhost_without_a_key(monkeypatch, tmp_path: Path, capsys) -> None:
    from distributed_anomaly.cli import main
    from distributed_anomaly.serve import server

    seen = []
    monkeypatch.setattr(server, "start_server", lambda *a, **k: seen.append(k) or (_ for _ in ()).throw(UserError("x")))
    monkeypatch.delenv(settings.API_KEY_ENV, raising=False)
    assert main(["serve", "--model", "ir", "--host", "0.0.0.0"]) == 2
    assert "warning: listening on 0.0.0.0 without an API key" in capsys.readouterr().err
    key_file = tmp_path / "key"
    key_file.write_text("k\n")
    assert main(["serve", "--model", "ir", "--host", "0.0.0.0", "--api-key-file", str(key_file)]) == 2
    assert "without an API key" not in capsys.readouterr().err
    assert seen[0]["request_timeout_s"] == settings.DEFAULT_REQUEST_TIMEOUT_S


def test_the_application_is_built_with_queue_limits_and_health_checks(tmp_path: Path, monkeypatch) -> None:
    from distributed_anomaly.serve import deployments

    monkeypatch.setattr(
        deployments,
        "discover_models",
        lambda specs: {"washer": ModelEntry("washer", "/ir/washer", "v1", {"image_size": SIZE})},
    )
    app = deployments.build_app(settings.AppConfig(models=["ir"], max_queued_requests=7, max_pixels=1234))
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    for deployment in (ingress, model):
        assert deployment.max_queued_requests == 7
        assert deployment.backpressure_config.retry_after_s == settings.RETRY_AFTER_S
        wait_loop = deployment._deployment_config.graceful_shutdown_wait_loop_s  # stops take 0.25 s, not 2 s
        assert wait_loop == deployments.SHUTDOWN["graceful_shutdown_wait_loop_s"] < 2.0
    config = model._deployment_config
    assert config.health_check_period_s == deployments.HEALTH_CHECK["health_check_period_s"]
    assert config.health_check_timeout_s == deployments.HEALTH_CHECK["health_check_timeout_s"]
    assert ingress.init_args[-1] == 1234 and model.init_args[-1] == 1234  # the pixel limit reaches both


@pytest.mark.parametrize(
    ("started_ray", "started_serve", "local_ray", "undone"),
    [
        (False, False, False, ["delete app"]),  # joined the caller's Ray and a running Serve: the app only
        (False, True, False, ["serve.shutdown"]),  # the caller's Ray, Serve started here
        (True, False, False, ["delete app", "ray.shutdown"]),  # joined a cluster (--address) where Serve runs
        (True, True, False, ["serve.shutdown", "ray.shutdown"]),  # joined a cluster, Serve started here
        (True, True, True, ["ray.shutdown"]),  # a local Ray of its own: stopping it stops everything on it
    ],
)
def test_stop_undoes_exactly_what_start_did(monkeypatch, started_ray, started_serve, local_ray, undone) -> None:
    """RunningServer.stop on a shared cluster removes only what start_server added (the real process in
    test_serve.py::test_cli_serves_until_interrupted takes the third path: --address, Serve already running)."""
    import ray

    from distributed_anomaly.serve.server import RunningServer

    calls: list[str] = []
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(serve, "delete", lambda name: calls.append(f"delete {name}"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    RunningServer("http://x", "app", None, [], started_ray, started_serve, local_ray).stop()
    assert calls == undone
