"""The simulated MLLM annotator: an OpenAI-compatible HTTP server that answers like an MLLM would.

It knows the true class of every image of a synthetic benchmark (truth.parquet + taxonomy.json),
recognises an image sent as a data URL by its content (robust to re-encoding and resizing), and
answers with structured noise from a profile (see noise.py and profiles/*.yaml). Faults —
latency, HTTP 429/500, hangs, malformed bodies, bodies that are JSON but no completion, responses cut
off mid-body — are injected deterministically per (image, seed, attempt), so a retry of the same
request can succeed. Like vLLM's server, a request whose client disconnects is aborted before it is
answered (it is not paid). /stats counts the answers paid per (image, seed, temperature) and the
duplicates among them (the same question paid twice). Everything it says is simulated, and /stats
says so.

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /healthz, GET /stats, POST /stats/reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web
from PIL import UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from near_ray.sim.lookalike import noise_model
from near_ray.sim.noise import (
    OUTCOMES,
    UNKNOWN_ANSWERS,
    AnnotatorError,
    Draw,
    format_answer,
    format_value,
    load_profile,
    load_truth,
    rng_for,
)
from near_ray.sim.protocol import BadRequest, error_response, parse_request, structured_key
from near_ray.storage import Storage

log = logging.getLogger(__name__)

FAULT_OUTCOMES = ("http_429", "http_500", "hang", "malformed", "wrong_shape", "truncated")
TOKENS_PER_IMAGE = 85


class FaultConfig(BaseModel):
    """Fault injection. Rates are per request, exclusive, drawn per (image, seed, attempt)."""

    model_config = ConfigDict(extra="forbid")

    latency_s: float = Field(0.0, ge=0)  # mean added latency of every answered request
    latency_sigma: float = Field(0.0, ge=0)  # 0: fixed latency; > 0: lognormal with this sigma and the mean above
    rate_429: float = Field(0.0, ge=0, le=1)
    retry_after_s: float = Field(1.0, ge=0)  # Retry-After header of a 429
    rate_500: float = Field(0.0, ge=0, le=1)
    rate_hang: float = Field(0.0, ge=0, le=1)
    hang_s: float = Field(30.0, ge=0)  # a hang sleeps this long, then closes the connection without a response
    rate_malformed: float = Field(0.0, ge=0, le=1)  # HTTP 200 with a body that is not valid JSON
    rate_wrong_shape: float = Field(0.0, ge=0, le=1)  # HTTP 200, valid JSON, but not a chat completion
    rate_truncated: float = Field(0.0, ge=0, le=1)  # the connection closes half-way through the JSON body

    @classmethod
    def parse(cls, value: FaultConfig | dict[str, Any] | str | None) -> FaultConfig:
        """From a FaultConfig, a dict, a JSON string, a path to a JSON file, or None (no faults)."""
        if value is None or isinstance(value, FaultConfig):
            return value or cls()
        try:
            if isinstance(value, str):
                text = value.strip()
                if not text.startswith("{"):
                    path = Path(text)
                    if not path.is_file():
                        raise AnnotatorError(f"faults: '{value}' is neither JSON nor an existing file")
                    text = path.read_text()
                value = json.loads(text)
            cfg = cls.model_validate(value)
        except json.JSONDecodeError as e:
            raise AnnotatorError(f"faults: not valid JSON: {e}") from None
        except ValidationError as e:
            raise AnnotatorError("faults: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}"
                                                        for x in e.errors())) from None
        if sum(rate for _, rate in cfg.rates()) > 1:
            raise AnnotatorError("faults: rate_429 + rate_500 + rate_hang + rate_malformed + rate_wrong_shape + "
                                 "rate_truncated must be ≤ 1")
        return cfg

    def rates(self) -> list[tuple[str, float]]:
        """(outcome, rate) of each fault, in the order a draw checks them."""
        return [("http_429", self.rate_429), ("http_500", self.rate_500), ("hang", self.rate_hang),
                ("malformed", self.rate_malformed), ("wrong_shape", self.rate_wrong_shape),
                ("truncated", self.rate_truncated)]


# ------------------------------------------------------------------------------------------ the app
class Annotator:
    """The server's state: truth, noise model, faults, counters. Handlers run on one event loop."""

    def __init__(self, truth: str, profile: str, seed: int, faults: FaultConfig | dict[str, Any] | str | None,
                 storage: Storage) -> None:
        self.profile = load_profile(profile)
        self.faults = FaultConfig.parse(faults)
        self.seed = seed
        self.truth = truth
        t0 = time.monotonic()
        self.known, taxonomy, self.index = load_truth(truth, storage)
        self.model = noise_model(self.profile, self.known, taxonomy, seed, truth, storage)
        self.meta = {d: v.get("meta_class") or "object" for d, v in taxonomy.get("domains", {}).items()}
        self._lock = threading.Lock()
        self._attempts: Counter[tuple[Any, ...]] = Counter()
        self.reset()
        log.info("simulated annotator: %d images, profile %s, loaded in %.1f s", len(self.known),
                 self.profile.name, time.monotonic() - t0)

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.outcomes: Counter[str] = Counter({k: 0 for k in (*OUTCOMES, *FAULT_OUTCOMES, "unknown_image",
                                                                  "bad_request")})
            self.by_image: Counter[str] = Counter()
            self.paid: Counter[tuple[Any, ...]] = Counter()  # answered (image, seed, temperature, choice)

    def count(self, outcome: str, path: str | None = None) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if path is not None:
                self.by_image[path] += 1

    def stats(self, by_image: bool = False) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {"simulated": True, "profile": self.profile.name, "seed": self.seed,
                                   "requests": self.requests, "outcomes": dict(self.outcomes),
                                   "answers_paid": sum(self.paid.values()),
                                   "duplicate_answers": sum(n - 1 for n in self.paid.values() if n > 1)}
            if by_image:
                out["by_image"] = dict(self.by_image)
        return out

    # -------------------------------------------------------------------- faults
    def draw_fault(self, image: int | None, req_seed: int, temperature: float) -> tuple[str | None, float]:
        """(fault or None, latency seconds) for this attempt of this request."""
        key = (image, req_seed, temperature)
        with self._lock:
            attempt = self._attempts[key]
            self._attempts[key] += 1
        f = self.faults
        rng = rng_for(self.seed, "fault", -1 if image is None else image, req_seed, float(temperature), attempt)
        u = rng.random()
        fault = None
        for name, rate in f.rates():
            if u < rate:
                fault = name
                break
            u -= rate
        latency = f.latency_s
        if f.latency_sigma > 0 and f.latency_s > 0:
            mu = math.log(f.latency_s) - f.latency_sigma ** 2 / 2  # lognormal with mean latency_s
            latency = float(rng.lognormal(mu, f.latency_sigma))
        return fault, latency

    # -------------------------------------------------------------------- answers
    def completion(self, body: dict[str, Any], images: list[bytes], prompt: str, image: int | None,
                   req_seed: int, temperature: float) -> dict[str, Any]:
        key = structured_key(body.get("response_format"))
        choices = []
        for c in range(int(body.get("n", 1))):
            if image is None:
                self.count("unknown_image")
                text = str(rng_for(self.seed, "unknown", req_seed, c).choice(UNKNOWN_ANSWERS))
                content = json.dumps({key: "unknown"}) if key else text
            else:
                d: Draw = self.model.answer(image, req_seed, temperature, c)
                self.count(d.outcome, self.known[image].path)
                with self._lock:
                    self.paid[(image, req_seed, float(temperature), c)] += 1
                meta = self.meta.get(self.known[image].domain, "object")
                content = json.dumps({key: format_value(d)}) if key else format_answer(d, meta)
            choices.append({"index": c, "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop", "logprobs": None})
        prompt_tokens = TOKENS_PER_IMAGE * len(images) + math.ceil(len(prompt.split()) * 1.3)
        completion_tokens = sum(max(1, math.ceil(len(ch["message"]["content"].split()) * 1.3)) for ch in choices)
        return {
            "id": f"chatcmpl-sim-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or self.profile.model, "system_fingerprint": "simulated",
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    async def chat(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.requests += 1
        try:
            body = json.loads(await request.read())
            images, prompt = parse_request(body)
            temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
            req_seed = body.get("seed")
            if temperature < 0 or (req_seed is not None and not isinstance(req_seed, int)):
                raise BadRequest("'temperature' must be ≥ 0 and 'seed' an integer", "temperature")
            n = body.get("n", 1)
            if not isinstance(n, int) or not 1 <= n <= 16:
                raise BadRequest("'n' must be an integer from 1 to 16", "n")
            image = self.index.lookup(images[0])
        except json.JSONDecodeError as e:
            self.count("bad_request")
            return error_response(400, f"the request body is not valid JSON: {e}")
        except BadRequest as e:
            self.count("bad_request")
            return error_response(400, str(e), e.param)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            self.count("bad_request")
            return error_response(400, f"messages: the image could not be decoded: {e}", "messages")
        if req_seed is None:  # no request seed: successive requests for an image are successive samples
            with self._lock:
                req_seed = self._attempts[("unseeded", image)]
                self._attempts[("unseeded", image)] += 1
        fault, latency = self.draw_fault(image, req_seed, temperature)
        return await self._respond(request, body, images, prompt, image, req_seed, temperature, fault, latency)

    async def _respond(self, request: web.Request, body: dict[str, Any], images: list[bytes], prompt: str,
                       image: int | None, req_seed: int, temperature: float, fault: str | None,
                       latency: float) -> web.StreamResponse:
        if fault == "hang":
            self.count("hang")
            await asyncio.sleep(self.faults.hang_s)
            if request.transport is not None:
                request.transport.close()  # the client sees a dropped connection (after its own timeout)
            return web.Response(status=504)
        if latency > 0:
            await asyncio.sleep(latency)
        if fault == "http_429":
            self.count("http_429")
            return error_response(429, "Rate limit reached (simulated). Please retry after the indicated time.",
                          kind="rate_limit_error", headers={"Retry-After": f"{self.faults.retry_after_s:g}"})
        if fault == "http_500":
            self.count("http_500")
            return error_response(500, "The server had an error while processing your request (simulated).",
                          kind="server_error")
        if fault == "malformed":
            self.count("malformed")
            return web.Response(status=200, content_type="application/json",
                                text='{"id": "chatcmpl-sim", "object": "chat.completion", "choices": [{"message": {"con')
        if fault == "wrong_shape":  # e.g. a gateway's own JSON in place of the completion
            self.count("wrong_shape")
            return web.json_response({"object": "error", "message": "upstream unavailable (simulated)", "choices": []})
        if fault == "truncated":
            self.count("truncated")
            return await self._truncated(request)
        return web.json_response(self.completion(body, images, prompt, image, req_seed, temperature))

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        """Headers promise a whole body; half of it is sent, then the connection closes."""
        text = b'{"id": "chatcmpl-sim", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "as'
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                       "Content-Length": str(2 * len(text))})
        await resp.prepare(request)
        await resp.write(text)
        if request.transport is not None:
            request.transport.close()
        return resp

    # -------------------------------------------------------------------- other routes
    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(by_image=request.query.get("by_image") in ("1", "true")))

    async def post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.profile.model, "object": "model", "created": 0, "owned_by": "near_ray-simulated"}]})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "images": len(self.known), "simulated": True})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/stats/reset", self.post_reset)
        return app


