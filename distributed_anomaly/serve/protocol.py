"""The Serve application's pure logic: model registry, request parsing and response building, free of Ray.

Everything that decides what a request means or what a response says lives here, so it is unit-tested
without a cluster and is the same for the HTTP endpoint and the deployment handle. Errors that map to an
HTTP status are `HTTPError`s (also `UserError`s, so the CLI prints them without a stack trace).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distributed_anomaly import storage
from distributed_anomaly.errors import ImageReadError, UserError
from distributed_anomaly.postprocess import TASKS

DEFAULT_TASK = "segmentation"
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024  # 20 MB: a 12-megapixel PNG fits, a stray video does not
API_KEY_ENV = "DISTRIBUTED_ANOMALY_API_KEY"
API_KEY_HEADER = "x-api-key"
MODEL_HEADER = "x-model"
SERVE_MODEL_HEADER = "serve_multiplexed_model_id"  # Ray Serve's own multiplexing header, also accepted
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SCORE_THRESHOLD = 0.5  # normalised scores always put the image threshold here (postprocess.py)
_VERSION_FILES = ("metadata.json", "postprocess.json", "model.xml")


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


# ----------------------------------------------------------------------------------------------------------
# Model registry: IR folders given on the command line, named by folder.


@dataclass(frozen=True)
class ModelEntry:
    """One servable IR folder: a request names it by `name`; `version` identifies the exact export."""

    name: str
    path: str
    version: str
    info: dict = field(default_factory=dict)  # the metadata fields /metadata shows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelEntry:
        return cls(str(d["name"]), str(d["path"]), str(d["version"]), dict(d.get("info") or {}))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "path": self.path, **self.info}


def model_version(ir_dir: Path) -> str:
    """12 hex digits of SHA-256 over metadata, thresholds and graph: every re-export changes it (exported_at),
    copies of one export share it. model.bin is left out so that start-up does not read gigabytes."""
    h = hashlib.sha256()
    for name in _VERSION_FILES:
        h.update(name.encode())
        h.update((ir_dir / name).read_bytes())
    return h.hexdigest()[:12]


def check_ir_files(where: str | Path, present: set[str]) -> None:
    """An export folder (local or in storage) must hold every file `export` writes."""
    from distributed_anomaly.export import IR_FILES

    missing = [n for n in IR_FILES if n not in present]
    if missing:
        raise UserError(f"OpenVINO export {where} is missing {', '.join(missing)} (re-run `export`)")


def describe_ir(ir_dir: Path) -> dict[str, Any]:
    """The metadata a client needs to interpret answers, read from an export's metadata.json."""
    from distributed_anomaly.export import FORMAT, METADATA
    from distributed_anomaly.fileio import read_json

    try:
        meta = read_json(ir_dir / METADATA)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {ir_dir / METADATA}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{ir_dir / METADATA} is not metadata written by `export`")
    keys = ("model", "backbone", "image_size", "precision", "task", "image_threshold", "pixel_threshold",
            "threshold_source", "norm_min", "norm_max", "exported_at", "version")
    info = {k: meta.get(k) for k in keys}
    info["package_version"] = info.pop("version")
    return info


def _split_named(spec: str) -> tuple[str | None, str]:
    """'NAME=PATH' -> (NAME, PATH); a plain path (even one containing '=') -> (None, PATH)."""
    name, sep, path = spec.partition("=")
    if sep and MODEL_NAME_RE.match(name) and not Path(spec).exists():
        return name, path
    return None, spec


def discover_models(specs: Iterable[str | os.PathLike]) -> dict[str, ModelEntry]:
    """IR folders, folders of IR folders, or NAME=IR_DIR -> {name: entry}, in the order given.

    A model is named after its folder (`ir/washer_padim` -> `washer_padim`) unless NAME= is given; a
    factory serving one model per product names the folders after the products. Duplicate or unusable
    names are refused here, at start-up, rather than by a confusing 404 later.
    """
    from distributed_anomaly.predict import is_ir_dir

    entries: dict[str, ModelEntry] = {}
    for spec in specs:
        name, raw = _split_named(os.fspath(spec))
        if storage.is_uri(raw):  # one IR folder in shared storage: every replica, on any node, fetches it
            uri = storage.normalize(raw)
            model_name = name or storage.split_last(uri)[1]
            _check_name(model_name, uri, entries)
            entries[model_name] = _remote_entry(model_name, uri)
            continue
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise UserError(f"--model {raw}: no such folder (expected an IR folder written by `export`)")
        if is_ir_dir(path):
            found = [(name or path.resolve().name, path)]
        else:
            if name is not None:
                raise UserError(f"--model {spec}: {raw} is not an IR folder (no model.xml); NAME= names one export")
            found = [(p.name, p) for p in sorted(path.iterdir()) if p.is_dir() and is_ir_dir(p)]
            if not found:
                raise UserError(f"--model {raw}: neither an IR folder (model.xml) nor a folder of IR folders")
        for model_name, ir in found:
            ir = ir.resolve()
            _check_name(model_name, str(ir), entries)
            check_ir_files(ir, {p.name for p in ir.iterdir() if p.is_file()})
            entries[model_name] = ModelEntry(model_name, str(ir), model_version(ir), describe_ir(ir))
    if not entries:
        raise UserError("no model given: pass at least one IR folder written by `export`")
    return entries


