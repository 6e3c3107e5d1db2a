"""HTTP requests -> uploads: body limits, multipart / raw / JSON bodies, base64, per-request options.

Nothing here fetches a URL: clients send image bytes. Every refusal is an ``ApiError`` with the
status and a message naming the field or image.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from near_ray.serve.images import ApiError

RAW_TYPES = ("application/octet-stream",)  # besides image/*


@dataclass
class Upload:
    """One image to classify, or the reason it cannot be (per-item errors of a batch)."""

    what: str  # names the image in messages: "file 'a.png'", "images[3]", "body"
    data: bytes = b""
    domain: str | None = None
    top_k: int | None = None
    error: ApiError | None = None


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole body, refusing more than ``limit`` bytes (from Content-Length, and again while reading)
    and a body still incomplete after ``timeout_s``: a client trickling bytes holds no worker for long."""
    if timeout_s is None:
        return await _read_body(request, limit)
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within serve.request_timeout_s={timeout_s}s") from None


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ApiError(400, "bad_request", f"Content-Length '{length}' is not a number") from None
        if declared > limit:
            raise _too_large(declared, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked uploads or a lying Content-Length
            raise _too_large(size, limit, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> ApiError:
    more = "more than " if at_least else ""
    return ApiError(413, "body_too_large", f"request body of {more}{size} bytes exceeds serve.max_body_bytes={limit}")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_top_k(value: Any, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        k = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's 1e999 is float infinity
        raise ApiError(422, "bad_top_k", f"{what}: top_k must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not 1 <= k <= 1000 or (isinstance(value, float) and k != value):
        raise ApiError(422, "bad_top_k", f"{what}: top_k must be an integer between 1 and 1000, got {value!r}")
    return k


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def parse_json(body: bytes) -> Any:
    """The JSON document, or a 400 naming what is wrong; never a 500, whatever the body holds."""
    try:
        return json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise ApiError(400, "malformed_json", f"request body has the key '{e}' twice: which one is meant is ambiguous") from None
    except RecursionError:
        raise ApiError(400, "malformed_json", "request body is nested too deeply to be a request") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {e}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts (int_max_str_digits)
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {e}") from None


def image_from_json(item: Any, what: str) -> Upload:
    """``{"image_base64", "domain", "top_k"}`` (or a bare base64 string in a batch) -> an upload."""
    if isinstance(item, str):
        item = {"image_base64": item}
    if not isinstance(item, dict):
        raise ApiError(400, "bad_request", f"{what}: expected an object with 'image_base64', got {type(item).__name__}")
    if "image_url" in item:
        raise ApiError(
            400,
            "url_not_supported",
            f"{what}: 'image_url' is not supported: the server never fetches URLs; send the image itself "
            "as 'image_base64', a multipart 'file' or a raw image body",
        )
    encoded = item.get("image_base64")
    if not isinstance(encoded, str) or not encoded:
        raise ApiError(400, "missing_image", f"{what}: field 'image_base64' (a base64 string) is required")
    if encoded.startswith("data:"):
        if "," not in encoded:
            raise ApiError(400, "malformed_base64", f"{what}: field 'image_base64' is a data URL without data")
        encoded = encoded.split(",", 1)[1]
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "malformed_base64", f"{what}: field 'image_base64' is not valid base64 ({e})") from None
    domain = item.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise ApiError(422, "bad_domain", f"{what}: domain must be a string, got {domain!r}")
    return Upload(what=what, data=data, domain=domain, top_k=parse_top_k(item.get("top_k"), what))


def _per_item(fn: Any, item: Any, what: str) -> Upload:
    try:
        return fn(item, what)
    except ApiError as e:
        return Upload(what=what, error=e)


async def _form(request: Request, body: bytes, max_files: int) -> Any:
    """Parse a multipart body that was already read (with its size limit) by replaying it."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        message = {"type": "http.request", "body": b"" if sent else body, "more_body": False}
        sent = True
        return message

    try:
        return await Request(request.scope, replay).form(max_files=max_files, max_fields=100)
    except Exception as e:  # starlette raises HTTPException / MultiPartException for malformed parts
        raise ApiError(400, "malformed_multipart", f"cannot parse the multipart body: {getattr(e, 'detail', e)}") from None


async def single_upload(request: Request, max_body: int, timeout_s: float | None = None) -> Upload:
    """POST /v1/classify: multipart field 'file', a raw image body, or JSON {"image_base64", ...}."""
    body = await read_body(request, max_body, timeout_s)
    kind = media_type(request)
    if not body:
        raise ApiError(400, "empty_body", "request body is empty: send an image (multipart 'file', raw bytes or JSON)")
    if kind == "multipart/form-data":
        form = await _form(request, body, max_files=4)
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise ApiError(400, "missing_file", "multipart body has no file field 'file'")
        what = f"file '{file.filename or 'file'}'"
        domain, top_k = form.get("domain") or None, form.get("top_k")
        if domain is not None and not isinstance(domain, str):
            raise ApiError(422, "bad_domain", f"{what}: the multipart field 'domain' must be text, not a file")
        if top_k is not None and not isinstance(top_k, str):
            raise ApiError(422, "bad_top_k", f"{what}: the multipart field 'top_k' must be text, not a file")
        return Upload(what=what, data=await file.read(), domain=domain, top_k=parse_top_k(top_k, what))
    if kind == "application/json":
        return image_from_json(parse_json(body), "body")
    if kind.startswith("image/") or kind in RAW_TYPES:
        return Upload(what="body", data=body)
    raise ApiError(415, "unsupported_media", f"content-type '{kind or 'none'}' is not accepted: use multipart/form-data, image/* or application/json")


async def batch_uploads(request: Request, max_body: int, max_images: int, timeout_s: float | None = None) -> list[Upload]:
    """POST /v1/classify/batch: multipart files ('file' or 'files'), or JSON [...] / {"images": [...]}."""
    body = await read_body(request, max_body, timeout_s)
    kind = media_type(request)
    if not body:
        raise ApiError(400, "empty_body", "request body is empty: send images as multipart files or a JSON list")
    if kind == "multipart/form-data":
        form = await _form(request, body, max_files=max_images + 1)
        files = [f for f in form.getlist("file") + form.getlist("files") if not isinstance(f, str)]
        _check_count(len(files), max_images)
        return [Upload(what=f"file '{f.filename or i}'", data=await f.read()) for i, f in enumerate(files)]
    if kind == "application/json":
        doc = parse_json(body)
        items = doc.get("images") if isinstance(doc, dict) else doc
        if not isinstance(items, list):
            raise ApiError(400, "bad_request", "JSON body must be a list of images or {\"images\": [...]}")
        _check_count(len(items), max_images)
        return [_per_item(image_from_json, item, f"images[{i}]") for i, item in enumerate(items)]
    if kind.startswith("image/") or kind in RAW_TYPES:
        return [Upload(what="body", data=body)]
    raise ApiError(415, "unsupported_media", f"content-type '{kind or 'none'}' is not accepted: use multipart/form-data or application/json")


def _check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise ApiError(400, "missing_image", "the batch holds no images")
    if n > max_images:
        raise ApiError(413, "too_many_images", f"{n} images in one request exceeds serve.max_images_per_request={max_images}")
