"""serve.direct_ingress: the ingress replica answers HTTP itself, bound to serve.host, one hop less.

Serve reads RAY_SERVE_ENABLE_DIRECT_INGRESS when its controller and replicas start, so the working
case runs in a subprocess that starts its own local cluster (as `near-ray serve` does); the session's
cluster, started without it, is the refused case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.serving import VOCAB, assert_same, expected, make_bundle, png

from near_ray.config import RunConfig
from near_ray.errors import NearRayError
from near_ray.serve.app import run_serve

TESTS = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import httpx
    sys.path.insert(0, {tests!r})
    from conftest import free_port
    from support.serving import png
    from near_ray.config import RunConfig
    from near_ray.serve.app import run_serve

    cfg = RunConfig.model_validate({{"storage": {{"workdir": {work!r}}}, "serve": {{
        "bundle": {bundle!r}, "port": free_port(), "app_name": "direct", "route_prefix": "/direct",
        "direct_ingress": True, "cpus_per_replica": 0.5, "ingress_cpus": 0.25, "max_replicas": 1}}}})
    out = run_serve(cfg, block=False)
    answers = {{}}
    for via, base in (("proxy", out["url"]), ("direct", out["direct_urls"][0])):
        r = httpx.post(base + "/v1/classify", content=png(3), headers={{"content-type": "image/png"}}, timeout=60)
        answers[via] = [r.status_code, r.json()]
    bad = httpx.post(out["direct_urls"][0] + "/v1/classify", content=b"not an image",
                     headers={{"content-type": "image/png"}}, timeout=60)
    port = int(out["direct_urls"][0].rsplit(":", 1)[1].split("/")[0])
    listening = []  # the addresses bound to the replica's port (Linux: /proc/net/tcp, state 0A = LISTEN)
    try:
        for line in open("/proc/net/tcp").read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            ip_hex, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                listening.append(".".join(str(b) for b in bytes.fromhex(ip_hex)[::-1]))
    except OSError:
        listening = None
    print("RESULT " + json.dumps({{"out": out, "answers": answers, "bad": [bad.status_code, bad.json()],
                                   "listening": listening}}))
    """
)


def test_direct_ingress_answers_on_the_replicas_own_loopback_port(tmp_path):
    bundle = make_bundle(str(tmp_path / "bundle"), 0, VOCAB)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_DIRECT_INGRESS")}
    script = SCRIPT.format(tests=str(TESTS), work=str(tmp_path / "run"), bundle=bundle)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    (direct,) = result["out"]["direct_urls"]
    assert direct.startswith("http://127.0.0.1:") and direct.endswith("/direct")
    assert direct != result["out"]["url"]  # its own port, not the proxy's
    pred = expected(bundle, [png(3)])[0]
    for via in ("proxy", "direct"):
        status, body = result["answers"][via]
        assert status == 200, (via, body)
        assert_same(body, pred)
    assert result["answers"]["direct"][1] == result["answers"]["proxy"][1]
    status, body = result["bad"]
    assert 400 <= status < 500 and body["error"]["code"]
    if result["listening"] is not None:
        assert result["listening"] == ["127.0.0.1"]


def test_direct_ingress_on_a_cluster_without_it_is_refused_before_deploying(ray_cluster, tmp_path):
    from ray import serve

    bundle = make_bundle(str(tmp_path / "bundle"), 0, VOCAB)
    cfg = RunConfig.model_validate({"storage": {"workdir": str(tmp_path)}, "serve": {
        "bundle": bundle, "app_name": "direct_refused", "route_prefix": "/direct_refused", "direct_ingress": True}})
    with pytest.raises(NearRayError, match="serve.direct_ingress: .*RAY_SERVE_ENABLE_DIRECT_INGRESS=1"):
        run_serve(cfg, block=False)
    try:
        apps = serve.status().applications
    except Exception:  # Serve not started in this session yet: nothing can be deployed either
        apps = {}
    assert "direct_refused" not in apps
