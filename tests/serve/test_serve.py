"""The Serve application over real HTTP on 127.0.0.1, on the session's Ray cluster.

Serve's HTTP proxy port is fixed once per Ray cluster, so one Serve instance is shared by the session
and each application here runs under its own name and route prefix.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from support.serving import (
    CARS,
    VOCAB,
    assert_same,
    deploy,
    expected,
    load,
    make_bundle,
    png,
    serve_http_port,
    settings,
    wait_healthy,
)

from near_ray.config import RunConfig
from near_ray.model.bundle import load_bundle
from near_ray.serve.app import build_app, run_serve, update_bundle


def huge_header_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data behind it."""
    raw = png(0, (8, 8))
    ihdr = struct.pack(">II", width, height) + raw[24:29]
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_bundles")
    return {
        "a": make_bundle(str(root / "a"), 1, VOCAB),
        "b": make_bundle(str(root / "b"), 2, VOCAB),
        "cars": make_bundle(str(root / "cars"), 3, CARS),
    }


@pytest.fixture(scope="module")
def main_app(ray_cluster, bundles):
    """Bundle "a" (birds + flowers) on two model replicas, at /near_test."""
    from ray import serve

    port = serve_http_port()
    deploy("near_test", settings(bundle=bundles["a"], min_replicas=2, max_replicas=2))
    yield f"http://127.0.0.1:{port}/near_test"
    serve.delete("near_test")


# ------------------------------------------------------------------------------------------ behaviour
def test_predictions_over_http_equal_in_process_classify(main_app, bundles):
    images = [png(s) for s in range(4)]
    want = expected(bundles["a"], images)
    want_flowers = expected(bundles["a"], images, domain="flowers", top_k=1)
    version = load_bundle(bundles["a"]).model_version
    with httpx.Client(base_url=main_app, timeout=60) as c:
        r = c.post("/v1/classify", files={"file": ("0.png", images[0], "image/png")})
        assert r.status_code == 200, r.text
        assert_same(r.json(), want[0])
        assert r.json()["model_version"] == version
        r = c.post("/v1/classify", content=images[1], headers={"content-type": "image/png"})
        assert_same(r.json(), want[1])
        r = c.post("/v1/classify", json={"image_base64": base64.b64encode(images[2]).decode(), "domain": "flowers", "top_k": 1})
        assert_same(r.json(), want_flowers[2])
        assert r.json()["domain"] == "flowers"
        r = c.post("/v1/classify/batch", json={"images": [base64.b64encode(x).decode() for x in images]})
        assert [res["index"] for res in r.json()["results"]] == [0, 1, 2, 3]
        for res, pred in zip(r.json()["results"], want, strict=True):
            assert_same(res, pred)
        r = c.post("/v1/classify/batch", files=[("files", (f"{i}.png", x, "image/png")) for i, x in enumerate(images[:2])])
        for res, pred in zip(r.json()["results"], want[:2], strict=True):
            assert_same(res, pred)
        vocab = c.get("/v1/vocabulary", params={"domain": "flowers"}).json()
        assert [v["name"] for v in vocab["vocabulary"]] == ["Star Lily", "Moon Lily"]
        assert vocab["domains"] == ["birds", "flowers"]
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").json()["model_versions"] == [version]
        assert "/v1/classify" in c.get("/openapi.json").json()["paths"]
        assert c.get("/docs").status_code == 200


