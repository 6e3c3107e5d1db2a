"""The serve stage's section: the HTTP classification service (Ray Serve)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from near_ray.config.base import Section


# --------------------------------------------------------------------------------------------- serve
class ServeConfig(Section):
    """The HTTP classification service (Ray Serve): its bundles, batching, replicas and limits."""

    bundle: str | None = Field(None, description="bundle URI; defaults to `{workdir}/bundles/<train.method>`")
    host: str = Field("127.0.0.1", description="address the HTTP proxy binds")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    route_prefix: str = Field("/", description="the application's route prefix")
    top_k: int = Field(5, ge=1, description="names returned per image")
    abstain_threshold: float | None = Field(
        None, ge=0, le=1, description="answers below this top probability are marked abstained; null = the "
        "bundle's own threshold, 0 = never")
    batcher: Literal["adaptive", "serve"] = Field(
        "adaptive", description="adaptive: one batch at a time, each taking what queued while the previous one ran "
        "(a lone request never waits); serve: Ray Serve's @serve.batch (a batch = what arrives within "
        "batch_wait_timeout_s)")
    max_batch_size: int = Field(16, ge=1, description="images per model forward pass at most")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="> 0: wait this long for a fuller batch")
    min_replicas: int = Field(1, ge=0, description="autoscaling: fewest model replicas")
    max_replicas: int = Field(2, ge=1, description="autoscaling: most model replicas")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="autoscaling: the requests per replica it scales to")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPU share per model replica")
    cpus_per_replica: float = Field(0.5, gt=0, description="CPUs per model replica")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1, description="larger request bodies are refused")
    max_pixels: int = Field(40_000_000, ge=1, description="larger images are refused (decompression-bomb guard)")
    request_timeout_s: float = Field(30.0, gt=0, description="seconds a request may take")
    auth_token_env: str | None = Field(
        None, description="name of the env var holding a bearer token; null = no auth")
    bundles: dict[str, str] = Field(
        default_factory=dict, description="domain -> bundle URI; when set, used instead of bundle")
    app_name: str = Field("near_ray", description="the Ray Serve application's name")
    max_images_per_request: int = Field(32, ge=1, description="images per /v1/classify/batch request at most")
    max_ongoing_requests: int = Field(
        64, ge=1, description="per model replica: must exceed max_batch_size for batches to fill")
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas")
    ingress_cpus: float = Field(0.25, gt=0, description="CPUs per ingress replica")
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="requests in flight per ingress replica")
    decode_threads: int = Field(4, ge=1, description="image decoding/resizing threads per ingress replica")
    colocate: bool = Field(
        False, description="true: the model runs inside the ingress replica (one hop less); the ingress then takes "
        "the model's resources, autoscaling and user_config. false: separate Ingress and Classifier deployments")
    direct_ingress: bool = Field(
        False, description="true: each ingress replica also answers HTTP itself on serve.host (no proxy hop; "
        "Serve's direct ingress: the cluster needs RAY_SERVE_ENABLE_DIRECT_INGRESS=1, see docs/serve.md)")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env written into the `serve deploy` config")
