"""The Ray Serve application: a batched, multiplexed OpenVINO model deployment behind a FastAPI ingress.

    AnomalyIngress (FastAPI: /predict, /healthz, /metadata, /docs)  --DeploymentHandle-->  AnomalyModel x N

* AnomalyModel compiles each served IR once per replica, with OpenVINO threads = the replica's `num_cpus`
  (read from Ray at start-up, so a `serve deploy` config that changes `ray_actor_options` keeps them
  matched), and scores through `@serve.batch`: concurrent requests for the same model become one
  OpenVINO call. Models are loaded through Serve's model multiplexing (`@serve.multiplexed`), so with
  several replicas Serve routes a model's requests to replicas that already hold it, and a replica holds
  at most `max_models_per_replica` compiled models (LRU; 0 = all, all compiled when the replica starts).
  An image that fails inside a batch fails only its own request (the batch is re-scored image by image), and
  Serve's health check runs a tiny inference (`check_health`).
* AnomalyIngress checks the API key and the body size, parses raw or multipart uploads, decodes the image
  (off the event loop; pixel limit from the header, documented formats only, large JPEGs at reduced scale),
  answers bad input with a JSON 4xx itself (serve.http: with the request id, nothing internal), and forwards
  good images and their own size by handle. Both deployments bound their queues (503 with Retry-After).
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

import numpy as np
import torch
from fastapi import Header, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from distributed_anomaly import __version__
from distributed_anomaly.data.images import to_tensor
from distributed_anomaly.data.sizes import canonical
from distributed_anomaly.inference import OpenVINOInferencer
from distributed_anomaly.postprocess import TASKS
from distributed_anomaly.runner import predict_images
from distributed_anomaly.serve.http import api, logger, request_id
from distributed_anomaly.serve.openapi import PREDICT_BODY, PREDICT_RESPONSES
from distributed_anomaly.serve.registry import ModelEntry, discover_models, local_ir
from distributed_anomaly.serve.requests import (
    DEFAULT_TASK,
    HTTPError,
    ScoringFailed,
    ServerError,
    Unavailable,
    accumulate,
    as_rgb,
    check_api_key,
    check_content_length,
    decode_upload,
    model_from_request,
    parse_body,
    parse_task,
    resolve_model,
)
from distributed_anomaly.serve.responses import metadata_response, prediction_response
from distributed_anomaly.serve.settings import (
    API_KEY_ENV,
    RETRY_AFTER_S,
    AppConfig,
    api_key_text,
    threads_for_cpus,
)

APP_NAME = "distributed_anomaly"
MODEL_DEPLOYMENT = "AnomalyModel"
INGRESS_DEPLOYMENT = "AnomalyIngress"
HEALTH_TIMEOUT_S = 10.0
# Serve's replica health check: every 10 s (Serve's default) a tiny inference; 3 failures in a row and Serve
# replaces the replica. The timeout leaves room for a full batch queued ahead of the probe on 1 CPU.
HEALTH_CHECK = {"health_check_period_s": 10.0, "health_check_timeout_s": 60.0}

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
        max_pixels: int | None = None,
        precision: str | None = None,
    ) -> None:
        self.precision = precision  # OpenVINO inference precision; None: each export's own
        self.entries = {name: ModelEntry.from_dict(d) for name, d in models.items()}
        self.names = list(self.entries)
        self.max_pixels = max_pixels  # for encoded bytes sent through the handle (HTTP bodies: the ingress)
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
            self._pool,
            lambda: OpenVINOInferencer(local_ir(entry.path, entry.version), self.num_threads, precision=self.precision),
        )
        self._stats["compiled"].append(name)
        return inferencer

    async def predict(
        self, image: Any, task: str = DEFAULT_TASK, model: str | None = None, size: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """One image (RGB uint8 array or encoded bytes) -> the /predict JSON. The model is `model`, else the
        handle's `multiplexed_model_id`, else the only one served. `size` is the image's own (H, W) when the
        array was decoded at reduced scale (the ingress does for large JPEGs); answers are in that size."""
        name = resolve_model(model or serve.get_multiplexed_model_id() or None, self.names)
        task = parse_task(task)
        if isinstance(image, (bytes, bytearray, memoryview)):
            rgb = await asyncio.get_running_loop().run_in_executor(None, as_rgb, image, self.max_pixels)
        else:
            rgb = as_rgb(image, self.max_pixels)
        shape = tuple(int(v) for v in size) if size is not None else rgb.shape[:2]
        answer = await self._predict_batch((name, rgb, task, shape))
        if isinstance(answer, BaseException):  # this image's own failure (see _score); the batch went on
            raise answer
        return answer

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _predict_batch(self, items: list[tuple[str, Any, str, tuple]]) -> list[dict[str, Any] | HTTPError]:
        """Serve splits batches by multiplexed model id; grouping by name also covers handle calls that name
        the model by argument instead. A failure is returned in the place of the requests it concerns (a
        model that cannot load: its group; an image that cannot be scored: that image) and raised by predict."""
        out: list[dict[str, Any] | HTTPError | None] = [None] * len(items)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (name, _, _, _) in enumerate(items):
            groups[name].append(i)
        loop = asyncio.get_running_loop()
        for name, idx in groups.items():
            chunk = [items[i] for i in idx]
            try:
                inferencer = await self._load(name)
                answers = await loop.run_in_executor(self._pool, self._score, inferencer, self.entries[name], chunk)
            except Exception:
                logger.exception("model %s could not score a batch of %d", name, len(chunk))
                answers = [ScoringFailed(f"model {name} is unavailable on this replica")] * len(chunk)
            for i, answer in zip(idx, answers):
                out[i] = answer
        self._stats["batches"] += 1
        self._stats["images"] += len(items)
        self._stats["max_batch"] = max(self._stats["max_batch"], len(items))
        return out  # type: ignore[return-value]

    def _score(self, inferencer, entry: ModelEntry, chunk: list[tuple[str, Any, str, tuple]]) -> list[dict | HTTPError]:
        """One OpenVINO call for the chunk; if it fails, each image alone, so a bad one fails only itself."""
        try:
            return self._answers(inferencer, entry, chunk)
        except Exception:
            if len(chunk) == 1:
                logger.exception("scoring one image failed (model %s)", entry.name)
                return [ScoringFailed("scoring this image failed; the server log has the details")]
        out: list[dict | HTTPError] = []
        for item in chunk:
            out += self._score(inferencer, entry, [item])
        return out

    @staticmethod
    def _answers(inferencer, entry: ModelEntry, chunk: list[tuple[str, Any, str, tuple]]) -> list[dict[str, Any]]:
        preds = predict_images(inferencer, [img for _, img, _, _ in chunk], [shape for *_, shape in chunk])
        return [prediction_response(p, task, entry, shape) for p, (_, _, task, shape) in zip(preds, chunk)]

    async def check_health(self) -> None:
        """Serve's periodic replica check: a tiny inference (a black image) through a compiled model. Raising
        marks the replica unhealthy; Serve replaces it."""
        name = self._stats["compiled"][-1] if self._stats["compiled"] else self.names[0]
        inferencer = await self._load(name)
        probe = to_tensor(np.zeros((8, 8, 3), dtype=np.uint8), inferencer.image_size)
        maps = await asyncio.get_running_loop().run_in_executor(self._pool, inferencer.raw_maps, probe)
        if maps.shape[0] != 1 or not np.isfinite(maps).all():
            raise RuntimeError(f"health check: model {name} gave no finite anomaly map")

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
        max_pixels: int | None = None,
    ) -> None:
        self.model = model
        self.entries = {name: ModelEntry.from_dict(d) for name, d in models.items()}
        self.names = list(self.entries)
        self.max_body_bytes = int(max_body_bytes)
        self.max_pixels = max_pixels
        # An explicit key wins; else the replica's environment (e.g. runtime_env env_vars in a deploy config).
        self.api_key = api_key_text(api_key) or api_key_text(os.environ.get(API_KEY_ENV))
        self.settings = {
            **(settings or {}),
            "max_body_bytes": self.max_body_bytes,
            "max_pixels": max_pixels,
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

    @api.post("/predict", summary="score one image", openapi_extra=PREDICT_BODY, responses=PREDICT_RESPONSES)
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
        size = self.entries[name].info.get("image_size")
        image, shape = await asyncio.get_running_loop().run_in_executor(
            None, decode_upload, upload.data, self.max_pixels, canonical(size) if size else None
        )
        # Plain JSON types already (prediction_response): skip FastAPI's jsonable_encoder walk of the answer.
        return JSONResponse(await self._forward(name, image, task_name, shape, request_id(request)))

    async def _forward(self, name: str, image: Any, task: str, shape: tuple, rid: str) -> dict[str, Any]:
        """Score through the model deployment. What comes back from Ray (actor ids, node addresses, stack
        traces) goes to this replica's log under the request id; the client gets the status and the id."""
        try:
            return await self._model_handle(name).predict.remote(image, task, name, shape)
        except Exception as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, HTTPError):
                raise cause from None
            if isinstance(exc, HTTPError):
                raise
            kind = type(cause or exc).__name__
            logger.error("request %s: model deployment call failed", rid, exc_info=exc)
            if "BackPressure" in kind or "Unavailable" in kind:
                raise Unavailable(f"the model deployment is busy or unavailable (request id {rid}); retry") from None
            raise ServerError(f"scoring failed (request id {rid}; the server log has the details)") from None

    async def predict(self, image: Any, task: str = DEFAULT_TASK, model: str | None = None) -> dict[str, Any]:
        """Python use through the application's handle: `serve.run(app).predict.remote(array, task, model)`.

        `image` is an RGB uint8 array (grey/RGBA accepted) or encoded bytes; errors raise `requests.HTTPError`s.
        """
        name = resolve_model(model, self.names)
        rgb = await asyncio.get_running_loop().run_in_executor(None, as_rgb, image, self.max_pixels)
        return await self._model_handle(name).predict.remote(rgb, parse_task(task), name)


