"""Backend for any OpenAI-compatible chat-completions endpoint (a hosted API, a vLLM server, the simulated annotator).

A Ray Data actor pool; each actor runs one asyncio event loop with one aiohttp session, and every
batch's requests go out concurrently, at most ``label.backend.concurrency`` per actor. Several
batches are in flight per actor (``label.batches_per_actor``) so that the request slots stay full
while Ray Data moves blocks in and out: the endpoint, not the pool, sets the pace.

Failures are retried with exponential backoff and full jitter (HTTP 429 and 5xx, timeouts,
connection errors, bodies that are not a chat completion), honouring ``Retry-After``. After
``max_retries`` the row gets status ``mllm_error`` and the last error, naming the image URI; the
run goes on. The API key is read inside the actor from the environment variable *named* by
``label.backend.api_key_env`` and never logged.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from near_ray.label.backends import INPUT_COLUMNS
from near_ray.label.prompts import chat_messages

if TYPE_CHECKING:
    import ray.data

    from near_ray.config import LabelConfig, OpenAIBackendConfig
    from near_ray.stopping import StopSignal

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


OUTPUT_TYPES = {
    "raw_answer": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "input_tokens": pa.int64(),
    "output_tokens": pa.int64(),
    "latency_s": pa.float64(),
    "model": pa.string(),
    "system_fingerprint": pa.string(),
}


class RetryableError(Exception):
    """A failed attempt worth retrying; ``retry_after`` is the server's requested wait, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalError(Exception):
    """A failed attempt that retrying cannot fix (HTTP 400/401/404 …)."""


