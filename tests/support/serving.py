"""Serving helpers shared by the Serve tests (tests/serve/), the backbone test and the fault suite: a Serve
instance on a loopback port, deployments under their own names, small bundles and images."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from conftest import free_port, write_test_bundle
from PIL import Image

from near_ray.config import ServeConfig
from near_ray.model.bundle import load_bundle
from near_ray.serve.app import application

VOCAB = [("Red Finch", "birds"), ("Blue Finch", "birds"), ("Grey Finch", "birds"), ("Star Lily", "flowers"), ("Moon Lily", "flowers")]
CARS = [("Sport Coupe", "cars"), ("Family Van", "cars"), ("Pickup", "cars")]


def make_bundle(uri: str, seed: int, vocab: list[tuple[str, str]]) -> str:
    return write_test_bundle(uri, vocab, seed=seed, logit_scale=20.0)


def png(seed: int, size: tuple[int, int] = (50, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def serve_http_port() -> int:
    """Start Serve on a free loopback port, or reuse the instance another test module started."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        client = _get_global_client()
    return int(client.http_config.port)


def wait_healthy(app: str, replicas: int, timeout: float = 120.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status and str(status.status).endswith("RUNNING"):
            states = status.deployments["Classifier"].replica_states
            if states.get("RUNNING", 0) == replicas and sum(states.values()) == replicas:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{app}: not {replicas} healthy replicas after {timeout}s: {serve.status().applications.get(app)}")


def deploy(name: str, settings: ServeConfig, secret_env: dict[str, str] | None = None) -> None:
    from ray import serve

    serve.run(application(settings, secret_env=secret_env), name=name, route_prefix=f"/{name}", blocking=False)
    wait_healthy(name, settings.min_replicas)


def settings(**kw) -> ServeConfig:
    base = dict(
        cpus_per_replica=0.25,
        ingress_cpus=0.1,
        min_replicas=1,
        max_replicas=1,
        max_batch_size=8,
        batch_wait_timeout_s=0.05,
        max_body_bytes=300_000,
        max_pixels=1_000_000,
        max_images_per_request=4,
        decode_threads=2,
    )
    return ServeConfig(**{**base, **kw})


def expected(bundle_uri: str, images: list[bytes], domain: str | None = None, top_k: int = 5):
    b = load_bundle(bundle_uri)
    return b.classify([Image.open(io.BytesIO(x)).convert("RGB") for x in images], top_k=top_k, domain=domain)


def assert_same(result: dict, pred) -> None:
    assert [p["name"] for p in result["predictions"]] == pred.names
    assert np.allclose([p["score"] for p in result["predictions"]], pred.scores, atol=1e-5)
    assert result["abstained"] == pred.abstained


def load(url: str, n: int, started: threading.Event | None = None, workers: int = 4) -> list[httpx.Response | Exception]:
    body = png(9)

    def one(i: int) -> httpx.Response | Exception:
        if started is not None and i == 8:
            started.set()
        try:
            with httpx.Client(timeout=60) as c:
                return c.post(url, content=body, headers={"content-type": "image/png"})
        except httpx.HTTPError as e:
            return e

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))