def build_app(config: AppConfig | Mapping[str, Any]):
    """AppConfig (or the builder's argument dict) -> the bound Serve application (ingress -> model)."""
    cfg = config if isinstance(config, AppConfig) else AppConfig.from_args(config)
    cfg.validate()
    entries = discover_models(cfg.models)
    models = {name: e.to_dict() for name, e in entries.items()}
    runtime_env = {"env_vars": {k: os.environ.get(k, v) for k, v in REPLICA_ENV.items()}}
    queue = {"max_queued_requests": cfg.max_queued_requests, "backpressure_config": {"retry_after_s": RETRY_AFTER_S}}
    model = AnomalyModel.options(
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "runtime_env": runtime_env},
        max_ongoing_requests=max(32, 4 * cfg.max_batch_size),
        **queue,
        **HEALTH_CHECK,
    ).bind(
        models,
        cfg.max_batch_size,
        cfg.batch_wait_timeout_s,
        cfg.max_models_per_replica,
        cfg.max_pixels,
        precision=cfg.precision,
    )
    settings = {
        "replicas": cfg.replicas,
        "cpus_per_replica": cfg.cpus_per_replica,
        "max_batch_size": cfg.max_batch_size,
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        "max_queued_requests": cfg.max_queued_requests,
        "version": __version__,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    ingress = AnomalyIngress.options(ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env}, **queue)
    return ingress.bind(model, models, cfg.max_body_bytes, cfg.api_key, settings, cfg.max_pixels)


def app(args: dict[str, Any]):
    """Application builder for `serve run distributed_anomaly.serve:app models=IR1,IR2` and `serve deploy`
    (see cluster/serve_config.yaml); the keys are AppConfig's fields."""
    return build_app(AppConfig.from_args(args))
