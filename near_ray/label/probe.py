"""One real request to the labeling endpoint before a run pays for thousands: does it answer, does it
take the key, does it take an image.

The probe is a chat completion in the shape the label stage sends (the same chat messages: a system
message and a user message with a small image as a ``data:`` URL), asking for one output token at
temperature 0. Its tokens and price are counted (``label.prices``). A refused key, an unknown model, an
endpoint that rejects images or answers 5xx is one line naming the field to fix.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

from near_ray.config import OpenAIBackendConfig, PriceConfig
from near_ray.errors import NearRayError
from near_ray.label.prompts import chat_messages

PROBE_TIMEOUT_S = 30.0
PROBE_SIDE = 32  # px: small, and above every endpoint's minimum image side we know of


class ProbeError(NearRayError):
    """The endpoint did not answer the probe as a labeling run needs; the message names the field."""


def probe_image() -> bytes:
    """A small grey PNG: the probe asks about an image, as every labeling request does."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (PROBE_SIDE, PROBE_SIDE), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def probe(cfg: OpenAIBackendConfig, prices: PriceConfig) -> dict[str, Any]:
    """One authenticated one-token completion; returns latency, tokens and cost, or raises ProbeError."""
    import httpx

    url = cfg.base_url.rstrip("/") + "/chat/completions"
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    body = {
        "model": cfg.model,
        "messages": chat_messages("You name what an image shows.", "Answer with one word.", probe_image(), "image/png"),
        "temperature": 0.0,
        "max_tokens": 1,
    }
    note = ""
    for attempt in range(2):  # one retry for a 5xx or a dropped connection: a server restarting is not a verdict
        t0 = time.monotonic()
        try:
            r = httpx.post(url, content=json.dumps(body), headers=headers, timeout=min(cfg.timeout_s, PROBE_TIMEOUT_S))
        except httpx.TimeoutException:
            raise ProbeError(f"field 'label.backend.base_url': {url} did not answer within "
                             f"{min(cfg.timeout_s, PROBE_TIMEOUT_S):g} s") from None
        except httpx.HTTPError as e:
            if attempt == 0 and not isinstance(e, httpx.ConnectError):
                continue
            raise ProbeError(f"field 'label.backend.base_url': cannot reach {cfg.base_url} ({_reason(e)})") from None
        latency = time.monotonic() - t0
        if r.status_code >= 500 and attempt == 0:
            time.sleep(1.0)
            continue
        break
    if r.status_code in (401, 403):
        unset = f"; environment variable {cfg.api_key_env} is not set" if cfg.api_key_env and not key else ""
        named = f" (the key in {cfg.api_key_env})" if key else ""
        raise ProbeError(f"label.backend.api_key{named} rejected by {cfg.base_url} (HTTP {r.status_code}: "
                         f"{_message(r)}){unset}")
    if r.status_code == 404:
        raise ProbeError(f"label.backend: {url} answered HTTP 404 ({_message(r)}): check label.backend.base_url and "
                         f"that it serves label.backend.model '{cfg.model}'")
    if r.status_code == 429:  # the key was accepted: the account is busy, and the stage retries with backoff
        note = "HTTP 429: the key is accepted but rate-limited now; the stage retries with backoff"
    elif r.status_code != 200:
        raise ProbeError(f"label.backend: {url} refused the probe request (an image and a question for "
                         f"'{cfg.model}'): HTTP {r.status_code}: {_message(r)}")
    usage: dict[str, Any] = {}
    if r.status_code == 200:
        try:
            answer = r.json()
            usage = answer.get("usage") or {}
            if not isinstance(answer.get("choices"), list):
                raise ValueError("no 'choices'")
        except ValueError as e:
            raise ProbeError(f"label.backend.base_url: {url} answered HTTP 200 without a chat completion ({e}): "
                             f"is it an OpenAI-compatible endpoint?") from None
    tokens_in, tokens_out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"latency_s": round(latency, 3), "input_tokens": tokens_in, "output_tokens": tokens_out,
            "cost_usd": prices.mllm_usd(tokens_in, tokens_out, 1), "status": r.status_code, "note": note}


def _message(r: Any) -> str:
    """The error's own message from an OpenAI-style error body, else the start of the body."""
    try:
        err = r.json().get("error")
        text = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        text = None
    return " ".join(str(text or r.text or r.reason_phrase).split())[:200]


def _reason(e: Exception) -> str:
    cause = e.__cause__ or e.__context__
    return " ".join(str(cause or e).split())[:200] or type(e).__name__
