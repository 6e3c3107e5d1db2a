"""The HTTP API: a FastAPI ingress deployment in front of the batched ``Classifier``.

The ingress reads and validates requests, decodes and resizes images in a thread pool, and sends
fixed-size uint8 pixels to the model deployment, so nothing slow is serialized inside a batch.
"""

# No `from __future__ import annotations` here: FastAPI must see the handlers' real `Request` annotations.
import asyncio
import hmac
import inspect
import os
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from near_ray.config import ServeConfig, StorageConfig
from near_ray.errors import NearRayError
from near_ray.model.preprocess import PixelSpec, preprocessor
from near_ray.serve.images import ApiError, decode_upload
from near_ray.serve.metrics import IngressMetrics
from near_ray.serve.requests import Upload, batch_uploads, single_upload
from near_ray.serve.routing import RouteError, Routes

RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class ScoredName(BaseModel):
    name: str
    score: float


class Classification(BaseModel):
    predictions: list[ScoredName]
    abstained: bool
    model_version: str
    domain: str | None


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image_base64": {"type": "string"},
                        "domain": {"type": "string"},
                        "top_k": {"type": "integer"},
                    },
                    "required": ["image_base64"],
                }
            },
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 404, 413, 415, 422, 503, 504)}

app = FastAPI(
    title="near_ray",
    description="Names images with a fine-tuned CLIP over a vocabulary discovered without labels (NeaR).",
    version="1",
)


