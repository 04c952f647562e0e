"""The HTTP front of the application: AnomalyIngress (FastAPI: /predict, /healthz, /metadata, /docs).

It checks the API key and the body size, parses raw or multipart uploads, decodes the image (off the event loop;
pixel limit from the header, documented formats only, large JPEGs at reduced scale), answers bad input with a
JSON 4xx itself (serve.http: with the request id, nothing internal), and forwards good images, their own size
and any per-request threshold to AnomalyModel by handle. It counts every request by model, task and status
(serve.metrics). It reserves no CPU (it waits on the model most of the time), so a replica of N CPUs fits an
N-CPU node.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route signatures, and Serve's ingress
# moves the methods to a class of its own, where string annotations no longer resolve.

import asyncio
import os
import time
from collections.abc import Mapping
from typing import Any

from fastapi import Header, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from distributed_anomaly.data.sizes import canonical
from distributed_anomaly.postprocess import TASKS
from distributed_anomaly.serve.http import api, logger, request_id
from distributed_anomaly.serve.metrics import IngressMetrics
from distributed_anomaly.serve.openapi import PREDICT_BODY, PREDICT_RESPONSES
from distributed_anomaly.serve.operating import parse_threshold
from distributed_anomaly.serve.registry import ModelEntry
from distributed_anomaly.serve.requests import (
    DEFAULT_TASK,
    HTTPError,
    ServerError,
    Unavailable,
    accumulate,
    array_for_model,
    check_api_key,
    check_content_length,
    decode_for_model,
    model_from_request,
    parse_body,
    parse_task,
    resolve_model,
)
from distributed_anomaly.serve.responses import metadata_response
from distributed_anomaly.serve.settings import API_KEY_ENV, api_key_text

INGRESS_DEPLOYMENT = "AnomalyIngress"
HEALTH_TIMEOUT_S = 10.0


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
        self.metrics = IngressMetrics()

    def _size(self, name: str) -> Any:
        size = self.entries[name].info.get("image_size")
        return canonical(size) if size else None

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
        threshold: str | None = Query(  # parsed by us: a bad value is our JSON 400, not FastAPI's 422
            None, description="this request's raw image and pixel threshold, instead of the served one"
        ),
        x_api_key: str | None = Header(
            None, description="API key, when the server requires one (or Authorization: Bearer KEY)"
        ),  # for the docs; read below
    ) -> JSONResponse:
        started, tags = time.perf_counter(), [None, None]  # [model, task] once known, for the metrics
        status = 500
        try:
            answer = await self._predict_request(request, task, threshold, tags)
            status = 200
            # Plain JSON types already (prediction_response): skip FastAPI's jsonable_encoder walk of the answer.
            return JSONResponse(answer)
        except HTTPError as exc:
            cause = getattr(exc, "cause", None)
            status = (cause if isinstance(cause, HTTPError) else exc).status
            raise
        finally:
            self.metrics.record(tags[0], tags[1], status, 1000.0 * (time.perf_counter() - started))

    async def _predict_request(self, request: Request, task: str | None, threshold: str | None, tags: list) -> dict:
        check_api_key(self.api_key, request.headers)
        body = await self._read_body(request)
        upload = parse_body(body, request.headers.get("content-type"))
        tags[1] = task_name = parse_task(task or upload.fields.get("task"))
        requested = model_from_request(request.query_params, request.headers) or upload.fields.get("model")
        tags[0] = name = resolve_model(requested, self.names)
        limit = parse_threshold(upload.fields.get("threshold") if threshold is None else threshold)
        image, shape = await asyncio.get_running_loop().run_in_executor(
            None, decode_for_model, upload.data, self.max_pixels, self._size(name)
        )
        return await self._forward(name, image, task_name, shape, request_id(request), limit)

    async def _forward(
        self, name: str, image: Any, task: str, shape: tuple, rid: str, threshold: float | None = None
    ) -> dict[str, Any]:
        """Score through the model deployment. What comes back from Ray (actor ids, node addresses, stack
        traces) goes to this replica's log under the request id; the client gets the status and the id."""
        try:
            return await self._model_handle(name).predict.remote(image, task, name, shape, threshold)
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

    async def predict(
        self, image: Any, task: str = DEFAULT_TASK, model: str | None = None, threshold: float | None = None
    ) -> dict[str, Any]:
        """Python use through the application's handle: `serve.run(app).predict.remote(array, task, model)`.

        `image` is an RGB uint8 array (grey/RGBA accepted) or encoded bytes; `threshold` this call's own raw
        threshold; errors raise `requests.HTTPError`s. Counted in the metrics like HTTP requests."""
        started, status, name, task_name = time.perf_counter(), 500, None, None
        try:
            task_name = parse_task(task)
            name = resolve_model(model, self.names)
            limit = parse_threshold(threshold)
            small, shape = await asyncio.get_running_loop().run_in_executor(
                None, array_for_model, image, self.max_pixels, self._size(name)
            )
            answer = await self._model_handle(name).predict.remote(small, task_name, name, shape, limit)
            status = 200
            return answer
        except HTTPError as exc:
            status = exc.status
            raise
        finally:
            self.metrics.record(name, task_name, status, 1000.0 * (time.perf_counter() - started))
