"""Bad input at the Serve app's edge, over real HTTP on 127.0.0.1, and the metrics operators watch.

Pathological JSON (deep nesting, huge numbers, duplicate keys, wrong types at every level), a client
whose body trickles in, and bad requests interleaved with good ones: each bad request gets a 4xx JSON
error, good ones keep their answers. Then Ray's Prometheus export shows the app's counters.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import time

import httpx
import numpy as np
import pytest
from support.serving import assert_same, deploy, expected, make_bundle, png, serve_http_port, settings

VOCAB = [("Red Finch", "birds"), ("Blue Finch", "birds"), ("Star Lily", "flowers")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return make_bundle(str(tmp_path_factory.mktemp("input_bundle") / "b"), 5, VOCAB)


@pytest.fixture(scope="module")
def app_url(ray_cluster, bundle):
    from ray import serve

    port = serve_http_port()
    deploy("near_input", settings(bundle=bundle, request_timeout_s=2.0, decode_threads=2))
    yield f"http://127.0.0.1:{port}/near_input"
    serve.delete("near_input")


def _b64(seed: int = 1) -> str:
    return base64.b64encode(png(seed)).decode()


def _json(text: str | bytes) -> dict:
    return {"content": text.encode() if isinstance(text, str) else text, "headers": {"content-type": "application/json"}}


def _single_cases() -> list[tuple[str, dict, int, str]]:
    b64 = _b64()
    deep = "[" * 200_000 + "]" * 200_000
    return [
        ("deeply nested array", _json(deep[:120_000] + deep[-120_000:]), 400, "malformed_json"),
        ("deeply nested inside a field", _json('{"image_base64": ' + "[" * 50_000 + "]" * 50_000 + "}"), 400, "malformed_json"),
        ("number of 5000 digits", _json('{{"image_base64": "{}", "top_k": {}}}'.format(b64, "9" * 5000)), 400, "malformed_json"),
        ("top_k 1e999 (infinity)", _json(f'{{"image_base64": "{b64}", "top_k": 1e999}}'), 422, "bad_top_k"),
        ("top_k NaN", _json(f'{{"image_base64": "{b64}", "top_k": NaN}}'), 422, "bad_top_k"),
        ("top_k 1e308", _json(f'{{"image_base64": "{b64}", "top_k": 1e308}}'), 422, "bad_top_k"),
        ("top_k 2.5", {"json": {"image_base64": b64, "top_k": 2.5}}, 422, "bad_top_k"),
        ("top_k true", {"json": {"image_base64": b64, "top_k": True}}, 422, "bad_top_k"),
        ("top_k a list", {"json": {"image_base64": b64, "top_k": [1]}}, 422, "bad_top_k"),
        ("top_k an object", {"json": {"image_base64": b64, "top_k": {"k": 1}}}, 422, "bad_top_k"),
        ("duplicate keys", _json(f'{{"image_base64": "{b64}", "image_base64": "{_b64(2)}"}}'), 400, "malformed_json"),
        ("duplicate nested keys", _json(f'{{"image_base64": "{b64}", "x": {{"a": 1, "a": 2}}}}'), 400, "malformed_json"),
        ("top level a number", _json("5"), 400, "bad_request"),
        ("top level null", _json("null"), 400, "bad_request"),
        ("top level a list", {"json": [b64]}, 400, "bad_request"),
        ("image_base64 a number", {"json": {"image_base64": 5}}, 400, "missing_image"),
        ("image_base64 null", {"json": {"image_base64": None}}, 400, "missing_image"),
        ("image_base64 an object", {"json": {"image_base64": {"data": b64}}}, 400, "missing_image"),
        ("domain a number", {"json": {"image_base64": b64, "domain": 5}}, 422, "bad_domain"),
        ("domain a list", {"json": {"image_base64": b64, "domain": ["birds"]}}, 422, "bad_domain"),
        ("data URL without data", {"json": {"image_base64": "data:image/png;base64"}}, 400, "malformed_base64"),
        ("invalid UTF-8", _json(b'{"image_base64": "\xff\xfe"}'), 400, "malformed_json"),
        ("query top_k not a number", {"params": {"top_k": "x"}, **_json(f'{{"image_base64": "{b64}"}}')}, 422, "bad_request"),
        ("multipart domain sent as a file",
         {"files": {"file": ("a.png", png(1), "image/png"), "domain": ("d.txt", b"birds", "text/plain")}}, 422, "bad_domain"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _single_cases(), ids=lambda c: c[0])
def test_pathological_json_gets_a_4xx_json_error_and_the_server_keeps_serving(app_url, case):
    _, kwargs, status, code = case
    with httpx.Client(base_url=app_url, timeout=60) as c:
        r = c.post("/v1/classify", **kwargs)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
        ok = c.post("/v1/classify", content=png(1), headers={"content-type": "image/png"})
        assert ok.status_code == 200 and ok.json()["predictions"]


def test_batch_wrong_types_at_every_level(app_url):
    b64 = _b64()
    with httpx.Client(base_url=app_url, timeout=60) as c:
        for body in ("5", '{"images": 5}', '{"images": {"a": 1}}', "[" * 60_000 + "]" * 60_000):
            r = c.post("/v1/classify/batch", **_json(body))
            assert r.status_code == 400 and r.json()["error"]["code"] in ("bad_request", "malformed_json"), r.text
        r = c.post("/v1/classify/batch", json={"images": [b64, 5, [], {"image_base64": b64, "top_k": []}]})
        assert r.status_code == 200
        results = r.json()["results"]
        assert "predictions" in results[0]
        assert [x["error"]["code"] for x in results[1:]] == ["bad_request", "bad_request", "bad_top_k"]
        assert all(f"images[{i}]" in x["error"]["message"] for i, x in enumerate(results) if i)


def _trickle(port: int, prefix: str, seconds: float) -> tuple[float, bytes]:
    """A client that promises 2,000 bytes and sends one every 0.25 s: (seconds until answered, response)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=seconds + 10) as s:
        s.sendall(f"POST {prefix}/v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                  f"Content-Length: 2000\r\n\r\n".encode())
        s.settimeout(0.25)
        response = b""
        while time.monotonic() - t0 < seconds and not response:
            try:
                s.sendall(b"\x89")
                response = s.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        s.settimeout(5)
        try:
            while b"\r\n\r\n" in response and not response.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                response += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return time.monotonic() - t0, response


def test_a_trickling_body_is_cut_off_by_the_timeout_and_others_are_served_meanwhile(app_url):
    from concurrent.futures import ThreadPoolExecutor

    port = int(app_url.split(":")[2].split("/")[0])
    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(_trickle, port, "/near_input", 30.0) for _ in range(4)]
        time.sleep(0.5)
        with httpx.Client(base_url=app_url, timeout=10) as c:
            answered = [c.post("/v1/classify", content=png(i), headers={"content-type": "image/png"}) for i in range(5)]
        results = [f.result() for f in slow]
    assert all(r.status_code == 200 for r in answered), "slow clients hold no worker the others need"
    for seconds, response in results:
        # serve.request_timeout_s = 2: the body read ends there with a JSON 408 (allowing for a loaded machine).
        assert seconds < 10, (seconds, response[:300])
        assert response.startswith(b"HTTP/1.1 408"), response[:300]
        assert b'"body_timeout"' in response


