"""The application's own metrics, through Ray Serve's metrics API (exported on each node's Prometheus endpoint).

Ray prefixes every name with `ray_` and adds the Serve tags (`deployment`, `replica`, `application`); ours add
`model` and `task`, and `status` on requests. Counters appear as `..._total`, histograms as `..._bucket`,
`..._sum`, `..._count`. The Grafana dashboard cluster/grafana_dashboard.json plots them.

    ray_anomaly_requests_total{model, task, status}   every /predict (and handle) request, by HTTP status
    ray_anomaly_request_latency_ms{model, task}       time in the ingress, body read to answer (histogram)
    ray_anomaly_images_flagged_total{model, task}     answers labelled anomalous
    ray_anomaly_score{model, task}                    normalised scores (0.5 = at the threshold; histogram)
    ray_anomaly_batch_size{model}                     images per OpenVINO call (histogram)

A model or task that the request named but that is not served is tagged "-" (no tag per stray name).
"""

from __future__ import annotations

from typing import Any

NO_TAG = "-"
REQUESTS, LATENCY, FLAGGED, SCORES, BATCH = (
    "anomaly_requests",
    "anomaly_request_latency_ms",
    "anomaly_images_flagged",
    "anomaly_score",
    "anomaly_batch_size",
)
SCORE_BUCKETS = [round(0.05 * i, 2) for i in range(1, 20)]  # normalised scores, 0.5 = threshold
LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


class IngressMetrics:
    """Requests, statuses and latency, recorded by the ingress (which sees every request, good or bad)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            REQUESTS, "prediction requests by model, task and HTTP status", ("model", "task", "status")
        )
        self.latency = metrics.Histogram(
            LATENCY, "time in the ingress per request (ms)", LATENCY_BUCKETS_MS, ("model", "task")
        )

    def record(self, model: str | None, task: str | None, status: int, latency_ms: float) -> None:
        tags = {"model": model or NO_TAG, "task": task or NO_TAG}
        self.requests.inc(1, {**tags, "status": str(status)})
        self.latency.observe(latency_ms, tags)


class ModelMetrics:
    """What the model replica sees: batch sizes, scores and anomalous answers."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.flagged = metrics.Counter(FLAGGED, "answers labelled anomalous, by model and task", ("model", "task"))
        self.scores = metrics.Histogram(
            SCORES, "normalised image scores (0.5 = at the threshold)", SCORE_BUCKETS, ("model", "task")
        )
        self.batch = metrics.Histogram(BATCH, "images per OpenVINO call", BATCH_BUCKETS, ("model",))

    def record_batch(self, model: str, answers: list[Any]) -> None:
        """One scored chunk of one model: its size, and each answer's score and label (failures: size only)."""
        self.batch.observe(len(answers), {"model": model})
        for a in answers:
            if not isinstance(a, dict):
                continue
            tags = {"model": model, "task": a["task"]}
            if a.get("score") is not None:
                self.scores.observe(a["score"], tags)
            if a.get("label") == 1:
                self.flagged.inc(1, tags)
