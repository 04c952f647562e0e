"""The Ray Serve application: a batched, multiplexed OpenVINO model deployment behind a FastAPI ingress.

    AnomalyIngress (FastAPI: /predict, /healthz, /metadata, /docs)  --DeploymentHandle-->  AnomalyModel x N

* AnomalyModel compiles each served IR once per replica, with OpenVINO threads = the replica's `num_cpus`
  (read from Ray at start-up, so a `serve deploy` config that changes `ray_actor_options` keeps them
  matched), and scores through `@serve.batch`: concurrent requests for the same model become one
  OpenVINO call. Models are loaded through Serve's model multiplexing (`@serve.multiplexed`), so with
  several replicas Serve routes a model's requests to replicas that already hold it, and a replica holds
  at most `max_models_per_replica` compiled models (LRU; 0 = all, all compiled when the replica starts).
* AnomalyIngress checks the API key and the body size, parses raw or multipart uploads, decodes the image
  (off the event loop), answers bad input with a JSON 4xx itself, and forwards good images by handle.
  It reserves no CPU (it waits on the model most of the time), so a replica of N CPUs fits an N-CPU node.

The request and response rules are in `requests` and `responses` (Ray-free, unit-tested). Build the application with
`build_app(AppConfig)` or, for `serve run` / `serve deploy`, the builder `distributed_anomaly.serve:app`.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route signatures, and Serve's ingress
# moves the methods to a class of its own, where string annotations no longer resolve.

import asyncio
import os
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from distributed_anomaly import __version__
from distributed_anomaly.inference import OpenVINOInferencer
from distributed_anomaly.postprocess import TASKS
from distributed_anomaly.serve.registry import ModelEntry, discover_models, local_ir
from distributed_anomaly.serve.requests import (
    DEFAULT_TASK,
    HTTPError,
    accumulate,
    as_rgb,
    check_api_key,
    check_content_length,
    decode_image,
    model_from_request,
    parse_body,
    parse_task,
    resolve_model,
)
from distributed_anomaly.serve.responses import metadata_response, prediction_response
from distributed_anomaly.serve.settings import API_KEY_ENV, AppConfig, threads_for_cpus

APP_NAME = "distributed_anomaly"
MODEL_DEPLOYMENT = "AnomalyModel"
INGRESS_DEPLOYMENT = "AnomalyIngress"
HEALTH_TIMEOUT_S = 10.0

# Ray Serve's own request-path settings, the replica half of its RAY_SERVE_THROUGHPUT_OPTIMIZED mode (direct
# ingress left off: it would move the HTTP port): our code runs on the replica's event loop instead of a second
# thread, the ingress calls the model over gRPC instead of Ray actor calls, and request-path log lines are
# buffered (flushed at 1000 lines or at an error) and not copied to stderr; the replica log files keep them.
# On 2 cores they raised Serve's throughput from 23 to 33 req/s (README, bench/serve_load.py). Set in the replicas'
# runtime_env; a value in the deploying process's environment wins.
REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_LOG_TO_STDERR": "0",
}


class ServerError(HTTPError):
    status = 500


class Unavailable(HTTPError):
    status = 503


def _assigned_cpus() -> float | None:
    """The CPUs Ray reserved for this replica (its `ray_actor_options.num_cpus`), None outside a worker."""
    import ray

    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # not in a Ray worker (e.g. a unit test calling the class directly)
        return None


@serve.deployment(name=MODEL_DEPLOYMENT, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class AnomalyModel:
    """Scores RGB images with the served OpenVINO IRs, in batches; returns the /predict JSON."""

    async def __init__(
        self,
        models: Mapping[str, Mapping[str, Any]],
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.05,
        max_models_per_replica: int = 0,
    ) -> None:
        self.entries = {name: ModelEntry.from_dict(d) for name, d in models.items()}
        self.names = list(self.entries)
        self.num_cpus = _assigned_cpus()
        self.num_threads = threads_for_cpus(self.num_cpus)
        torch.set_num_threads(self.num_threads)  # to_tensor's resize and the map resize run in torch
        # One worker thread: inference leaves the event loop free to queue the next batch, and batches of
        # one replica never compete for its cores.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openvino")
        self._stats = {"batches": 0, "images": 0, "max_batch": 0, "compiled": []}
        self._predict_batch.set_max_batch_size(int(max_batch_size))
        self._predict_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        capacity = max_models_per_replica or len(self.names)

        async def load(model_id: str):  # a plain function: serve.multiplexed keeps its LRU cache on it
            return await self._compile(model_id)

        self._load = serve.multiplexed(max_num_models_per_replica=capacity)(load)
        for name in self.names[:capacity]:  # compile at start-up: a broken IR fails the deploy, not a request
            await self._load(name)

    async def _compile(self, name: str):
        entry = self.entries[resolve_model(name, self.names)]  # UnknownModel for a name not served
        loop = asyncio.get_running_loop()
        inferencer = await loop.run_in_executor(
            self._pool, lambda: OpenVINOInferencer(local_ir(entry.path, entry.version), self.num_threads)
        )
        self._stats["compiled"].append(name)
        return inferencer

    async def predict(self, image: Any, task: str = DEFAULT_TASK, model: str | None = None) -> dict[str, Any]:
        """One image (RGB uint8 array or encoded bytes) -> the /predict JSON. The model is `model`, else the
        handle's `multiplexed_model_id`, else the only one served."""
        name = resolve_model(model or serve.get_multiplexed_model_id() or None, self.names)
        task = parse_task(task)
        if isinstance(image, (bytes, bytearray, memoryview)):
            rgb = await asyncio.get_running_loop().run_in_executor(None, as_rgb, image)
        else:
            rgb = as_rgb(image)
        return await self._predict_batch((name, rgb, task))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _predict_batch(self, items: list[tuple[str, Any, str]]) -> list[dict[str, Any]]:
        """Serve splits batches by multiplexed model id; grouping by name also covers handle calls that name
        the model by argument instead."""
        out: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (name, _, _) in enumerate(items):
            groups[name].append(i)
        loop = asyncio.get_running_loop()
        for name, idx in groups.items():
            inferencer = await self._load(name)
            chunk = [items[i] for i in idx]
            answers = await loop.run_in_executor(self._pool, self._score, inferencer, self.entries[name], chunk)
            for i, answer in zip(idx, answers):
                out[i] = answer
        self._stats["batches"] += 1
        self._stats["images"] += len(items)
        self._stats["max_batch"] = max(self._stats["max_batch"], len(items))
        return out  # type: ignore[return-value]

    @staticmethod
    def _score(inferencer, entry: ModelEntry, chunk: list[tuple[str, Any, str]]) -> list[dict[str, Any]]:
        images = [img for _, img, _ in chunk]
        preds = inferencer.predict(images)
        return [prediction_response(p, task, entry, img.shape) for p, (_, img, task) in zip(preds, chunk)]

    async def ping(self) -> str:
        return "ok"

    async def stats(self) -> dict[str, Any]:
        """Batching and compilation counters of this replica, and the Serve settings it runs with (tests and
        diagnosis)."""
        return {
            **self._stats,
            "num_cpus": self.num_cpus,
            "num_threads": self.num_threads,
            "pid": os.getpid(),
            "serve_env": {k: os.environ.get(k) for k in REPLICA_ENV},
        }