def test_many_bad_requests_interleaved_with_good_ones(app_url, bundle):
    images = [png(100 + i) for i in range(12)]
    want = expected(bundle, images)
    bad = [(kwargs, status, code) for _, kwargs, status, code in _single_cases() if "files" not in kwargs]

    async def mixed() -> list[tuple[str, int, httpx.Response]]:
        limits = httpx.Limits(max_connections=24)
        async with httpx.AsyncClient(base_url=app_url, timeout=60, limits=limits) as c:
            calls = []
            for i in range(max(len(images), len(bad))):
                if i < len(images):
                    calls.append(("good", i, c.post("/v1/classify", content=images[i], headers={"content-type": "image/png"})))
                if i < len(bad):
                    calls.append(("bad", i, c.post("/v1/classify", **bad[i][0])))
            responses = await asyncio.gather(*(call for _, _, call in calls))
            return [(kind, i, r) for (kind, i, _), r in zip(calls, responses, strict=True)]

    for kind, i, r in asyncio.run(mixed()):
        if kind == "good":
            assert r.status_code == 200, r.text
            assert_same(r.json(), want[i])
        else:
            assert (r.status_code, r.json()["error"]["code"]) == bad[i][1:], (i, r.text)


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for m in re.finditer(rf"^{name}\{{(.*?)\}} ([0-9.e+-]+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out.append((labels, float(m.group(2))))
    return out


def test_prometheus_metrics_show_requests_errors_latency_batches_and_model_version(app_url, bundle, ray_metrics_url):
    from near_ray.model.bundle import load_bundle

    version = load_bundle(bundle).model_version
    with httpx.Client(base_url=app_url, timeout=60) as c:
        for i in range(3):
            assert c.post("/v1/classify", content=png(i), headers={"content-type": "image/png"}).status_code == 200
        assert c.post("/v1/classify", **_json("{nope")).status_code == 400
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # Ray's agent exports what replicas reported, every few seconds
        text = httpx.get(ray_metrics_url, timeout=10).text
        ok = [v for labels, v in _samples(text, "ray_near_ray_requests_total")
              if labels.get("application") == "near_input" and labels.get("endpoint") == "/v1/classify"
              and labels.get("status") == "200"]
        bad = [v for labels, v in _samples(text, "ray_near_ray_requests_total")
               if labels.get("application") == "near_input" and labels.get("code") == "malformed_json"]
        # the ingress and the model replica export on their own clocks: wait for both
        batches = sum(v for labels, v in _samples(text, "ray_near_ray_batch_size_count")
                      if labels.get("application") == "near_input")
        if ok and sum(ok) >= 3 and bad and batches >= 3:
            break
        time.sleep(2)
    else:
        pytest.fail(f"near_ray metrics not exported: {[line for line in text.splitlines() if 'near_ray' in line][:20]}")
    latency = _samples(text, "ray_near_ray_request_latency_ms_count")
    assert any(labels.get("endpoint") == "/v1/classify" and v >= 3 for labels, v in latency)
    assert sum(v for labels, v in _samples(text, "ray_near_ray_batch_size_count")
               if labels.get("application") == "near_input") >= 3
    predictions = [(labels, v) for labels, v in _samples(text, "ray_near_ray_predictions_total")
                   if labels.get("application") == "near_input"]
    assert predictions and all(labels["model_version"] == version for labels, _ in predictions)
    assert {labels["abstained"] for labels, _ in predictions} <= {"true", "false"}
    loaded = [(labels, v) for labels, v in _samples(text, "ray_near_ray_model_loaded")
              if labels.get("application") == "near_input"]
    assert loaded and all(v == 1 and labels["model_version"] == version for labels, v in loaded)
    assert np.isfinite([v for _, v in latency]).all()


# ------------------------------------------------------------------------------------------ one hop less
def test_colocated_model_answers_like_the_bundle_and_swaps_bundles_in_place(ray_cluster, bundle, tmp_path):
    from ray import serve

    from near_ray.config import RunConfig
    from near_ray.model.bundle import load_bundle
    from near_ray.serve.app import application, deploy_config, update_bundle

    port = serve_http_port()
    colocated = settings(bundle=bundle, colocate=True, app_name="near_colo", route_prefix="/near_colo")
    assert [d["name"] for d in deploy_config(RunConfig(serve=colocated))["applications"][0]["deployments"]] == ["Ingress"]
    serve.run(application(colocated), name="near_colo", route_prefix="/near_colo", blocking=False)
    other = make_bundle(str(tmp_path / "other"), 6, VOCAB)
    images = [png(200 + i) for i in range(3)]
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/near_colo", timeout=60) as c:
            while time.monotonic() < deadline and c.get("/readyz").status_code != 200:
                time.sleep(0.5)
            for image, want in zip(images, expected(bundle, images), strict=True):
                r = c.post("/v1/classify", content=image, headers={"content-type": "image/png"})
                assert r.status_code == 200, r.text
                assert_same(r.json(), want)
                assert "model;dur=" in r.headers["server-timing"]
            assert c.get("/v1/stats").json()["model"]["requests"] >= 3
            update_bundle(colocated, other)
            new = load_bundle(other).model_version
            while time.monotonic() < deadline:
                r = c.post("/v1/classify", content=images[0], headers={"content-type": "image/png"})
                if r.status_code == 200 and r.json()["model_version"] == new:
                    break
                time.sleep(0.5)
            assert r.json()["model_version"] == new
            assert_same(r.json(), expected(other, images[:1])[0])
    finally:
        serve.delete("near_colo")
