"""The Ray Serve application: a batched, multiplexed OpenVINO model deployment behind a FastAPI ingress.

    AnomalyIngress (FastAPI: /predict, /healthz, /metadata, /docs)  --DeploymentHandle-->  AnomalyModel x N

* AnomalyModel compiles each served IR once per replica, with OpenVINO threads = the replica's `num_cpus`
  (read from Ray at start-up, so a `serve deploy` config that changes `ray_actor_options` keeps them
  matched), and scores through `@serve.batch`: concurrent requests for the same model become one
  OpenVINO call. Models are loaded through Serve's model multiplexing (`@serve.multiplexed`), so with
  several replicas Serve routes a model's requests to replicas that already hold it, and a replica holds
  at most `max_models_per_replica` compiled models (LRU; 0 = all, all compiled when the replica starts).
  An image that fails inside a batch fails only its own request (the batch is re-scored image by image), and
  Serve's health check runs a tiny inference (`check_health`). Its Serve `user_config` is the live operating
  point (serve.operating: thresholds, sensitivity, target false-alarm rate per model): `reconfigure` applies a
  new one on the running replicas, without a restart. It records batch sizes, scores and anomalous answers
  (serve.metrics). With `autoscale` Serve scales it between MIN and MAX replicas.
* AnomalyIngress (serve.ingress) validates, decodes and forwards by handle. Both deployments bound their queues
  (503 with Retry-After).

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
from ray import serve

from distributed_anomaly import __version__
from distributed_anomaly.data.decode import normalise, shrink_to
from distributed_anomaly.data.sizes import canonical
from distributed_anomaly.inference import OpenVINOInferencer
from distributed_anomaly.runner import predict_images
from distributed_anomaly.serve.http import logger
from distributed_anomaly.serve.ingress import INGRESS_DEPLOYMENT, AnomalyIngress
from distributed_anomaly.serve.metrics import ModelMetrics
from distributed_anomaly.serve.operating import (
    OperatingPoint,
    live_postprocessor,
    operating_summary,
    parse_user_config,
    request_postprocessor,
)
from distributed_anomaly.serve.registry import ModelEntry, discover_models, local_ir
from distributed_anomaly.serve.requests import (
    DEFAULT_TASK,
    HTTPError,
    ScoringFailed,
    as_rgb,
    parse_task,
    resolve_model,
)
from distributed_anomaly.serve.responses import prediction_response
from distributed_anomaly.serve.settings import RETRY_AFTER_S, AppConfig, threads_for_cpus

__all__ = ["APP_NAME", "INGRESS_DEPLOYMENT", "MODEL_DEPLOYMENT", "AnomalyIngress", "AnomalyModel", "app", "build_app"]
APP_NAME = "distributed_anomaly"
MODEL_DEPLOYMENT = "AnomalyModel"
# Serve's replica health check: every 10 s (Serve's default) a tiny inference; 3 failures in a row and Serve
# replaces the replica. The timeout leaves room for a full batch queued ahead of the probe on 1 CPU.
HEALTH_CHECK = {"health_check_period_s": 10.0, "health_check_timeout_s": 60.0}
# A replica that stops (the application deleted or redeployed, autoscaling down) first waits for its ongoing
# requests, sleeping this long before each check; Serve's default, 2 s, makes every stop of an idle replica take
# 2 s. Requests in flight are still waited for (up to Serve's graceful_shutdown_timeout_s), checked more often.
SHUTDOWN = {"graceful_shutdown_wait_loop_s": 0.25}

# Ray Serve's own request-path settings, the replica half of its RAY_SERVE_THROUGHPUT_OPTIMIZED mode (direct
# ingress left off: it would move the HTTP port): our code runs on the replica's event loop instead of a second
# thread, the replicas take gRPC calls, and request-path log lines are buffered (flushed at 1000 lines or at an
# error) and not copied to stderr; the replica log files keep them. With the whole local cluster's environment set
# they raised Serve's throughput from 23 to 33 req/s on 2 cores (README, bench/serve_load.py). Set in the replicas'
# runtime_env; a value in the deploying process's environment wins. The ingress's handle to the model is built by
# the deploying process, so it keeps Ray's actor calls (seen in a py-spy profile of the ingress, 2026-12-02); on
# gRPC (`_by_reference=False`) an A/B of Serve's own CPU per request showed no difference (bench/serve_cpu.py).
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
        # One worker thread: inference leaves the event loop free to queue the next batch, and batches of
        # one replica never compete for its cores.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openvino")
        self._stats = {"batches": 0, "images": 0, "max_batch": 0, "compiled": []}
        self._init_operating_state()
        self._predict_batch.set_max_batch_size(int(max_batch_size))
        self._predict_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        capacity = max_models_per_replica or len(self.names)

        async def load(model_id: str):  # a plain function: serve.multiplexed keeps its LRU cache on it
            return await self._compile(model_id)

        self._load = serve.multiplexed(max_num_models_per_replica=capacity)(load)
        for name in self.names[:capacity]:  # compile at start-up: a broken IR fails the deploy, not a request
            await self._load(name)

    def _init_operating_state(self) -> None:
        """The live operating point (as exported until `reconfigure`) and the metrics of this replica."""
        self._ops: dict[str, OperatingPoint] = {}  # the live operating point (user_config), per model
        self._live: dict[str, Any] = {}  # model -> its export's PostProcessor with the operating point applied
        self._export_posts: dict[str, Any] = {}  # model -> its export's own PostProcessor
        self.metrics = ModelMetrics()

    async def _compile(self, name: str):
        entry = self.entries[resolve_model(name, self.names)]  # UnknownModel for a name not served
        loop = asyncio.get_running_loop()
        inferencer = await loop.run_in_executor(
            self._pool,
            lambda: OpenVINOInferencer(local_ir(entry.path, entry.version), self.num_threads, precision=self.precision),
        )
        self._stats["compiled"].append(name)
        self._export_posts[name] = inferencer.postprocessor
        self._live[name] = live_postprocessor(inferencer.postprocessor, self._ops.get(name))
        return inferencer

    def reconfigure(self, user_config: Mapping[str, Any] | None) -> None:
        """Serve calls this at start and whenever the deployment's user_config changes (`serve-config set`,
        `serve deploy`): the new operating point applies to the next batch; no restart, no recompilation. An
        invalid one (unknown model, target_fpr on an export without calibration scores) raises: Serve keeps
        the deployment from going healthy with it."""
        ops = parse_user_config(user_config, self.names)
        live = {name: live_postprocessor(self._exported(name), ops.get(name)) for name in self._live}
        self._ops, self._live = ops, live  # swapped together: a batch sees the old or the new point, whole
        logger.info("operating point: %s", {n: op.to_dict() for n, op in ops.items()} or "as exported")

    def _exported(self, name: str):
        """The export's own PostProcessor of a compiled model."""
        return self._export_posts[name]

    async def preview(self, user_config: Mapping[str, Any] | None) -> dict[str, Any]:
        """What a user_config would set, without applying it (serve-config checks a change before applying)."""
        ops = parse_user_config(user_config, self.names)
        return {
            name: self._summary(live_postprocessor(self._exported(name), ops.get(name)), ops.get(name))
            for name in self._live
        }

    async def operating_point(self) -> dict[str, Any]:
        """The thresholds this replica uses now, per compiled model, and its user_config."""
        return {
            "models": {name: self._summary(post, self._ops.get(name)) for name, post in self._live.items()},
            "user_config": {"models": {n: op.to_dict() for n, op in self._ops.items()}},
        }

    @staticmethod
    def _summary(post, op: OperatingPoint | None) -> dict[str, Any]:
        return operating_summary(post, op.sensitivity if op else 1.0)

    async def predict(
        self,
        image: Any,
        task: str = DEFAULT_TASK,
        model: str | None = None,
        size: tuple[int, int] | None = None,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        """One image (RGB uint8 array or encoded bytes) -> the /predict JSON. The model is `model`, else the
        handle's `multiplexed_model_id`, else the only one served. `size` is the image's own (H, W) when the
        array was decoded at reduced scale (the ingress does for large JPEGs); answers are in that size.
        `threshold`: this image's own raw threshold instead of the live one (serve.operating)."""
        name = resolve_model(model or serve.get_multiplexed_model_id() or None, self.names)
        task = parse_task(task)
        if isinstance(image, (bytes, bytearray, memoryview)):
            rgb = await asyncio.get_running_loop().run_in_executor(None, as_rgb, image, self.max_pixels)
        else:
            rgb = as_rgb(image, self.max_pixels)
        shape = tuple(int(v) for v in size) if size is not None else rgb.shape[:2]
        if self.entries[name].info.get("image_size"):  # as the ingress does: a no-op for what it sends
            rgb = shrink_to(rgb, canonical(self.entries[name].info["image_size"]))
        limit = None if threshold is None else float(threshold)
        answer = await self._predict_batch((name, rgb, task, shape, limit))
        if isinstance(answer, BaseException):  # this image's own failure (see _score); the batch went on
            raise answer
        return answer

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _predict_batch(self, items: list[tuple]) -> list[dict[str, Any] | HTTPError]:
        """Serve splits batches by multiplexed model id; grouping by name also covers handle calls that name
        the model by argument instead. A failure is returned in the place of the requests it concerns (a
        model that cannot load: its group; an image that cannot be scored: that image) and raised by predict."""
        out: list[dict[str, Any] | HTTPError | None] = [None] * len(items)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (name, *_) in enumerate(items):
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
            self.metrics.record_batch(name, answers)
            for i, answer in zip(idx, answers):
                out[i] = answer
        self._stats["batches"] += 1
        self._stats["images"] += len(items)
        self._stats["max_batch"] = max(self._stats["max_batch"], len(items))
        return out  # type: ignore[return-value]

    def _score(self, inferencer, entry: ModelEntry, chunk: list[tuple]) -> list[dict | HTTPError]:
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

    def _answers(self, inferencer, entry: ModelEntry, chunk: list[tuple]) -> list[dict[str, Any]]:
        """Each image through the live operating point, or its own threshold; the answer says which."""
        live, op = self._live.get(entry.name, inferencer.postprocessor), self._ops.get(entry.name)
        posts = [live if limit is None else request_postprocessor(live, limit) for *_, limit in chunk]
        preds = predict_images(inferencer, [item[1] for item in chunk], [item[3] for item in chunk], posts)
        return [
            prediction_response(pred, task, entry, shape, self._summary(post, op if limit is None else None))
            for pred, post, (_, _, task, shape, limit) in zip(preds, posts, chunk)
        ]

    async def check_health(self) -> None:
        """Serve's periodic replica check: a tiny inference (a black image) through a compiled model. Raising
        marks the replica unhealthy; Serve replaces it."""
        name = self._stats["compiled"][-1] if self._stats["compiled"] else self.names[0]
        inferencer = await self._load(name)
        probe = normalise(np.zeros((8, 8, 3), dtype=np.uint8), inferencer.image_size)
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
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "serve_env": {k: os.environ.get(k) for k in REPLICA_ENV},
        }