def request_body(row: dict[str, Any], cfg: OpenAIBackendConfig) -> dict[str, Any]:
    """The chat-completions request for one (image, sample) row."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "messages": chat_messages(row["system_prompt"], row["user_prompt"], row["image"], row["mime"]),
        "temperature": float(row["temperature"]),
        "seed": int(row["seed"]),
        "max_tokens": cfg.max_tokens,
    }
    if row.get("json_schema"):
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "label", "schema": json.loads(row["json_schema"]), "strict": True},
        }
    return body


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class ChatClient:
    """Async chat-completions client with bounded concurrency and retries; create it inside the event loop."""

    def __init__(self, cfg: OpenAIBackendConfig, *, concurrency: int | None = None) -> None:
        import aiohttp

        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limit = concurrency or cfg.concurrency
        self._slots = asyncio.Semaphore(limit)
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
        )

    async def close(self) -> None:
        await self._session.close()

    async def label(self, row: dict[str, Any]) -> dict[str, Any]:
        """Ask about one row; returns the backend output columns (never raises for request failures)."""
        body = json.dumps(request_body(row, self.cfg))
        start = time.perf_counter()
        attempts = self.cfg.max_retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                async with self._slots:
                    answer, usage = await self._post(body)
                return _result(answer, None, usage, time.perf_counter() - start, self.cfg.model)
            except FatalError as e:
                last = str(e)
                break
            except RetryableError as e:
                last = str(e)
                if attempt + 1 < attempts:
                    await asyncio.sleep(self._backoff(attempt, e.retry_after))
        error = f"{row['uri']}: sample {row['sample']}: {last} (after {attempt + 1} attempt(s) to {self.url})"
        return _result(None, error, {}, time.perf_counter() - start, self.cfg.model)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        # Full jitter spreads retries of a whole batch that failed together.
        delay = random.uniform(0, min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2**attempt))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cfg.backoff_max_s))
        return delay

    async def _post(self, body: str) -> tuple[str | None, dict[str, Any]]:
        import aiohttp

        try:
            async with self._session.post(self.url, data=body) as resp:
                text = await resp.text()
                if resp.status in RETRY_STATUS or resp.status >= 500:
                    raise RetryableError(
                        f"HTTP {resp.status}: {text[:200]}", retry_after_seconds(resp.headers.get("Retry-After"))
                    )
                if resp.status >= 400:
                    raise FatalError(f"HTTP {resp.status}: {text[:300]}")
        except (asyncio.TimeoutError, TimeoutError):
            raise RetryableError(f"timed out after {self.cfg.timeout_s}s") from None
        except aiohttp.ClientError as e:
            raise RetryableError(f"connection error: {type(e).__name__}: {e}") from None
        return _parse_completion(text)


def _parse_completion(text: str) -> tuple[str | None, dict[str, Any]]:
    """(answer text, usage) from a chat-completion body; a body that is not one is retried."""
    try:
        obj = json.loads(text)
        message = obj["choices"][0]["message"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise RetryableError(f"malformed response body: {text[:200]!r}") from None
    content = message.get("content") if isinstance(message, dict) else None
    if content is None and isinstance(message, dict):
        content = message.get("refusal")  # structured-output refusals: kept verbatim, parse to no name
    if content is not None and not isinstance(content, str):
        raise RetryableError(f"malformed response body: content is {type(content).__name__}")
    usage = dict(obj["usage"]) if isinstance(obj.get("usage"), dict) else {}
    if isinstance(obj.get("system_fingerprint"), str):  # kept with the usage: which backend build answered
        usage["system_fingerprint"] = obj["system_fingerprint"]
    return content, usage


def _result(answer: str | None, error: str | None, usage: dict[str, Any], latency: float, model: str) -> dict:
    return {
        "raw_answer": answer,
        "status": "ok" if error is None else "mllm_error",
        "error": error,
        "system_fingerprint": usage.get("system_fingerprint"),
        "input_tokens": int(usage.get("prompt_tokens") or 0),
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "latency_s": float(latency),
        "model": model,
    }


class OpenAILabeler:
    """Ray Data actor: one event loop, one HTTP session, concurrent requests for every batch it holds."""

    def __init__(self, cfg: OpenAIBackendConfig, stop: StopSignal | None = None) -> None:
        self.cfg = cfg
        self.stop = stop
        self._client: ChatClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._client is None:  # the session must be created on the loop that uses it
            self._client = ChatClient(self.cfg)
            self._loop = asyncio.get_running_loop()
        if self.stop is not None and await self.stop.is_set_async():
            return with_results(batch.slice(0, 0), [])  # the job is stopping: this batch is not asked
        rows = batch.select(list(INPUT_COLUMNS)).to_pylist()
        results = await asyncio.gather(*(self._client.label(r) for r in rows))
        return with_results(batch, results)

    def __del__(self) -> None:
        # Ray Data drops the UDF on graceful actor exit: close the session on its own loop.
        if self._client is not None and self._loop is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout=5)
            except Exception:  # best effort at shutdown
                pass


def with_results(batch: pa.Table, results: list[dict[str, Any]]) -> pa.Table:
    """The input rows without their image bytes, plus the backend output columns (typed even when all null)."""
    out = batch.drop_columns(["image"]) if "image" in batch.column_names else batch
    for name, typ in OUTPUT_TYPES.items():
        out = out.append_column(name, pa.array([r[name] for r in results], type=typ))
    return out


def label_dataset(ds: ray.data.Dataset, cfg: LabelConfig, stop: StopSignal | None = None) -> ray.data.Dataset:
    """The backend seam (see near_ray.label.backends): ask the endpoint about every row of ``ds``; once
    ``stop`` is set, a batch not yet sent is dropped (no row: a resumed run asks it)."""
    import ray.data

    per_actor = max(cfg.batches_per_actor, math.ceil(cfg.backend.concurrency / cfg.batch_size) * 2)
    return ds.map_batches(
        OpenAILabeler,
        fn_constructor_kwargs={"cfg": cfg.backend, "stop": stop},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(
            size=cfg.pool_size,
            max_tasks_in_flight_per_actor=per_actor,
            max_concurrent_calls_per_actor=per_actor,
        ),
        num_cpus=cfg.actor_cpus,
    )