# ------------------------------------------------------------------------------------------ running it
class AnnotatorServer:
    """The annotator on a background thread with its own event loop; ``port=0`` picks a free port.

    ``with AnnotatorServer(benchmark_uri, profile="strong", seed=0) as ann: ann.base_url``
    """

    def __init__(self, truth: str, profile: str = "strong", seed: int = 0,
                 faults: FaultConfig | dict[str, Any] | str | None = None, host: str = "127.0.0.1", port: int = 0,
                 storage: Storage | None = None) -> None:
        self.annotator = Annotator(truth, profile, seed, faults, storage or Storage())
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        """Start serving; returns the OpenAI base URL (http://HOST:PORT/v1)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start_site())
            except BaseException as e:  # a port in use etc.: hand it to start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="simulated-annotator", daemon=True)
        self._thread.start()
        ready.wait(timeout=60)
        if failure:
            raise AnnotatorError(f"annotator: cannot listen on {self.host}:{self.port}: {failure[0]}")
        log.info("simulated annotator at %s", self.base_url)
        return self.base_url

    async def _start_site(self) -> None:
        # handler_cancellation: a client that disconnects aborts its request, as vLLM's server does.
        self._runner = web.AppRunner(self.annotator.app(), access_log=None, shutdown_timeout=1.0,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        # Requests still sleeping (injected hangs, latency) are cancelled, not left pending.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            self._thread.join(timeout=30)
        self._loop = self._thread = None

    def stats(self) -> dict[str, Any]:
        return self.annotator.stats()

    def reset_stats(self) -> None:
        self.annotator.reset()

    def __enter__(self) -> AnnotatorServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_annotator(truth: str, profile: str, host: str, port: int, seed: int, faults: str | None,
                    storage: Storage) -> None:
    """Run the simulated annotator in the foreground until interrupted (the `near-ray annotator` command)."""
    annotator = Annotator(truth, profile, seed, faults, storage)
    print(f"simulated MLLM annotator (profile {annotator.profile.name}, {len(annotator.known)} images) "
          f"at http://{host}:{port}/v1 — every answer is simulated", flush=True)
    web.run_app(annotator.app(), host=host, port=port, access_log=None, print=None, handler_cancellation=True)
