"""The preflight: every command checks what it needs before Ray starts or the MLLM is paid.

Each failing check runs the installed CLI in a fresh Python process (what a user or `ray job submit`
runs) and asserts exit status 2, one line naming the field, domain or file, and that Ray was never
even imported there (so no Ray session can have started). The MLLM is a real HTTP server on
127.0.0.1 started by the test; S3 is moto.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml

from near_ray.cli import main
from near_ray.config import ConfigError, load_config
from near_ray.storage import Storage

# Runs main() in a new interpreter and reports, as its last stdout line, whether Ray was imported there.
_RUNNER = ("import json, sys\nfrom near_ray.cli import main\nrc = main(sys.argv[1:])\n"
           "print(json.dumps({'rc': rc, 'ray': 'ray' in sys.modules}))")


def cli(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, list[str], str, bool]:
    """(exit status, stderr lines, stdout, whether Ray was imported) of ``near-ray argv`` in a new process."""
    run_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run_env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *argv], cwd=cwd, env={**run_env, **(env or {})},
                          capture_output=True, text=True, timeout=300)
    *out, last = proc.stdout.strip().splitlines() or [""]
    report = json.loads(last)
    return report["rc"], proc.stderr.strip().splitlines(), "\n".join(out), report["ray"]


def write_config(tmp: Path, cfg: dict[str, Any]) -> str:
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def images(folder: Path, n: int = 2) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i, 90, 10)).save(folder / f"{i}.png")
    return folder


class FakeMLLM:
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers every chat completion with ``status``."""

    def __init__(self, status: int) -> None:
        self.status, self.requests = status, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if outer.status == 200:
                    payload = {"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "Bird"}, "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 120, "completion_tokens": 1, "total_tokens": 121}}
                else:
                    payload = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
                data = json.dumps(payload).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> FakeMLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def label_config(tmp: Path, base_url: str, **label: Any) -> dict[str, Any]:
    return {"storage": {"workdir": str(tmp / "run")},
            "data": {"domains": [{"name": "birds", "uri": str(images(tmp / "birds")), "meta_class": "bird"}]},
            "label": {"backend": {"type": "openai", "base_url": base_url, "api_key_env": "NEAR_RAY_TEST_KEY"}, **label}}


def assert_refused(rc: int, err: list[str], ray: bool, command: str, *named: str) -> None:
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"near-ray {command}: error: "), err
    for word in named:
        assert word in err[0], (word, err[0])
    assert not ray, "Ray was imported before the preflight refused"


# ------------------------------------------------------------------------------------------ failing checks
def test_a_missing_domain_folder_is_named_by_its_domain(tmp_path):
    cfg = label_config(tmp_path, "http://127.0.0.1:9/v1")
    cfg["data"]["domains"].append({"name": "flowers", "uri": str(tmp_path / "no-such-folder")})
    rc, err, _, ray = cli("label", "-c", write_config(tmp_path, cfg), cwd=tmp_path)
    assert_refused(rc, err, ray, "label", "data.domains[flowers]", "no-such-folder", "no such folder")


def test_an_empty_domain_folder_is_refused(tmp_path):
    cfg = label_config(tmp_path, "http://127.0.0.1:9/v1")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    cfg["data"]["domains"] = [{"name": "moths", "uri": str(tmp_path / "empty")}]
    rc, err, _, ray = cli("run", "-c", write_config(tmp_path, cfg), cwd=tmp_path)
    assert_refused(rc, err, ray, "run", "data.domains[moths]", "no images in", str(tmp_path / "empty"))


def test_a_workdir_bucket_that_does_not_exist_is_refused_before_any_work(tmp_path, bucket):
    Storage().write_bytes(f"{bucket}/birds/0.png", (images(tmp_path / "png", 1) / "0.png").read_bytes())
    cfg = label_config(tmp_path, "http://127.0.0.1:9/v1")
    cfg["data"]["domains"] = [{"name": "birds", "uri": f"{bucket}/birds"}]
    cfg["storage"]["workdir"] = "s3://near-ray-no-such-bucket/run"
    rc, err, _, ray = cli("label", "-c", write_config(tmp_path, cfg), cwd=tmp_path)
    assert_refused(rc, err, ray, "label", "storage.workdir", "near-ray-no-such-bucket", "does not exist")


