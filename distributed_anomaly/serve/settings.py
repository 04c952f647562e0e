"""The Serve application's arguments (`serve run distributed_anomaly.serve:app models=a,b`, `serve deploy`,
the CLI) and how they size a replica."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distributed_anomaly.data.limits import DEFAULT_MAX_PIXELS, parse_max_pixels
from distributed_anomaly.errors import UserError

API_KEY_ENV = "DISTRIBUTED_ANOMALY_API_KEY"  # the endpoint's key, if not given as an argument
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024  # 20 MB: a 12-megapixel PNG fits, a stray video does not
# Requests waiting for a replica, per caller (each proxy for the ingress, the ingress for the model), beyond
# which Serve answers 503 with Retry-After at once instead of queueing without bound.
DEFAULT_MAX_QUEUED_REQUESTS = 100
RETRY_AFTER_S = 1  # the Retry-After of those 503s
# Serve's HTTP request timeout (http_options.request_timeout_s: the proxy answers 408 after it); a cluster-wide
# setting of the proxies, applied when this process starts Serve.
DEFAULT_REQUEST_TIMEOUT_S = 60.0
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# An api_key given as "sha256:HEX" is the key's SHA-256: what `distributed-anomaly serve` puts in the deployed
# config (visible to `serve config` and the dashboard), so the key itself is not stored there.
KEY_HASH_PREFIX = "sha256:"


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
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images get 413, from their header, before decoding
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    # (MIN, MAX) model replicas Serve scales between (instead of `replicas`), aiming at `target_ongoing_requests`
    # requests in flight per replica (None: max_batch_size, so a replica with a full batch queued calls for another).
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: float | None = None
    precision: str | None = None  # OpenVINO inference precision (f32, bf16); None: each export's own

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
        for name, kind in (
            ("replicas", int),
            ("cpus_per_replica", float),
            ("max_batch_size", int),
            ("batch_wait_timeout_s", float),
            ("max_body_bytes", int),
            ("max_models_per_replica", int),
            ("max_queued_requests", int),
            ("max_pixels", parse_max_pixels),
        ):
            if args.get(name) is not None:
                try:
                    setattr(cfg, name, kind(args[name]))
                except (TypeError, ValueError, UserError):
                    raise UserError(f"application argument {name}={args[name]!r} is not a number") from None
        if args.get("autoscale") is not None:
            cfg.autoscale = parse_autoscale(args["autoscale"])
        if args.get("target_ongoing_requests") is not None:
            try:
                cfg.target_ongoing_requests = float(args["target_ongoing_requests"])
            except (TypeError, ValueError):
                value = args["target_ongoing_requests"]
                raise UserError(f"target_ongoing_requests={value!r} is not a number") from None
        if args.get("max_body_mb") is not None:
            cfg.max_body_bytes = int(float(args["max_body_mb"]) * 1024 * 1024)
        cfg.api_key = api_key_text(args.get("api_key"))
        cfg.precision = args.get("precision") or None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks = (
            (self.replicas >= 1, "replicas must be >= 1"),
            (self.cpus_per_replica > 0, "cpus_per_replica must be > 0"),
            (self.max_batch_size >= 1, "max_batch_size must be >= 1"),
            (self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s must be >= 0"),
            (self.max_body_bytes >= 1, "max_body_bytes must be >= 1"),
            (self.max_models_per_replica >= 0, "max_models_per_replica must be >= 0"),
            (self.max_pixels >= 1, "max_pixels must be >= 1"),
            (self.max_queued_requests >= 1 or self.max_queued_requests == -1, "max_queued_requests must be >= 1"),
            (not self.autoscale or 1 <= self.autoscale[0] <= self.autoscale[1], "autoscale MIN,MAX: 1 <= MIN <= MAX"),
            ((self.target_ongoing_requests or 1) > 0, "target_ongoing_requests must be > 0"),
            (self.precision in (None, "f32", "bf16"), "precision must be f32 or bf16"),
        )
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def min_replicas(self) -> int:
        """Replicas there are at least (what must fit at start)."""
        return self.autoscale[0] if self.autoscale else self.replicas

    def scaling_options(self) -> dict[str, Any]:
        """The model deployment's replica options: a fixed count, or Serve's autoscaling_config."""
        if not self.autoscale:
            return {"num_replicas": self.replicas}
        target = self.target_ongoing_requests or float(self.max_batch_size)
        low, high = self.autoscale
        return {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target}}

    def to_args(self) -> dict[str, Any]:
        """The builder's arguments (a `serve deploy` config's `args`) that make this configuration again."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["autoscale"] = list(self.autoscale) if self.autoscale else None
        out["api_key"] = hashed_api_key(self.api_key)  # the deployed config shows it: its hash only
        return {k: v for k, v in out.items() if v is not None}


def parse_autoscale(value: Any) -> tuple[int, int]:
    """ "MIN,MAX" (the CLI, `serve run autoscale=1,4`) or [MIN, MAX] (YAML) -> (MIN, MAX)."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        low, high = (int(str(v).strip()) for v in parts)
    except (TypeError, ValueError):
        raise UserError(f"autoscale must be MIN,MAX replicas (e.g. 1,4), got {value!r}") from None
    if not 1 <= low <= high:
        raise UserError(f"autoscale MIN,MAX needs 1 <= MIN <= MAX, got {low},{high}")
    return low, high


def threads_for_cpus(cpus: float | None) -> int:
    """OpenVINO threads for a replica holding `cpus` logical CPUs: one per whole CPU, at least one."""
    if cpus is None or not math.isfinite(cpus):
        return 1
    return max(1, int(cpus))


def api_key_text(value: Any) -> str | None:
    """A key as configured -> str or None: YAML reads `api_key: 12345` as a number, which must still work."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def hashed_api_key(key: str | None) -> str | None:
    """KEY -> "sha256:HEX" (requests.check_api_key accepts either); None and hashes stay as they are."""
    if key is None or key.startswith(KEY_HASH_PREFIX):
        return key
    return KEY_HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def read_api_key_file(path: str | os.PathLike) -> str:
    """The key from a file (its first line, stripped), so it need not appear on a command line."""
    try:
        with open(path, encoding="utf-8") as f:
            key = api_key_text(f.readline())
    except OSError as exc:
        raise UserError(f"cannot read the API key file {os.fspath(path)}: {exc.strerror or exc}") from None
    if key is None:
        raise UserError(f"the API key file {os.fspath(path)} is empty")
    return key


def resolve_api_key(key: str | None, key_file: str | None) -> str | None:
    """--api-key, else --api-key-file, else $DISTRIBUTED_ANOMALY_API_KEY, else None (no key)."""
    if key and key_file:
        raise UserError("give --api-key or --api-key-file, not both")
    if key_file:
        return read_api_key_file(key_file)
    return api_key_text(key) or api_key_text(os.environ.get(API_KEY_ENV))


def is_local_host(host: str) -> bool:
    """Whether HTTP on `host` is reachable from this machine only."""
    return host in LOCAL_HOSTS or host.startswith("127.")