def _bad_requests() -> list[tuple[str, dict, int, str]]:
    good = png(7)
    b64 = base64.b64encode(good).decode()
    return [
        ("body over max_body_bytes", {"content": b"\0" * 400_000, "headers": {"content-type": "image/png"}}, 413, "body_too_large"),
        ("chunked body over the limit", {"content": iter([b"\0" * 100_000] * 4), "headers": {"content-type": "image/png"}}, 413, "body_too_large"),
        ("empty body", {"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty_body"),
        ("not an image", {"content": b"hello, world" * 10, "headers": {"content-type": "image/png"}}, 415, "unsupported_media"),
        ("unsupported content-type", {"content": good, "headers": {"content-type": "text/plain"}}, 415, "unsupported_media"),
        ("truncated image", {"content": good[: len(good) // 2], "headers": {"content-type": "image/png"}}, 422, "bad_image"),
        ("decompression bomb header", {"content": huge_header_png(30_000, 30_000), "headers": {"content-type": "image/png"}}, 413, "too_many_pixels"),
        ("over max_pixels", {"content": huge_header_png(2_000, 1_000), "headers": {"content-type": "image/png"}}, 413, "too_many_pixels"),
        ("malformed JSON", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "malformed_json"),
        ("malformed base64", {"json": {"image_base64": "%%%not-base64%%%"}}, 400, "malformed_base64"),
        ("image_url (no fetching)", {"json": {"image_url": "http://169.254.169.254/latest"}}, 400, "url_not_supported"),
        ("unknown domain", {"json": {"image_base64": b64, "domain": "cars"}}, 404, "unknown_domain"),
        ("bad top_k", {"json": {"image_base64": b64, "top_k": "many"}}, 422, "bad_top_k"),
        ("multipart without 'file'", {"files": {"image": ("a.png", good, "image/png")}}, 400, "missing_file"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(main_app, case):
    _, kwargs, status, code = case
    with httpx.Client(base_url=main_app, timeout=60) as c:
        r = c.post("/v1/classify", **kwargs)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
        ok = c.post("/v1/classify", content=png(1), headers={"content-type": "image/png"})
        assert ok.status_code == 200 and ok.json()["predictions"]


def test_batch_endpoint_limits_and_per_item_errors(main_app):
    good = base64.b64encode(png(3)).decode()
    with httpx.Client(base_url=main_app, timeout=60) as c:
        r = c.post("/v1/classify/batch", json=[good] * 5)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"
        r = c.post("/v1/classify/batch", json=[good, "%%%", {"image_url": "http://x"}, {"image_base64": good, "domain": "nope"}])
        assert r.status_code == 200
        results = r.json()["results"]
        assert "predictions" in results[0]
        assert [res["error"]["code"] for res in results[1:]] == ["malformed_base64", "url_not_supported", "unknown_domain"]
        assert "images[1]" in results[1]["error"]["message"]


def test_concurrent_requests_are_batched(main_app):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=main_app, timeout=60) as c:
            body = png(5)
            return await asyncio.gather(
                *(c.post("/v1/classify", content=body, headers={"content-type": "image/png"}) for _ in range(32))
            )

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    sizes = [int(r.headers["x-near-ray-batch-size"]) for r in responses]
    assert max(sizes) > 1, sizes
    with httpx.Client(base_url=main_app, timeout=60) as c:
        histogram = c.get("/v1/stats").json()["model"]["batch_sizes"]
    assert any(int(size) > 1 for size in histogram)


# A model replica killed under load: tests/faults/test_train_serve_faults.py (with its figures).


def test_auth_token_required_when_configured(ray_cluster, bundles):
    from ray import serve

    port = serve_http_port()
    token = "s3cret-token"
    deploy("near_auth", settings(bundle=bundles["a"], auth_token_env="NEAR_RAY_TEST_TOKEN"), {"NEAR_RAY_TEST_TOKEN": token})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/near_auth", timeout=60) as c:
            body = {"content": png(2), "headers": {"content-type": "image/png"}}
            r = c.post("/v1/classify", **body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            r = c.post("/v1/classify", content=png(2), headers={"content-type": "image/png", "authorization": "Bearer wrong"})
            assert r.status_code == 401
            assert c.get("/v1/vocabulary").status_code == 401
            r = c.post("/v1/classify", content=png(2), headers={"content-type": "image/png", "authorization": f"Bearer {token}"})
            assert r.status_code == 200
            assert c.get("/healthz").status_code == 200
    finally:
        serve.delete("near_auth")


def test_request_over_its_deadline_gets_a_json_504_and_the_server_keeps_answering(ray_cluster, bundles):
    from ray import serve

    port = serve_http_port()
    # The model waits 3 s for company before each batch; the ingress gives a request 0.5 s.
    deploy("near_slow", settings(bundle=bundles["a"], batch_wait_timeout_s=3.0, request_timeout_s=0.5))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/near_slow", timeout=60) as c:
            t0 = time.monotonic()
            r = c.post("/v1/classify", content=png(3), headers={"content-type": "image/png"})
            assert r.status_code == 504, r.text
            assert time.monotonic() - t0 < 2.5  # the deadline, not the slow model, ended it
            assert r.json()["error"]["code"] == "timeout"
            assert "serve.request_timeout_s=0.5" in r.json()["error"]["message"]
            assert c.get("/healthz").status_code == 200
            assert c.get("/v1/vocabulary").status_code == 200
    finally:
        serve.delete("near_slow")


def test_several_bundles_chosen_by_domain_via_run_serve(ray_cluster, bundles, tmp_path):
    from ray import serve

    port = serve_http_port()
    # Also the other batcher: Ray Serve's own @serve.batch (the main app uses the adaptive one).
    multi = settings(
        bundles={"birds": bundles["a"], "cars": bundles["cars"]}, app_name="near_multi", route_prefix="/near_multi", port=port, batcher="serve"
    )
    cfg = RunConfig.model_validate({"storage": {"workdir": str(tmp_path)}, "serve": multi.model_dump()})
    assert run_serve(cfg, block=False)["url"] == f"http://127.0.0.1:{port}/near_multi"
    wait_healthy("near_multi", 1)
    images = [png(11), png(12)]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/near_multi", timeout=60) as c:
            r = c.post("/v1/classify", content=images[0], headers={"content-type": "image/png"})
            assert r.status_code == 422 and r.json()["error"]["code"] == "domain_required"
            r = c.post("/v1/classify", params={"domain": "cars"}, content=images[0], headers={"content-type": "image/png"})
            assert_same(r.json(), expected(bundles["cars"], images[:1])[0])
            assert r.json()["domain"] == "cars"
            r = c.post("/v1/classify/batch", params={"domain": "birds"}, json=[base64.b64encode(x).decode() for x in images])
            for res, pred in zip(r.json()["results"], expected(bundles["a"], images, domain="birds"), strict=True):
                assert_same(res, pred)
            assert c.get("/v1/vocabulary").json()["domains"] == ["birds", "cars"]
            assert c.get("/v1/stats").json()["model"]["batcher"] == "serve"
            assert [v["name"] for v in c.get("/v1/vocabulary", params={"domain": "cars"}).json()["vocabulary"]] == [n for n, _ in CARS]
    finally:
        serve.delete("near_multi")


@pytest.mark.slow
def test_bundle_update_changes_model_version_without_failed_requests(main_app, bundles):
    old, new = load_bundle(bundles["a"]).model_version, load_bundle(bundles["b"]).model_version
    assert old != new
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(load, f"{main_app}/v1/classify", 120, None, 2)
        time.sleep(1.0)
        running = settings(bundle=bundles["a"], min_replicas=2, max_replicas=2, app_name="near_test", route_prefix="/near_test")
        update_bundle(running, bundles["b"])
        outcomes = future.result(timeout=300)
    assert all(not isinstance(o, Exception) and o.status_code == 200 for o in outcomes), [
        getattr(o, "text", o) for o in outcomes if isinstance(o, Exception) or o.status_code != 200
    ]
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=main_app, timeout=60) as c:
        while time.monotonic() < deadline:
            r = c.post("/v1/classify", content=png(4), headers={"content-type": "image/png"})
            if r.json()["model_version"] == new:
                break
            time.sleep(0.5)
        assert r.json()["model_version"] == new
        assert_same(r.json(), expected(bundles["b"], [png(4)])[0])


# ------------------------------------------------------------------------------------------ deploy config
def test_written_deploy_config_passes_serves_schema_and_builds(tmp_path):
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    cfg = RunConfig.model_validate(
        {"storage": {"workdir": str(tmp_path / "run")}, "serve": {"max_batch_size": 32, "cpus_per_replica": 0.5, "gpus_per_replica": 1}}
    )
    out = tmp_path / "serve.yaml"
    run_serve(cfg, write_config=str(out), block=False)
    doc = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "near_ray.serve.app:build_app"
    assert app.args["bundle"] == str(tmp_path / "run" / "bundles" / "naive_prototypes")  # train.method's default
    model = next(d for d in app.deployments if d.name == "Classifier")
    assert (model.ray_actor_options.num_cpus, model.ray_actor_options.num_gpus) == (0.5, 1.0)
    assert model.user_config["max_batch_size"] == 32
    assert isinstance(build_app(app.args), Application)


def test_kuberay_rayservice_runs_the_same_application(repo_root):
    """The RayService's serveConfigV2 is what `near-ray serve --write-config` makes from its stated overrides."""
    from near_ray.config import load_config
    from near_ray.serve.app import deploy_config

    text = (repo_root / "cluster/kuberay/rayservice.yaml").read_text()
    service = yaml.safe_load(text)
    command = " ".join(line.lstrip("# ").rstrip("\\ ") for line in text.splitlines() if line.startswith("#   "))
    overrides = [word for word in command.split() if "=" in word and word.startswith(("serve.", "storage."))]
    assert "serve.host=0.0.0.0" in overrides
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == deploy_config(load_config(None, overrides))


def test_serving_a_missing_bundle_fails_fast_naming_it(tmp_path):
    from near_ray.errors import NearRayError

    cfg = RunConfig.model_validate({"storage": {"workdir": str(tmp_path)}, "serve": {"bundle": str(tmp_path / "nope")}})
    with pytest.raises(NearRayError, match="nope is not a model bundle"):
        run_serve(cfg, block=False)
