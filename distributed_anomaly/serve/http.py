"""The FastAPI application the ingress deployment serves, and its error answers (FastAPI only, no Ray).

Every error is JSON {"error", "status", "request_id"}: the id is the one Serve's proxy gives the request (its
X-Request-ID answer header, and the replica log lines); what went wrong inside (actor ids, node addresses,
storage URIs, stack traces) goes to the log, never to the client.
"""

# No `from __future__ import annotations`: FastAPI resolves the handlers' signatures.

import logging
import uuid
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distributed_anomaly import __version__
from distributed_anomaly.serve.requests import HTTPError

REQUEST_ID_HEADER = "x-request-id"  # Serve's proxy sets it on every request and answer
# Ray Serve logs to the replica's log file, each line with the request id of the request being served.
logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="distributed_anomaly",
    version=__version__,
    description="Visual anomaly detection (PADIM / STFPM exported to OpenVINO) served by Ray Serve. "
    "POST an image to /predict; /metadata lists the models, their thresholds and image sizes.",
)


def request_id(request: Request) -> str:
    """The id Serve's proxy gave this request (also its X-Request-ID answer header and in the replica logs)."""
    return request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


def _error_response(request: Request, status: int, message: str, headers: Mapping[str, str] | None = None):
    """Every error answer: JSON with the message and the request id; never a stack trace or a Ray internal."""
    body = {"error": message, "status": status, "request_id": request_id(request)}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


@api.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
    cause = getattr(exc, "cause", None)  # Ray's wrapper of a replica's error subclasses it; answer the original
    err = cause if isinstance(cause, HTTPError) else exc
    return _error_response(request, err.status, err.message, getattr(err, "headers", None))


@api.exception_handler(StarletteHTTPException)
async def _starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_response(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    rid = request_id(request)
    logger.error("request %s failed", rid, exc_info=exc)
    return _error_response(request, 500, f"internal error (request id {rid}; the server log has the details)")
