"""What a request means: HTTP errors, model and task selection, the API key, body limits and parsing.

Ray-free, so every rule is unit-tested without a cluster and is the same for the HTTP endpoint and the
deployment handle. Errors that map to an HTTP status are `HTTPError`s (also `UserError`s, so the CLI
prints them without a stack trace).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from distributed_anomaly.data.decode import load_image, shrink_to
from distributed_anomaly.data.sizes import ImageSize
from distributed_anomaly.errors import ImageReadError, ImageTooLargeError, UserError
from distributed_anomaly.postprocess import DEFAULT_TASK, TASKS
from distributed_anomaly.serve.settings import KEY_HASH_PREFIX, RETRY_AFTER_S

API_KEY_HEADER = "x-api-key"
MODEL_HEADER = "x-model"
SERVE_MODEL_HEADER = "serve_multiplexed_model_id"  # Ray Serve's own multiplexing header, also accepted


class HTTPError(UserError):
    """A request the server refuses, with the HTTP status to answer."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}

    def __reduce__(self):  # keep the subclass and message when Ray pickles it between processes
        return (type(self), (self.message,))


class BadRequest(HTTPError):
    status = 400


class Unauthorized(HTTPError):
    status = 401


class UnknownModel(HTTPError):
    status = 404


class PayloadTooLarge(HTTPError):
    status = 413


class ServerError(HTTPError):
    status = 500


class Unavailable(HTTPError):
    status = 503
    headers: ClassVar[dict[str, str]] = {"Retry-After": str(RETRY_AFTER_S)}


class ScoringFailed(HTTPError):
    """One image of a batch could not be scored: only its own request fails (details in the replica log)."""

    status = 500


def parse_task(value: str | None) -> str:
    task = (value or DEFAULT_TASK).strip().lower()
    if task not in TASKS:
        raise BadRequest(f"unknown task {value!r}; choose one of: {', '.join(TASKS)}")
    return task


def resolve_model(requested: str | None, names: Sequence[str]) -> str:
    """The model a request asked for; with one model served the name may be left out."""
    if requested:
        if requested not in names:
            raise UnknownModel(f"unknown model {requested!r}; served models: {', '.join(names)}")
        return requested
    if len(names) == 1:
        return names[0]
    raise BadRequest(
        f"{len(names)} models are served; choose one with ?model=NAME or the header "
        f"X-Model: NAME (one of: {', '.join(names)})"
    )


def model_from_request(query: Mapping[str, str], headers: Mapping[str, str]) -> str | None:
    """`?model=` first, then the X-Model header, then Serve's multiplexing header."""
    for value in (query.get("model"), headers.get(MODEL_HEADER), headers.get(SERVE_MODEL_HEADER)):
        if value:
            return value.strip()
    return None


def check_api_key(expected: str | None, headers: Mapping[str, str]) -> None:
    """X-API-Key: KEY or Authorization: Bearer KEY, compared in constant time; no key configured: open. A key
    configured as "sha256:HEX" (settings.hashed_api_key) is compared by its hash."""
    if not expected:
        return
    given = headers.get(API_KEY_HEADER)
    if not given:
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    if given and expected.startswith(KEY_HASH_PREFIX):
        given = KEY_HASH_PREFIX + hashlib.sha256(given.encode()).hexdigest()
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("missing or wrong API key (send the header X-API-Key: KEY or Authorization: Bearer KEY)")


def check_content_length(value: str | None, limit: int) -> None:
    """Refuse an announced body over the limit before reading it."""
    if value is None:
        return
    try:
        length = int(value)
    except ValueError:
        raise BadRequest(f"invalid Content-Length {value!r}") from None
    if length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")


def accumulate(chunks: list[bytes], chunk: bytes, size: int, limit: int) -> int:
    """Add one streamed chunk, refusing once the total passes `limit`; returns the new total."""
    size += len(chunk)
    if size > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    chunks.append(chunk)
    return size


@dataclass
class Upload:
    """The image bytes of a request and any form fields sent alongside them."""

    data: bytes
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None


