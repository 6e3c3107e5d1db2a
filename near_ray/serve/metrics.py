"""What operators watch: the Serve application's Prometheus metrics, through Ray's metrics API.

``ray.serve.metrics`` adds the deployment, replica and application tags; Ray's metrics agent on each
node exports everything as Prometheus text (``http://<node>:<metrics_export_port>/metrics``, names
prefixed ``ray_``), which Ray's dashboard and Grafana read. Created lazily inside the replica: a
metric object belongs to the process that records it.

| metric | kind | tags |
|---|---|---|
| ``near_ray_requests`` | counter | endpoint, status (HTTP), code (error code, "" when ok) |
| ``near_ray_request_latency_ms`` | histogram | endpoint |
| ``near_ray_image_errors`` | counter | code: per-image errors inside a batch request |
| ``near_ray_batch_size`` | histogram | (model replica) images per forward pass |
| ``near_ray_predictions`` | counter | model_version, abstained ("true"/"false"): the abstain rate |
| ``near_ray_model_loaded`` | gauge | model_version: 1 while a replica serves that version |
"""

from __future__ import annotations

from typing import Any

LATENCY_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class IngressMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "near_ray_requests", description="HTTP requests by endpoint, status and error code",
            tag_keys=("endpoint", "status", "code"),
        )
        self.latency = metrics.Histogram(
            "near_ray_request_latency_ms", description="ingress request latency (ms), body read to response",
            boundaries=LATENCY_MS_BOUNDARIES, tag_keys=("endpoint",),
        )
        self.image_errors = metrics.Counter(
            "near_ray_image_errors", description="per-image errors inside batch requests", tag_keys=("code",)
        )

    def request(self, endpoint: str, status: int, code: str, seconds: float) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status), "code": code})
        self.latency.observe(seconds * 1000.0, tags={"endpoint": endpoint})

    def item_errors(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            if "error" in r:
                self.image_errors.inc(tags={"code": str(r["error"].get("code", "internal"))})


class ModelMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.batch_size = metrics.Histogram(
            "near_ray_batch_size", description="images per forward pass", boundaries=BATCH_BOUNDARIES
        )
        self.predictions = metrics.Counter(
            "near_ray_predictions", description="images answered, by model version and whether the answer abstained",
            tag_keys=("model_version", "abstained"),
        )
        self.loaded = metrics.Gauge(
            "near_ray_model_loaded", description="1 while this replica serves the model version",
            tag_keys=("model_version",),
        )
        self._versions: set[str] = set()

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def answered(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            if "model_version" in r:
                self.predictions.inc(tags={"model_version": r["model_version"], "abstained": str(bool(r["abstained"])).lower()})

    def serving(self, versions: list[str]) -> None:
        for v in self._versions - set(versions):
            self.loaded.set(0, tags={"model_version": v})
        for v in versions:
            self.loaded.set(1, tags={"model_version": v})
        self._versions = set(versions)