def _remote_entry(model_name: str, uri: str) -> ModelEntry:
    """The entry of an export in storage, from its small files only: start-up does not download model.bin
    (the replicas do, once each, in local_ir)."""
    present = storage.files(uri)
    if present is None:
        raise UserError(f"--model {uri}: no such folder (expected an IR folder written by `export`)")
    check_ir_files(uri, present)
    with tempfile.TemporaryDirectory(prefix="da-ir-head-") as tmp:
        head = storage.fetch(uri, _VERSION_FILES, tmp)
        return ModelEntry(model_name, uri, model_version(head), describe_ir(head))


def _check_name(model_name: str, where: str, entries: Mapping[str, ModelEntry]) -> None:
    if not MODEL_NAME_RE.match(model_name):
        raise UserError(f"model name {model_name!r} (from {where}) must be letters, digits, '_', '.' or '-' "
                        "(name it with NAME=IR_DIR)")
    if model_name in entries:
        raise UserError(f"two models are named {model_name!r} ({entries[model_name].path} and {where}); name one "
                        "with NAME=IR_DIR")


def local_ir(path: str, version: str | None = None) -> Path:
    """The IR folder on this machine: a local path as is; a storage URI's copy in the local model cache
    ($DISTRIBUTED_ANOMALY_CACHE, default ~/.cache/distributed_anomaly/models), downloaded once per export.
    With `version`, a copy of another export (the URI was re-exported since start-up) is refused."""
    if not storage.is_uri(path):
        return Path(path)
    cache = Path(os.environ.get("DISTRIBUTED_ANOMALY_CACHE", "~/.cache/distributed_anomaly")).expanduser() / "models"
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    if version and (cache / f"{key}-{version}" / "model.xml").is_file():
        return cache / f"{key}-{version}"
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        storage.download(path, tmp)
        found = model_version(tmp) if all((tmp / n).is_file() for n in _VERSION_FILES) else None
        if found is None:
            raise UserError(f"{path} is not an IR folder written by `export` (no {', '.join(_VERSION_FILES)})")
        if version and found != version:
            raise UserError(f"{path} now holds another export (version {found}, served {version}): redeploy")
        final = cache / f"{key}-{found}"
        try:
            os.replace(tmp, final)  # atomic: a replica never compiles a half-downloaded model
        except OSError:  # another replica on this node got there first: the same export, the same files
            pass
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Requests.


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
    raise BadRequest(f"{len(names)} models are served; choose one with ?model=NAME or the header "
                     f"X-Model: NAME (one of: {', '.join(names)})")


def model_from_request(query: Mapping[str, str], headers: Mapping[str, str]) -> str | None:
    """`?model=` first, then the X-Model header, then Serve's multiplexing header."""
    for value in (query.get("model"), headers.get(MODEL_HEADER), headers.get(SERVE_MODEL_HEADER)):
        if value:
            return value.strip()
    return None


def check_api_key(expected: str | None, headers: Mapping[str, str]) -> None:
    """X-API-Key: KEY or Authorization: Bearer KEY, compared in constant time; no key configured: open."""
    if not expected:
        return
    given = headers.get(API_KEY_HEADER)
    if not given:
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
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
    from python_multipart.multipart import parse_options_header

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
    fields = {p[0]: p[2].decode("utf-8", errors="replace") for i, p in enumerate(parts)
              if i != chosen and p[0] and p[1] is None}
    name, filename, data = parts[chosen]
    if not data:
        raise BadRequest(f"the uploaded file {filename or name!r} is empty (zero bytes)")
    return Upload(data, fields, filename)


def _parse_multipart(body: bytes, boundary: bytes) -> list[tuple[str | None, str | None, bytes]]:
    """(field name, file name or None, data) per part, with python-multipart's streaming parser."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

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
        parts.append((name.decode("utf-8", "replace") if name is not None else None,
                      filename.decode("utf-8", "replace") if filename is not None else None,
                      b"".join(state["data"])))

    callbacks = dict(on_part_begin=on_part_begin, on_header_field=on_header_field, on_header_value=on_header_value,
                     on_header_end=on_header_end, on_part_data=on_part_data, on_part_end=on_part_end)
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    if not parts:
        raise BadRequest("malformed multipart body: no parts (does the boundary match the Content-Type?)")
    return parts


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 (any mode or size, as `data.images.read_image`); 400 when undecodable."""
    from distributed_anomaly.data.images import read_image

    if not data:
        raise BadRequest("empty image: zero bytes")
    try:
        image = read_image(data)
    except ImageReadError as exc:
        raise BadRequest(f"not a decodable image ({len(data)} bytes): {_reason(exc)}") from None
    except Exception as exc:  # a decoder bug on hostile input must still be a 400, not a dead worker
        raise BadRequest(f"not a decodable image ({len(data)} bytes): {type(exc).__name__}: {exc}") from None
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise BadRequest(f"image has no pixels ({image.shape[1]} x {image.shape[0]})")
    return image