api = FastAPI(
    title="distributed_anomaly",
    version=__version__,
    description="Visual anomaly detection (PADIM / STFPM exported to OpenVINO) served by Ray Serve. "
    "POST an image to /predict; /metadata lists the models, their thresholds and image sizes.",
)

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: raw bytes (any Content-Type but multipart, e.g. image/png) or a "
        "multipart/form-data upload with the image in the field `file` (optional text fields `task`, "
        "`model`). PNG, JPEG, BMP, TIFF, WebP; any size and mode (grey, RGBA, 16-bit) is accepted and resized.",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "task": {"type": "string", "enum": list(TASKS)},
                        "model": {"type": "string"},
                    },
                }
            },
        },
    }
}

_ERROR_SCHEMA = {
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}
        }
    }
}
_PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "score (normalised: threshold at 0.5), raw_score, label (1 anomalous, 0 normal, null "
        "without thresholds), label_name, threshold (raw), model, version, width, height; boxes "
        "[[x1, y1, x2, y2, score]] (x2, y2 exclusive) for detection and segmentation; mask (base64 PNG, "
        "255 = anomalous, image size) for segmentation"
    },
    400: {"description": "not an image, truncated, empty, bad task, or no model chosen", **_ERROR_SCHEMA},
    401: {"description": "API key missing or wrong", **_ERROR_SCHEMA},
    404: {"description": "unknown model name", **_ERROR_SCHEMA},
    413: {"description": "body over the size limit", **_ERROR_SCHEMA},
}


def _error_response(exc: BaseException) -> JSONResponse:
    """HTTPError (also when it comes back wrapped from the model replica) -> its JSON body and status."""
    cause = getattr(exc, "cause", None)  # Ray wraps a replica's exception; the original is its cause
    err = cause if isinstance(cause, HTTPError) else exc
    status = getattr(err, "status", 500)
    message = getattr(err, "message", None) or str(err)
    return JSONResponse({"error": message, "status": status}, status_code=status)


@api.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
    return _error_response(exc)


@api.exception_handler(StarletteHTTPException)
async def _starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        {"error": str(exc.detail), "status": exc.status_code},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