def _error(request: Request, e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    request.state.error_code = e.code  # for the request metrics
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return _error(request, e, {"www-authenticate": "Bearer"} if e.status == 401 else None)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
    return _error(request, ApiError(422, "bad_request", where))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return _error(request, ApiError(e.status_code, code, str(e.detail)))


@app.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    # A bug, not bad input: still a JSON body a client can parse, never Starlette's plain-text 500.
    return _error(request, ApiError(500, "internal", f"internal error ({type(e).__name__}); the server keeps serving"))


_ENDPOINTS = ("/v1/classify/batch", "/v1/classify", "/v1/vocabulary", "/v1/stats", "/healthz", "/readyz", "/metrics")


_metrics: list[IngressMetrics] = []


def ingress_metrics() -> IngressMetrics:
    """This replica's metrics, created on first use in the process that records them."""
    if not _metrics:
        _metrics.append(IngressMetrics())
    return _metrics[0]


class _Observe:
    """ASGI middleware: every HTTP request's endpoint, status, error code and latency -> the metrics."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def observed(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.inner(scope, receive, observed)
        finally:
            path = scope.get("path", "")
            endpoint = next((e for e in _ENDPOINTS if path.endswith(e)), "other")  # bounded tag values
            code = (scope.get("state") or {}).get("error_code", "") if status[0] >= 400 else ""
            ingress_metrics().request(endpoint, status[0], code, time.perf_counter() - t0)


app.add_middleware(_Observe)


class InProcessModel:
    """The Classifier inside the ingress replica (``serve.colocate``), called like its deployment handle:
    ``await model.classify.remote(item)``. One hop less: no RPC, no serialization of the pixels."""

    def __init__(self, classifier: Any) -> None:
        self.classifier = classifier

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.classifier, name)

        async def call(*args: Any) -> Any:
            out = method(*args)
            return await out if inspect.isawaitable(out) else out

        return SimpleNamespace(remote=call)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, model: Any, settings: ServeConfig, storage: StorageConfig | None = None) -> None:
        """``model``: the Classifier deployment's handle, or None to hold the model here (``serve.colocate``;
        the bundles then come with this deployment's user_config)."""
        self.settings = settings
        self._local = None
        if model is None:
            from near_ray.serve.model import Classifier

            self._local = Classifier.func_or_class(storage)
            model = InProcessModel(self._local)
        self.model = model
        self._token = self._read_token()
        self._pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")
        self._described: dict[str, Any] | None = None
        self._described_at = 0.0
        self._counts = {"requests": 0, "images": 0, "errors": 0}
        import open_clip  # noqa: F401  (imported now rather than inside the first request's latency)

    def _read_token(self) -> str | None:
        name = self.settings.auth_token_env
        if not name:
            return None
        token = os.environ.get(name)
        if not token:  # fail closed: an auth-enabled server without its token must not start open
            raise NearRayError(f"serve.auth_token_env={name}, but ${name} is not set in the ingress replica's environment")
        return token

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``serve.colocate``: the model's user_config (bundles, batching) arrives here."""
        if self._local is not None:
            await self._local.reconfigure(user_config)
            self._described = None

    # ------------------------------------------------------------------------------- model state
    async def _describe(self, max_age_s: float = float("inf")) -> dict[str, Any]:
        if self._described is None or time.monotonic() - self._described_at > max_age_s:
            self._described = await self.model.describe.remote()
            self._described_at = time.monotonic()
        return self._described

    @staticmethod
    def _route(described: dict[str, Any], domain: str | None) -> tuple[int, str | None]:
        try:
            return Routes.from_json(described["routes"]).route(domain)
        except RouteError as e:
            raise ApiError(422 if e.code == "domain_required" else 404, e.code, str(e)) from None

    def _spec_for(self, described: dict[str, Any], domain: str | None) -> dict[str, Any]:
        return described["bundles"][self._route(described, domain)[0]]["preprocess"]

    def _prepare(self, upload: Upload, spec: dict[str, Any]) -> tuple[Any, Any]:
        """Decode, then the bundle's preprocessor (the one pixel path): uint8 pixels for the model."""
        image = decode_upload(upload.data, self.settings.max_pixels, upload.what)
        return image, preprocessor(PixelSpec.from_config(spec)).pixels(image)

    # ------------------------------------------------------------------------------- classify
    async def _classify(self, upload: Upload, default_top_k: int | None, default_domain: str | None) -> dict[str, Any]:
        if upload.error:
            raise upload.error
        domain = upload.domain or default_domain
        top_k = upload.top_k or default_top_k or self.settings.top_k
        described = await self._describe()
        if domain is not None and domain not in described["routes"]["table"]:  # a bundle update may have added it
            described = await self._describe(max_age_s=0)
        spec = self._spec_for(described, domain)
        loop = asyncio.get_running_loop()
        # Decode and resize in one thread hop: it is most of a small request's latency budget.
        t0 = time.perf_counter()
        image, pixels = await loop.run_in_executor(self._pool, self._prepare, upload, spec)
        decoded = time.perf_counter()
        for attempt in range(3):
            try:
                result = await self.model.classify.remote({"pixels": pixels, "domain": domain, "top_k": top_k, "key": spec["key"]})
            except RETRYABLE:  # the replica died under us; Serve routes the retry to a live one
                await asyncio.sleep(0.25 * (attempt + 1))
                continue
            if "error" not in result:
                timing = {"decode": decoded - t0, "model": time.perf_counter() - decoded, "forward": result.pop("batch_s", 0.0)}
                return dict(result, domain=domain or result["domain"], timing=timing)
            code = result["error"]["code"]
            if code != "stale_preprocessing":
                status = {"unknown_domain": 404, "domain_required": 422}.get(code, 500)
                raise ApiError(status, code, result["error"]["message"])
            described = await self._describe(max_age_s=0)
            spec = self._spec_for(described, domain)
            pixels = await loop.run_in_executor(self._pool, self._preprocessor(spec).pixels, image)
        raise ApiError(503, "model_unavailable", f"{upload.what}: the model deployment did not answer after 3 attempts")

    async def _with_timeout(self, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer within serve.request_timeout_s={self.settings.request_timeout_s}s") from None

    @app.post("/v1/classify", response_model=Classification, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
    async def classify(
        self,
        request: Request,
        domain: str | None = Query(None, description="restrict the answer to one domain's vocabulary"),
        top_k: int | None = Query(None, ge=1, le=1000),
    ) -> JSONResponse:
        """Name one image: multipart field `file`, a raw image body, or JSON `{"image_base64", "domain", "top_k"}`."""
        self._authorize(request)
        self._counts["requests"] += 1
        t0 = time.perf_counter()
        try:
            upload = await single_upload(request, self.settings.max_body_bytes, self.settings.request_timeout_s)
            read = time.perf_counter() - t0
            result = await self._with_timeout(self._classify(upload, top_k, domain))
        except ApiError:
            self._counts["errors"] += 1
            raise
        self._counts["images"] += 1
        timing = {"read": read, **result.pop("timing"), "ingress": time.perf_counter() - t0}
        headers = {
            "x-near-ray-batch-size": str(result.pop("batch_size")),
            "x-near-ray-model-version": result["model_version"],
            # Where the time went, per hop (ms): body read, decode+resize, the model call (RPC + queue +
            # batch), the batch's forward pass, the whole ingress. The serve benchmark reads it.
            "server-timing": ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in timing.items()),
        }
        return JSONResponse(result, headers=headers)

    @app.post("/v1/classify/batch", responses=_ERRORS)
    async def classify_batch(
        self,
        request: Request,
        domain: str | None = Query(None, description="default domain for every image"),
        top_k: int | None = Query(None, ge=1, le=1000),
    ) -> JSONResponse:
        """Name several images (multipart `file`/`files` parts, or JSON `[...]` / `{"images": [...]}`); errors per item."""
        self._authorize(request)
        self._counts["requests"] += 1
        uploads = await batch_uploads(
            request, self.settings.max_body_bytes, self.settings.max_images_per_request, self.settings.request_timeout_s
        )
        outcomes = await self._with_timeout(
            asyncio.gather(*(self._classify(u, top_k, domain) for u in uploads), return_exceptions=True)
        )
        results = []
        for i, (upload, out) in enumerate(zip(uploads, outcomes, strict=True)):
            if isinstance(out, ApiError):
                results.append({"index": i, "image": upload.what, **out.body(), "status": out.status})
            elif isinstance(out, BaseException):
                results.append({"index": i, "image": upload.what, "error": {"code": "internal", "message": repr(out)}, "status": 500})
            else:
                out.pop("batch_size", None)
                out.pop("timing", None)
                results.append({"index": i, **out})
        self._counts["images"] += sum("error" not in r for r in results)
        self._counts["errors"] += sum("error" in r for r in results)
        ingress_metrics().item_errors(results)
        return JSONResponse({"results": results})

    @app.get("/v1/vocabulary", responses=_ERRORS)
    async def vocabulary(self, request: Request, domain: str | None = None) -> JSONResponse:
        """The names this server can answer with (all, or one domain's), with synonyms and support."""
        self._authorize(request)
        described = await self._describe(max_age_s=1.0)
        if domain is None:
            entries = [v for b in described["bundles"] for v in b["vocabulary"]]
        else:
            i, inner = self._route(described, domain)
            entries = [v for v in described["bundles"][i]["vocabulary"] if inner is None or v.get("domain") == inner]
        return JSONResponse(
            {
                "domains": sorted(described["routes"]["table"]),
                "model_versions": [b["model_version"] for b in described["bundles"]],
                "vocabulary": entries,
            }
        )

    @app.get("/v1/stats", responses=_ERRORS)
    async def stats(self, request: Request) -> JSONResponse:
        """Request counters of this ingress replica and the batch-size histogram of one model replica."""
        self._authorize(request)
        return JSONResponse({"ingress": dict(self._counts), "model": await self.model.stats.remote()})

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the ingress answers (no auth)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(self) -> JSONResponse:
        """Readiness: a model replica answered with its loaded bundles (no auth)."""
        try:
            versions = await asyncio.wait_for(self.model.versions.remote(), timeout=5.0)
        except Exception as e:  # not ready yet, whatever the reason
            return JSONResponse(ApiError(503, "not_ready", f"model not ready: {type(e).__name__}").body(), status_code=503)
        return JSONResponse({"status": "ready", "model_versions": versions})