def _reason(exc: Exception) -> str:
    """PIL's message without our '<bytes>' prefix or its BytesIO repr (an address means nothing to a client)."""
    text = str(exc).removeprefix("cannot decode image <bytes>: ")
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text)


def as_rgb(image: Any) -> np.ndarray:
    """What the deployment handle accepts -> RGB uint8 (H, W, 3): encoded bytes, or a uint8 array that is
    (H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA (alpha dropped)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image))
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise BadRequest(f"image arrays must be uint8 (RGB 0-255), got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadRequest(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


# ----------------------------------------------------------------------------------------------------------
# Responses.


def mask_png_base64(mask: np.ndarray) -> str:
    """A bool mask as a base64 PNG (8-bit grey, 255 = anomalous), in the image's own size."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask(b64: str) -> np.ndarray:
    """Inverse of mask_png_base64 (for clients and tests)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) > 127


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def prediction_response(pred, task: str, entry: ModelEntry, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """One `postprocess.Prediction` as the JSON answer of /predict (and of the handle).

    `score` is normalised (image threshold at 0.5); `threshold` is the raw image threshold, on the scale of
    `raw_score`; `mask` (segmentation) is a base64 PNG in the image's own size, null without thresholds.
    """
    out: dict[str, Any] = {
        "task": task,
        "model": entry.name,
        "version": entry.version,
        **pred.to_json(task),
        "threshold": _finite(entry.info.get("image_threshold")),
        "score_threshold": SCORE_THRESHOLD,
        "width": int(image_shape[1]),
        "height": int(image_shape[0]),
    }
    out["score"], out["raw_score"] = _finite(out["score"]), _finite(out["raw_score"])
    if task == "segmentation":
        out["mask"] = None if pred.mask is None else mask_png_base64(pred.mask)
        out["mask_format"] = "png;base64"
    return out


def metadata_response(entries: Mapping[str, ModelEntry], settings: Mapping[str, Any]) -> dict[str, Any]:
    return {"models": [e.describe() for e in entries.values()], "tasks": list(TASKS),
            "default_model": next(iter(entries)) if len(entries) == 1 else None, **settings}


# ----------------------------------------------------------------------------------------------------------
# Application arguments (`serve run distributed_anomaly.serve:app models=a,b`, `serve deploy`, the CLI).


@dataclass
class AppConfig:
    """Arguments of the application builder; strings from `serve run key=value` are parsed here."""

    models: list[str]
    replicas: int = 1
    cpus_per_replica: float = 1.0
    max_batch_size: int = 8
    # 50 ms, not Serve's 10: while a replica's threads fill the cores, the proxy and ingress deliver requests
    # one by one, and with 10 ms batches stayed at ~1 image on 2 cores (README, Serving: load).
    batch_wait_timeout_s: float = 0.05
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    api_key: str | None = None
    max_models_per_replica: int = 0  # 0: every served model stays compiled

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> AppConfig:
        known = set(cls.__dataclass_fields__) | {"model", "max_body_mb"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise UserError(f"unknown application argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        models = args.get("models", args.get("model"))
        if isinstance(models, (str, os.PathLike)):
            models = [m for m in str(models).split(",") if m.strip()]
        if not models:
            raise UserError("the application needs models: a list of IR folders (or `models=a,b` on `serve run`)")
        cfg = cls([str(m).strip() for m in models])
        for name, kind in (("replicas", int), ("cpus_per_replica", float), ("max_batch_size", int),
                           ("batch_wait_timeout_s", float), ("max_body_bytes", int), ("max_models_per_replica", int)):
            if args.get(name) is not None:
                try:
                    setattr(cfg, name, kind(args[name]))
                except (TypeError, ValueError):
                    raise UserError(f"application argument {name}={args[name]!r} is not a number") from None
        if args.get("max_body_mb") is not None:
            cfg.max_body_bytes = int(float(args["max_body_mb"]) * 1024 * 1024)
        cfg.api_key = args.get("api_key") or None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks = ((self.replicas >= 1, "replicas must be >= 1"),
                  (self.cpus_per_replica > 0, "cpus_per_replica must be > 0"),
                  (self.max_batch_size >= 1, "max_batch_size must be >= 1"),
                  (self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s must be >= 0"),
                  (self.max_body_bytes >= 1, "max_body_bytes must be >= 1"),
                  (self.max_models_per_replica >= 0, "max_models_per_replica must be >= 0"))
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def threads_for_cpus(cpus: float | None) -> int:
    """OpenVINO threads for a replica holding `cpus` logical CPUs: one per whole CPU, at least one."""
    if cpus is None or not math.isfinite(cpus):
        return 1
    return max(1, int(cpus))