@serve.deployment(name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class AnomalyIngress:
    """HTTP front: validation and decoding here, scoring in AnomalyModel (through its handle)."""

    def __init__(
        self,
        model: DeploymentHandle,
        models: Mapping[str, Mapping[str, Any]],
        max_body_bytes: int,
        api_key: str | None = None,
        settings: dict | None = None,
    ) -> None:
        self.model = model
        self.entries = {name: ModelEntry.from_dict(d) for name, d in models.items()}
        self.names = list(self.entries)
        self.max_body_bytes = int(max_body_bytes)
        # An explicit key wins; else the replica's environment (e.g. runtime_env env_vars in a deploy config).
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self.settings = {
            **(settings or {}),
            "max_body_bytes": self.max_body_bytes,
            "api_key_required": self.api_key is not None,
        }
        self._handles: dict[str, DeploymentHandle] = {}

    def _model_handle(self, name: str) -> DeploymentHandle:
        if name not in self._handles:
            self._handles[name] = self.model.options(multiplexed_model_id=name)
        return self._handles[name]

    async def _read_body(self, request: Request) -> bytes:
        check_content_length(request.headers.get("content-length"), self.max_body_bytes)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # bounded even when the length was not announced (chunked)
            size = accumulate(chunks, chunk, size, self.max_body_bytes)
        return b"".join(chunks)

    @api.get("/healthz", summary="liveness: the ingress and a model replica answer")
    async def healthz(self) -> JSONResponse:
        async def ping() -> str:
            return await self.model.ping.remote()

        try:
            await asyncio.wait_for(ping(), timeout=HEALTH_TIMEOUT_S)
        except Exception as exc:  # any failure to reach a model replica means "not ready"
            return JSONResponse(
                {"status": "unavailable", "error": f"model deployment: {type(exc).__name__}"}, status_code=503
            )
        return JSONResponse({"status": "ok", "models": self.names})

    @api.get("/metadata", summary="served models: names, versions, backbones, thresholds, image sizes")
    async def metadata(self, request: Request) -> dict[str, Any]:
        check_api_key(self.api_key, request.headers)
        return metadata_response(self.entries, self.settings)

    @api.post("/predict", summary="score one image", openapi_extra=_PREDICT_BODY, responses=_PREDICT_RESPONSES)
    async def predict_http(
        self,
        request: Request,
        task: str | None = Query(None, description=f"one of {', '.join(TASKS)} (default {DEFAULT_TASK})"),
        model: str | None = Query(
            None, description="served model name (or header X-Model); optional when one model is served"
        ),
        x_api_key: str | None = Header(
            None, description="API key, when the server requires one (or Authorization: Bearer KEY)"
        ),  # for the docs; read below
    ) -> JSONResponse:
        check_api_key(self.api_key, request.headers)
        body = await self._read_body(request)
        upload = parse_body(body, request.headers.get("content-type"))
        task_name = parse_task(task or upload.fields.get("task"))
        requested = model_from_request(request.query_params, request.headers) or upload.fields.get("model")
        name = resolve_model(requested, self.names)
        image = await asyncio.get_running_loop().run_in_executor(None, decode_image, upload.data)
        # Plain JSON types already (prediction_response): skip FastAPI's jsonable_encoder walk of the answer.
        return JSONResponse(await self._forward(name, image, task_name))

    async def _forward(self, name: str, image: Any, task: str) -> dict[str, Any]:
        try:
            return await self._model_handle(name).predict.remote(image, task, name)
        except Exception as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(exc, HTTPError) or isinstance(cause, HTTPError):
                raise
            kind = type(cause or exc).__name__
            if "BackPressure" in kind or "Unavailable" in kind:
                raise Unavailable(f"model deployment busy or unavailable ({kind}); retry") from None
            raise ServerError(f"scoring failed: {kind}: {cause or exc}") from None

    async def predict(self, image: Any, task: str = DEFAULT_TASK, model: str | None = None) -> dict[str, Any]:
        """Python use through the application's handle: `serve.run(app).predict.remote(array, task, model)`.

        `image` is an RGB uint8 array (grey/RGBA accepted) or encoded bytes; errors raise `requests.HTTPError`s.
        """
        name = resolve_model(model, self.names)
        rgb = await asyncio.get_running_loop().run_in_executor(None, as_rgb, image)
        return await self._model_handle(name).predict.remote(rgb, parse_task(task), name)


def build_app(config: AppConfig | Mapping[str, Any]):
    """AppConfig (or the builder's argument dict) -> the bound Serve application (ingress -> model)."""
    cfg = config if isinstance(config, AppConfig) else AppConfig.from_args(config)
    cfg.validate()
    entries = discover_models(cfg.models)
    models = {name: e.to_dict() for name, e in entries.items()}
    runtime_env = {"env_vars": {k: os.environ.get(k, v) for k, v in REPLICA_ENV.items()}}
    model = AnomalyModel.options(
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "runtime_env": runtime_env},
        max_ongoing_requests=max(32, 4 * cfg.max_batch_size),
    ).bind(models, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.max_models_per_replica)
    settings = {
        "replicas": cfg.replicas,
        "cpus_per_replica": cfg.cpus_per_replica,
        "max_batch_size": cfg.max_batch_size,
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        "version": __version__,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    ingress = AnomalyIngress.options(ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env})
    return ingress.bind(model, models, cfg.max_body_bytes, cfg.api_key, settings)


def app(args: dict[str, Any]):
    """Application builder for `serve run distributed_anomaly.serve:app models=IR1,IR2` and `serve deploy`
    (see cluster/serve_config.yaml); the keys are AppConfig's fields."""
    return build_app(AppConfig.from_args(args))