def build_app(config: AppConfig | Mapping[str, Any]):
    """AppConfig (or the builder's argument dict) -> the bound Serve application (ingress -> model)."""
    cfg = config if isinstance(config, AppConfig) else AppConfig.from_args(config)
    cfg.validate()
    entries = discover_models(cfg.models)
    models = {name: e.to_dict() for name, e in entries.items()}
    runtime_env = {"env_vars": {k: os.environ.get(k, v) for k, v in REPLICA_ENV.items()}}
    queue = {"max_queued_requests": cfg.max_queued_requests, "backpressure_config": {"retry_after_s": RETRY_AFTER_S}}
    model = AnomalyModel.options(
        **cfg.scaling_options(),
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "runtime_env": runtime_env},
        max_ongoing_requests=max(32, 4 * cfg.max_batch_size),
        **queue,
        **HEALTH_CHECK,
        **SHUTDOWN,
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
        "autoscale": list(cfg.autoscale) if cfg.autoscale else None,
        "cpus_per_replica": cfg.cpus_per_replica,
        "max_batch_size": cfg.max_batch_size,
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        "max_queued_requests": cfg.max_queued_requests,
        "version": __version__,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    ingress = AnomalyIngress.options(ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env}, **queue, **SHUTDOWN)
    return ingress.bind(model, models, cfg.max_body_bytes, cfg.api_key, settings, cfg.max_pixels)


def app(args: dict[str, Any]):
    """Application builder for `serve run distributed_anomaly.serve:app models=IR1,IR2` and `serve deploy`
    (see cluster/serve_config.yaml); the keys are AppConfig's fields."""
    return build_app(AppConfig.from_args(args))
