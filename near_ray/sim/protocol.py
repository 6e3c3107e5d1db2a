"""The chat-completions protocol as the simulated annotator reads it: images and prompt out of a
request, the structured-output key, OpenAI-style error bodies. Each refusal names the field."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from aiohttp import web


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------------------------------ requests
def _decode_data_url(url: Any, where: str) -> bytes:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest(f"{where}: only data: URLs with base64 images are supported (the simulator cannot fetch)",
                         where)
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise BadRequest(f"{where}: the data URL is not base64-encoded", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: invalid base64 in the data URL", where) from None


def parse_request(body: Any) -> tuple[list[bytes], str]:
    """(images, text of the prompt) of a chat-completions request, or BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    images, texts = [], []
    for m, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{m}].content must be a string or a list of parts", f"messages[{m}].content")
        for p, part in enumerate(content):
            where = f"messages[{m}].content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url":
                iu = part.get("image_url")
                images.append(_decode_data_url(iu.get("url") if isinstance(iu, dict) else iu, f"{where}.image_url"))
            else:
                raise BadRequest(f"{where}: unsupported content part type {kind!r}", where)
    if not images:
        raise BadRequest("no image in the request: add an 'image_url' content part with a data URL", "messages")
    return images, " ".join(texts)


def structured_key(response_format: Any) -> str | None:
    """The JSON key to answer under when the request asks for structured output, else None."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "name"
    if kind != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema") or {}
    props = schema.get("properties") or {}
    for key in schema.get("required") or []:
        if (props.get(key) or {}).get("type") == "string":
            return str(key)
    return next((str(k) for k, v in props.items() if (v or {}).get("type") == "string"), "name")


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.json_response(body, status=status, headers=headers)
