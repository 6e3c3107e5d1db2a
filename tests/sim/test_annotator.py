"""The simulated MLLM annotator over real HTTP on 127.0.0.1, fed real benchmark images re-encoded as JPEG."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import free_port, wait_for_port
from PIL import Image

from near_ray.errors import NearRayError
from near_ray.sim.annotator import AnnotatorServer, FaultConfig
from near_ray.sim.noise import NoiseModel, load_profile, load_truth
from near_ray.storage import Storage

TOLERANCE = 0.07  # absolute, per outcome share, over a few hundred answers
PROMPT = "What is the most specific name of this {}? Answer with the name only."


@pytest.fixture(scope="module")
def bench(synth_bench) -> str:
    return synth_bench(species=16, images_per_species=4, image_size=64)


@pytest.fixture(scope="module")
def truth(bench: str) -> list[dict]:
    return Storage().read_parquet(f"{bench}/truth.parquet").to_pylist()


@pytest.fixture(scope="module")
def taxonomy(bench: str) -> dict:
    return Storage().read_json(f"{bench}/taxonomy.json")["domains"]


@pytest.fixture(scope="module")
def server(bench: str):
    with AnnotatorServer(bench, profile="strong", seed=0) as ann:
        yield ann


def as_data_url(bench: str, path: str, size: int = 56, quality: int = 85) -> str:
    """What the label stage sends: the image resized and re-encoded as JPEG, in a data URL."""
    img = Image.open(f"{bench}/{path}").convert("RGB").resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(url: str, meta: str = "bird", seed: int | None = 0, temperature: float = 1.0, **extra) -> dict:
    body = {"model": "simulated-annotator", "temperature": temperature,
            "messages": [{"role": "system", "content": "You are an expert naturalist."},
                         {"role": "user", "content": [{"type": "text", "text": PROMPT.format(meta)},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            **extra}
    if seed is not None:
        body["seed"] = seed
    return body


async def send_all(base_url: str, bodies: list[dict], timeout: float = 30.0) -> list[httpx.Response | Exception]:
    """POST every body with up to 64 requests in flight; exceptions are returned, not raised."""
    sem = asyncio.Semaphore(64)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=64)) as client:
        async def one(body: dict) -> httpx.Response | Exception:
            async with sem:
                try:
                    return await client.post("/chat/completions", json=body)
                except httpx.HTTPError as e:
                    return e
        return await asyncio.gather(*(one(b) for b in bodies))


def stats(server: AnnotatorServer) -> dict:
    return httpx.get(f"{server.url}/stats", timeout=10).json()


# ------------------------------------------------------------------------------------------ answers
def test_outcome_mix_matches_profile_over_http(server: AnnotatorServer, bench: str, truth: list[dict]) -> None:
    httpx.post(f"{server.url}/stats/reset", timeout=10).raise_for_status()
    meta = {"birds": "bird", "flowers": "flower"}
    urls = {r["path"]: as_data_url(bench, r["path"]) for r in truth}
    bodies = [chat_body(urls[r["path"]], meta[r["domain"]], seed=s) for r in truth for s in range(3)]
    responses = asyncio.run(send_all(server.base_url, bodies))
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in responses)
    st = stats(server)
    assert st["requests"] == len(bodies) == 384
    assert st["simulated"] is True
    assert st["outcomes"]["unknown_image"] == 0  # every re-encoded image was recognised
    answered = sum(st["outcomes"][k] for k in load_profile("strong").outcomes)
    assert answered == len(bodies)
    for outcome, share in load_profile("strong").outcomes.items():
        assert abs(st["outcomes"][outcome] / answered - share) <= TOLERANCE, (outcome, st["outcomes"])
    # Independently of the server's own counts: how often does the answer contain the true name?
    true_names = [r["species"].lower() for r in truth for _ in range(3)]
    contents = [r.json()["choices"][0]["message"]["content"].lower() for r in responses]
    hits = sum(name in c for name, c in zip(true_names, contents, strict=True)) / len(contents)
    assert abs(hits - 0.5) <= 0.1
    formatted = sum(c.endswith(".") or c.startswith(("**", "possibly", "this", "the ", "a ")) for c in contents)
    assert 0.2 <= formatted / len(contents) <= 0.6  # format noise wraps a good part of the answers


def test_temperature_zero_is_deterministic(server: AnnotatorServer, bench: str, truth: list[dict]) -> None:
    rows = truth[:16]
    t0 = [chat_body(as_data_url(bench, r["path"]), seed=s, temperature=0.0) for r in rows for s in (1, 2, 3)]
    answers = [r.json()["choices"][0]["message"]["content"] for r in asyncio.run(send_all(server.base_url, t0))]
    for i in range(len(rows)):
        assert len(set(answers[3 * i: 3 * i + 3])) == 1  # same image, any seed → same answer
    t1 = [chat_body(as_data_url(bench, r["path"]), seed=s, temperature=1.0) for r in rows for s in range(6)]
    again = asyncio.run(send_all(server.base_url, t1 + t1[:6]))
    hot = [r.json()["choices"][0]["message"]["content"] for r in again]
    assert hot[-6:] == hot[:6]  # same (image, seed, temperature) → same answer
    varied = sum(len(set(hot[6 * i: 6 * i + 6])) > 1 for i in range(len(rows)))
    assert varied >= len(rows) // 3  # temperature 1 exposes the stochasticity


def test_structured_output_returns_json_object(server: AnnotatorServer, bench: str, truth: list[dict]) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": {"confidence": {"type": "number"}, "species": {"type": "string"}},
        "required": ["confidence", "species"]}}}
    bodies = [chat_body(as_data_url(bench, r["path"]), seed=i, response_format=schema) for i, r in enumerate(truth[:20])]
    bodies.append(chat_body(as_data_url(bench, truth[0]["path"]), response_format={"type": "json_object"}))
    responses = asyncio.run(send_all(server.base_url, bodies))
    for r in responses[:-1]:
        obj = json.loads(r.json()["choices"][0]["message"]["content"])
        assert set(obj) == {"species"} and isinstance(obj["species"], str) and obj["species"]
    assert set(json.loads(responses[-1].json()["choices"][0]["message"]["content"])) == {"name"}


def test_response_is_a_chat_completion(server: AnnotatorServer, bench: str, truth: list[dict]) -> None:
    r = httpx.post(f"{server.base_url}/chat/completions", json=chat_body(as_data_url(bench, truth[3]["path"]), n=2),
                   timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "simulated-annotator" and len(body["choices"]) == 2
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["message"]["role"] == "assistant"
    u = body["usage"]
    assert u["prompt_tokens"] >= 85 and u["completion_tokens"] >= 2
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    models = httpx.get(f"{server.base_url}/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"]
    assert httpx.get(f"{server.url}/healthz", timeout=10).json()["images"] == 128


def test_unknown_image_gets_an_unrecognisable_answer(server: AnnotatorServer) -> None:
    before = stats(server)["outcomes"]["unknown_image"]
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = httpx.post(f"{server.base_url}/chat/completions", json=chat_body(url), timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert stats(server)["outcomes"]["unknown_image"] == before + 1


@pytest.mark.parametrize("content, problem", [
    (b"not json", "not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "a bird?"}]}).encode(), "no image"),
    (json.dumps(chat_body("data:image/png;base64,%%%notbase64")).encode(), "invalid base64"),
    (json.dumps(chat_body("https://example.com/bird.jpg")).encode(), "only data: URLs"),
    (json.dumps(chat_body("data:image/png;base64," + base64.b64encode(b"plain text").decode())).encode(),
     "could not be decoded"),
    (json.dumps({"messages": []}).encode(), "messages"),
])
def test_malformed_requests_get_400_and_server_keeps_serving(server: AnnotatorServer, bench: str, truth: list[dict],
                                                             content: bytes, problem: str) -> None:
    r = httpx.post(f"{server.base_url}/chat/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400
    assert problem in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
    ok = httpx.post(f"{server.base_url}/chat/completions", json=chat_body(as_data_url(bench, truth[0]["path"])),
                    timeout=10)
    assert ok.status_code == 200


# ------------------------------------------------------------------------------------------ faults
def test_faults_at_configured_rates_with_right_status(bench: str, truth: list[dict]) -> None:
    faults = FaultConfig(rate_429=0.2, retry_after_s=2, rate_500=0.1, rate_malformed=0.1, rate_hang=0.05, hang_s=3,
                         latency_s=0.01, latency_sigma=0.5)
    bodies = [chat_body(as_data_url(bench, r["path"]), seed=s) for r in truth for s in range(2)]
    with AnnotatorServer(bench, profile="weak", seed=1, faults=faults) as ann:
        responses = asyncio.run(send_all(ann.base_url, bodies, timeout=1.0))
        st = stats(ann)
        kinds: Counter[str] = Counter()
        for r in responses:
            if isinstance(r, Exception):
                kinds["hang"] += 1
                assert isinstance(r, httpx.TimeoutException)
            elif r.status_code == 429:
                kinds["http_429"] += 1
                assert r.headers["Retry-After"] == "2" and r.json()["error"]["type"] == "rate_limit_error"
            elif r.status_code == 500:
                kinds["http_500"] += 1
                assert r.json()["error"]["type"] == "server_error"
            elif r.status_code == 200:
                try:
                    r.json()
                    kinds["ok"] += 1
                except json.JSONDecodeError:
                    kinds["malformed"] += 1
        n = len(bodies)
        assert st["requests"] == n
        for kind, rate in (("http_429", 0.2), ("http_500", 0.1), ("malformed", 0.1), ("hang", 0.05)):
            assert abs(kinds[kind] / n - rate) <= TOLERANCE, kinds
            assert st["outcomes"][kind] == kinds[kind]
        assert kinds["ok"] + sum(kinds[k] for k in ("http_429", "http_500", "malformed", "hang")) == n
        # A retry of a failed request is a new attempt: it can succeed.
        failed = next(b for b, r in zip(bodies, responses, strict=True)
                      if isinstance(r, httpx.Response) and r.status_code in (429, 500))
        with httpx.Client(timeout=1.0) as client:
            for _ in range(20):
                try:
                    if client.post(f"{ann.base_url}/chat/completions", json=failed).status_code == 200:
                        break
                except httpx.TimeoutException:
                    pass
            else:
                pytest.fail("20 retries of one request never succeeded")


def test_fault_config_from_json_and_bad_input(tmp_path: Path, bench: str) -> None:
    assert FaultConfig.parse('{"rate_429": 0.5}').rate_429 == 0.5
    f = tmp_path / "faults.json"
    f.write_text('{"rate_500": 0.25}')
    assert FaultConfig.parse(str(f)).rate_500 == 0.25
    with pytest.raises(NearRayError, match="rate_429"):
        FaultConfig.parse('{"rate_429": 2}')
    with pytest.raises(NearRayError, match="not valid JSON"):
        FaultConfig.parse('{"rate_429": ')
    with pytest.raises(NearRayError, match="must be ≤ 1"):
        FaultConfig.parse({"rate_429": 0.6, "rate_500": 0.6})
    with pytest.raises(NearRayError, match="strong"):
        AnnotatorServer(bench, profile="no-such-profile")


def test_every_benchmark_image_is_recognised_after_reencoding(bench: str) -> None:
    known, _, index = load_truth(bench, Storage())
    assert len(index.keys) == len(known)  # no two images share a content key
    for i, k in enumerate(known):
        png = Path(bench, k.path).read_bytes()
        jpeg = base64.b64decode(as_data_url(bench, k.path, size=40, quality=60).split(",", 1)[1])
        assert index.lookup(png) == i and index.lookup(jpeg) == i, k.path


# ------------------------------------------------------------------------------------------ noise structure
def _sample_model(bench: str, profile: str, samples: int = 8) -> tuple[NoiseModel, list[list]]:
    known, taxonomy, _ = load_truth(bench, Storage())
    model = NoiseModel(load_profile(profile), known, taxonomy, seed=0)
    draws = [[model.answer(i, s, 1.0) for s in range(samples)] for i in range(len(known))]
    return model, draws


def test_noise_has_class_and_image_structure(bench: str) -> None:
    model, draws = _sample_model(bench, "strong")
    by_class: dict[str, list] = {}
    for i, ds in enumerate(draws):
        by_class.setdefault(model.known[i].species, []).extend(ds)
    sibling_rates = [sum(d.outcome == "sibling" for d in ds) / len(ds) for ds in by_class.values()]
    assert np.std(sibling_rates) > 0.05 and max(sibling_rates) > 2 * np.mean(sibling_rates)  # some classes far worse
    persistent = [Counter(d.name for d in ds if d.outcome == "sibling").most_common(1)[0][1]
                  / sum(d.outcome == "sibling" for d in ds) for ds in by_class.values()
                  if sum(d.outcome == "sibling" for d in ds) >= 4]
    assert np.mean(persistent) >= 0.75  # a class is mistaken for one particular sibling
    correct = [sum(d.outcome in ("exact", "synonym") for d in ds) / len(ds) for ds in draws]
    hard = [c for i, c in enumerate(correct) if model.is_hard(i)]
    easy = [c for i, c in enumerate(correct) if not model.is_hard(i)]
    assert hard and np.mean(hard) < 0.3 < 0.6 < np.mean(easy)  # hard images are answered wrongly on most samples


def test_weak_profile_mix(bench: str) -> None:
    _, draws = _sample_model(bench, "weak", samples=4)
    flat = Counter(d.outcome for ds in draws for d in ds)
    total = sum(flat.values())
    for outcome, share in load_profile("weak").outcomes.items():
        assert abs(flat[outcome] / total - share) <= TOLERANCE, (outcome, flat)
    assert flat["exact"] < flat["coarse"] + flat["hallucinated"]


def test_custom_profile_file(tmp_path: Path, bench: str) -> None:
    import yaml

    p = yaml.safe_load((Path(__file__).parents[2] / "near_ray/sim/profiles/strong.yaml").read_text())
    p["outcomes"] = {"exact": 1.0, "synonym": 0, "coarse": 0, "sibling": 0, "unrelated": 0, "hallucinated": 0,
                     "refusal": 0}
    p["format_noise"] = 0.0
    p["hard_fraction"] = 0.0
    path = tmp_path / "perfect.yaml"
    path.write_text(yaml.safe_dump(p))
    _, draws = _sample_model(bench, str(path), samples=1)
    assert all(d.outcome == "exact" for ds in draws for d in ds)
    p["outcomes"]["exact"] = 0.5
    path.write_text(yaml.safe_dump(p))
    with pytest.raises(NearRayError, match="sum to 1"):
        load_profile(str(path))


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_annotator_serves(bench: str, truth: list[dict]) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "near_ray", "annotator", "--truth", f"{bench}/truth.parquet",
                             "--port", str(port), "--profile", "weak", "--faults", '{"rate_500": 0.0}'],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=60)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       json=chat_body(as_data_url(bench, truth[0]["path"])), timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert httpx.get(f"http://127.0.0.1:{port}/stats", timeout=10).json()["profile"] == "weak"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