def parse_body(body: bytes, content_type: str | None) -> Upload:
    """Raw image bytes (any Content-Type but multipart) or a multipart/form-data upload -> Upload.

    In a multipart body the image is the part named `file` or `image`, else the first part with a file name;
    other parts are text fields (e.g. `task`, `model`).
    """
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data":
        if not body:
            raise BadRequest("empty request body: send the image bytes, or a multipart form with a file")
        return Upload(body)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    parts = _parse_multipart(body, boundary)
    named = [i for i, p in enumerate(parts) if p[0] in ("file", "image")]
    with_filename = [i for i, p in enumerate(parts) if p[1] is not None]
    if not named and not with_filename:
        raise BadRequest("the multipart form has no file part: send the image as the field 'file'")
    chosen = (named or with_filename)[0]
    fields = {
        p[0]: p[2].decode("utf-8", errors="replace")
        for i, p in enumerate(parts)
        if i != chosen and p[0] and p[1] is None
    }
    name, filename, data = parts[chosen]
    if not data:
        raise BadRequest(f"the uploaded file {filename or name!r} is empty (zero bytes)")
    return Upload(data, fields, filename)


def _parse_multipart(body: bytes, boundary: bytes) -> list[tuple[str | None, str | None, bytes]]:
    """(field name, file name or None, data) per part, with python-multipart's streaming parser."""
    parts: list[tuple[str | None, str | None, bytes]] = []
    state: dict[str, Any] = {}

    def on_part_begin() -> None:
        state.update(headers={}, data=[], field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"].decode("latin-1")
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])

    def on_part_end() -> None:
        _, disp = parse_options_header(state["headers"].get("content-disposition", ""))
        name, filename = disp.get(b"name"), disp.get(b"filename")
        parts.append(
            (
                name.decode("utf-8", "replace") if name is not None else None,
                filename.decode("utf-8", "replace") if filename is not None else None,
                b"".join(state["data"]),
            )
        )

    callbacks = dict(
        on_part_begin=on_part_begin,
        on_header_field=on_header_field,
        on_header_value=on_header_value,
        on_header_end=on_header_end,
        on_part_data=on_part_data,
        on_part_end=on_part_end,
    )
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    if not parts:
        raise BadRequest("malformed multipart body: no parts (does the boundary match the Content-Type?)")
    return parts


def decode_upload(
    data: bytes, max_pixels: int | None = None, target_size: ImageSize | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image bytes -> (RGB uint8 pixels, the image's own (H, W)) through `data.images.load_image`: 413
    when the header declares more than `max_pixels` (nothing decoded), 400 when undecodable or not one of the
    documented formats. A large JPEG comes back decoded at reduced scale for the model's `target_size`."""
    if not data:
        raise BadRequest("empty image: zero bytes")
    try:
        image, shape = load_image(data, max_pixels=max_pixels, target_size=target_size)
    except ImageTooLargeError as exc:
        raise PayloadTooLarge(str(exc).replace("image <bytes> is ", "image is ", 1)) from None
    except ImageReadError as exc:
        raise BadRequest(f"not a decodable image ({len(data)} bytes): {_reason(exc)}") from None
    except Exception as exc:  # a decoder bug on hostile input must still be a 400, not a dead worker
        raise BadRequest(f"not a decodable image ({len(data)} bytes): {type(exc).__name__}") from None
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise BadRequest(f"image has no pixels ({image.shape[1]} x {image.shape[0]})")
    return image, shape


def decode_for_model(
    data: bytes, max_pixels: int | None, image_size: ImageSize | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """What the ingress sends the model replica: the decoded image at most at the model's size (uint8), and the
    image's own (H, W), in which the answer's boxes and mask are given."""
    image, shape = decode_upload(data, max_pixels, image_size)
    return (shrink_to(image, image_size) if image_size else image), shape


def array_for_model(
    image: Any, max_pixels: int | None, image_size: ImageSize | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """decode_for_model for what the handle accepts (as_rgb): (pixels at most at the model's size, own (H, W))."""
    rgb = as_rgb(image, max_pixels)
    return (shrink_to(rgb, image_size) if image_size else rgb), rgb.shape[:2]


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 at full size (any mode or size, as `data.images.read_image`)."""
    return decode_upload(data, max_pixels)[0]


def _reason(exc: Exception) -> str:
    """PIL's message without our '<bytes>' prefix or its BytesIO repr (an address means nothing to a client)."""
    text = str(exc).removeprefix("cannot decode image <bytes>: ")
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text)


def as_rgb(image: Any, max_pixels: int | None = None) -> np.ndarray:
    """What the deployment handle accepts -> RGB uint8 (H, W, 3): encoded bytes, or a uint8 array that is
    (H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA (alpha dropped)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), max_pixels)
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise BadRequest(f"image arrays must be uint8 (RGB 0-255), got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadRequest(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {arr.shape}")
    if max_pixels is not None and arr.shape[0] * arr.shape[1] > max_pixels:
        raise PayloadTooLarge(f"image is {arr.shape[1]} x {arr.shape[0]}, over the limit of {max_pixels} pixels")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])