def test_a_writable_s3_workdir_keeps_nothing_of_the_probe(tmp_path, bucket):
    from near_ray.preflight import Context, run_checks

    cfg = load_config(None, [f"storage.workdir={bucket}/run"])
    [check] = run_checks(Context(cfg, "label", Storage()), ["workdir"])
    assert check.ok and "writable" in check.detail
    assert list(Storage().list(bucket)) == []  # the probe object was written and deleted


@pytest.mark.skipif(find_spec("vllm") is not None, reason="vLLM is installed in this environment")
def test_the_vllm_backend_without_vllm_is_refused(tmp_path):
    cfg = label_config(tmp_path, "http://127.0.0.1:9/v1", backend={"type": "vllm"})
    rc, err, _, ray = cli("label", "-c", write_config(tmp_path, cfg), cwd=tmp_path)
    assert_refused(rc, err, ray, "label", "label.backend.type", "vllm is not installed")


def test_a_rejected_api_key_is_one_line_after_one_request(tmp_path):
    with FakeMLLM(401) as mllm:
        cfg = label_config(tmp_path, mllm.base_url)
        rc, err, _, ray = cli("label", "-c", write_config(tmp_path, cfg), cwd=tmp_path,
                              env={"NEAR_RAY_TEST_KEY": "sk-wrong-key-0000"})
    assert_refused(rc, err, ray, "label", f"label.backend.api_key (the key in NEAR_RAY_TEST_KEY) rejected by {mllm.base_url}",
                   "HTTP 401", "Incorrect API key")
    assert "sk-wrong" not in err[0]
    [request] = mllm.requests  # one request, authenticated, one output token, an image as the stage sends
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-wrong-key-0000"
    assert request["body"]["max_tokens"] == 1
    assert request["body"]["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_classify_without_a_bundle_names_it(tmp_path):
    cfg = label_config(tmp_path, "http://127.0.0.1:9/v1")
    rc, err, _, ray = cli("classify", "-c", write_config(tmp_path, cfg), cwd=tmp_path)
    assert_refused(rc, err, ray, "classify", "classify.bundle", str(tmp_path / "run" / "bundles" / "naive_prototypes"),
                   "domain 'birds'", "no config.json")


def test_train_without_refine_outputs_and_refine_without_labels_are_refused(tmp_path):
    cfg = label_config(tmp_path, "http://127.0.0.1:9/v1")
    cfg["model"] = {"arch": "near-tiny", "pretrained": "random"}
    config = write_config(tmp_path, cfg)
    rc, err, _, ray = cli("train", "-c", config, cwd=tmp_path)
    assert_refused(rc, err, ray, "train", "refine/vocabulary.json", "run `near-ray refine` first")
    rc, err, _, ray = cli("refine", "-c", config, cwd=tmp_path)
    assert_refused(rc, err, ray, "refine", str(tmp_path / "run" / "labels"), "run `near-ray label` first")


def test_weights_that_are_not_there_are_named(tmp_path):
    cfg = label_config(tmp_path, "http://127.0.0.1:9/v1")
    cfg["model"] = {"arch": "near-tiny", "pretrained": str(tmp_path / "weights.safetensors")}
    rc, err, _, ray = cli("run", "-c", write_config(tmp_path, cfg), cwd=tmp_path)
    assert_refused(rc, err, ray, "run", "model.pretrained", "weights.safetensors", "not found")


# ------------------------------------------------------------------------------------------ the front door
def test_a_bare_command_says_the_config_is_missing(tmp_path):
    rc, err, _, ray = cli("label", cwd=tmp_path)
    assert_refused(rc, err, ray, "label", "no config given", "data.domains is empty")
    assert "127.0.0.1:8000" not in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_validate_prints_the_config_with_secrets_masked_and_each_check(tmp_path, capsys):
    with FakeMLLM(200) as mllm:
        cfg = label_config(tmp_path, mllm.base_url)
        cfg["serve"] = {"runtime_env": {"env_vars": {"HF_TOKEN": "hf_0123456789abcdefWXYZ"}}}
        os.environ["NEAR_RAY_TEST_KEY"] = "sk-live-secret-value-9876"
        try:
            rc = main(["validate", "-c", write_config(tmp_path, cfg), "--for", "label"])
        finally:
            del os.environ["NEAR_RAY_TEST_KEY"]
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "sk-live-secret" not in out and "hf_0123456789" not in out
    assert "api_key_env: 'NEAR_RAY_TEST_KEY (set: ****9876)'" in out and "HF_TOKEN: '****WXYZ'" in out
    assert yaml.safe_load(out.split("\n# checks")[0])["data"]["domains"][0]["name"] == "birds"  # the resolved config
    checks = {line.split()[1]: line for line in out.splitlines() if line.startswith(("ok ", "FAILED "))}
    assert set(checks) >= {"storage", "domains", "workdir", "backend", "mllm"}
    assert all(line.startswith("ok ") for line in checks.values()), checks
    # The MLLM's one answer, counted: 120 + 1 tokens at the default prices.
    assert "120 + 1 tokens, $0.000310" in checks["mllm"] and len(mllm.requests) == 1
    assert "5 of 5 checks passed" in out


def test_validate_runs_every_check_and_fails_with_status_2(tmp_path, capsys):
    cfg = label_config(tmp_path, "http://127.0.0.1:9/v1")
    cfg["data"]["domains"][0]["uri"] = str(tmp_path / "gone")
    rc = main(["validate", "-c", write_config(tmp_path, cfg), "--for", "label"])
    out = capsys.readouterr().out
    assert rc == 2
    failed = [line.split()[1] for line in out.splitlines() if line.startswith("FAILED ")]
    assert failed == ["domains", "mllm"]  # both reported: validate does not stop at the first
    assert "failed: domains, mllm" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "near-ray 0.1.0"


def test_an_unknown_field_gets_the_nearest_known_one(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("label: {sampels: 3, openai: {base_ulr: 'http://x/v1'}}\n"
                 "data: {domains: [{name: birds, uri: x, metaclass: bird}]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "field 'label.sampels': Extra inputs are not permitted (did you mean 'samples'?)" in msg
    assert "'label.backend.base_ulr'" in msg and "did you mean 'base_url'?" in msg
    assert "field 'data.domains[birds].metaclass'" in msg and "did you mean 'meta_class'?" in msg  # by name
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.zzz=1"])
    assert "did you mean" not in str(e.value)  # nothing close: no guess


def test_random_init_is_only_ever_asked_for_by_name():
    assert load_config().model.pretrained == "openai"  # the default is a real pretrained tag
    with pytest.raises(ConfigError, match="model.pretrained.*write 'random' to train from random weights on purpose"):
        load_config(None, ["model.pretrained=null"])
    cfg = load_config(None, ["model.arch=near-tiny", "model.pretrained=random"])
    assert cfg.model.weights is None


def test_a_hub_tag_is_not_fetched_and_says_where_it_comes_from(tmp_path, monkeypatch):
    from near_ray.preflight import Context, run_checks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, [f"storage.workdir={tmp_path}"])
    [check] = run_checks(Context(cfg, "refine", Storage()), ["model"])
    detail = check.detail
    if check.ok:  # the weights happen to be in this machine's Hugging Face cache
        assert "in the local Hugging Face cache" in detail
    else:
        assert "model.pretrained: 'openai' weights of ViT-B-16 are not in the Hugging Face cache" in detail
        assert "HF_HUB_OFFLINE" in detail
    cfg.model.pretrained = "laion5b_nonsense"
    [check] = run_checks(Context(cfg, "refine", Storage()), ["model"])
    assert not check.ok and "'laion5b_nonsense' is not a pretrained tag of ViT-B-16" in check.detail
    assert "laion2b_s34b_b88k" in check.detail  # the tags it has
