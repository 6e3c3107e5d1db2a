"""The vLLM backend of the label stage.

The end-to-end test runs the real CLI in the vLLM-on-CPU environment (``NEAR_RAY_VLLM_PYTHON``, set by
``make test``; see scripts/setup_vllm_env.sh) against a tiny randomly initialized LLaVA built on the
spot (tests/tiny_vlm.py): a real Ray Data pipeline, a real vLLM engine, real images. Random weights
answer garbage, so it checks what a user relies on — every image and sample is in the labels table
with a status, token counts and the model — never the names.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from near_ray.config import LabelConfig
from near_ray.label.backends.vllm import answer_row, placement_group_config, processor_options, request_row
from near_ray.storage import Storage

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("NEAR_RAY_VLLM_PYTHON")


def _label_config(**vllm: object) -> LabelConfig:
    return LabelConfig.model_validate({"backend": "vllm", "vllm": {"model_source": "/models/tiny", **vllm}})


def _request(**extra: object) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    row = {
        "image_id": "abc",
        "uri": "s3://b/birds/red.png",
        "domain": "birds",
        "sample": 1,
        "seed": 1234,
        "temperature": 0.7,
        "system_prompt": "You name things.",
        "user_prompt": "What is this bird?",
        "json_schema": '{"type": "object"}',
        "image": buf.getvalue(),
        "mime": "image/png",
    }
    row.update(extra)
    return row


# ------------------------------------------------------------------------------------------ engine options
def test_cpu_engine_gets_a_cpu_only_placement_group_and_a_fixed_pool() -> None:
    cfg = _label_config(gpus_per_replica=0, cpus_per_replica=0.5, engine_kwargs={"max_model_len": 512})
    cfg.pool_size = 2
    opts = processor_options(cfg)
    assert opts["placement_group_config"] == {"bundles": [{"CPU": 0.5}], "strategy": "PACK"}
    assert opts["concurrency"] == (2, 2)
    assert opts["engine_kwargs"]["max_model_len"] == 512
    assert opts["prepare_multimodal_stage"]["enabled"] is True
    # The CPU stages around the engine must not ask for whole CPUs (deadlock on small nodes).
    assert all(opts[s]["num_cpus"] == cfg.actor_cpus for s in ("prepare_multimodal_stage", "chat_template_stage"))


def test_gpu_engine_keeps_the_default_placement_unless_resources_are_uneven() -> None:
    assert placement_group_config(_label_config()) is None
    cfg = _label_config(tensor_parallel_size=2, gpus_per_replica=1, cpus_per_replica=2, accelerator_type="L4")
    pg = placement_group_config(cfg)
    assert pg == {"bundles": [{"CPU": 1.0, "GPU": 0.5}] * 2, "strategy": "PACK"}
    opts = processor_options(cfg)
    assert opts["accelerator_type"] == "L4" and opts["engine_kwargs"]["tensor_parallel_size"] == 2


def test_user_engine_kwargs_override_the_backend_defaults() -> None:
    cfg = _label_config(max_model_len=256, engine_kwargs={"max_model_len": 1024, "limit_mm_per_prompt": {"image": 2}})
    kwargs = processor_options(cfg)["engine_kwargs"]
    assert kwargs["max_model_len"] == 1024 and kwargs["limit_mm_per_prompt"] == {"image": 2}


# ------------------------------------------------------------------------------------------ rows
def test_request_row_carries_the_image_prompts_and_per_row_sampling() -> None:
    out = request_row(_request(), max_tokens=32, guided_decoding=True)
    assert "image" not in out and out["uri"] == "s3://b/birds/red.png"
    system, user = out["messages"]
    assert system["content"] == [{"type": "text", "text": "You name things."}]
    url = user["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).getpixel((0, 0)) == (200, 10, 10)
    assert user["content"][1] == {"type": "text", "text": "What is this bird?"}
    assert out["sampling_params"] == {
        "seed": 1234,
        "temperature": 0.7,
        "max_tokens": 32,
        "structured_outputs": {"json": '{"type": "object"}'},
    }
    assert request_row(_request(), 32, guided_decoding=False)["sampling_params"]["structured_outputs"] is None
    assert (
        request_row(_request(json_schema=""), 32, guided_decoding=True)["sampling_params"]["structured_outputs"] is None
    )


def test_a_failed_request_becomes_an_mllm_error_row_naming_the_image() -> None:
    row = {k: v for k, v in request_row(_request(), 32, True).items() if k not in ("messages", "sampling_params")}
    row["__inference_error__"] = "ValueError: prompt too long"
    out = answer_row(row, model="tiny")
    assert out["status"] == "mllm_error" and out["raw_answer"] is None and out["model"] == "tiny"
    assert "s3://b/birds/red.png" in out["error"] and "prompt too long" in out["error"]
    ok = answer_row(
        {
            **row,
            "__inference_error__": "",
            "generated_text": "a robin",
            "num_input_tokens": 30,
            "num_generated_tokens": 3,
            "time_taken_llm": 0.2,
        },
        model="tiny",
    )
    assert (ok["status"], ok["raw_answer"], ok["input_tokens"], ok["output_tokens"]) == ("ok", "a robin", 30, 3)


# ------------------------------------------------------------------------------------------ end to end
def _write_images(root: Path) -> dict[str, list[Path]]:
    birds, flowers = root / "birds", root / "flowers"
    birds.mkdir(parents=True)
    flowers.mkdir(parents=True)
    images = {"birds": [], "flowers": []}
    for name, colour, fmt in [
        ("red.jpg", (220, 30, 30), "JPEG"),
        ("green.png", (30, 200, 60), "PNG"),
        ("blue.jpg", (20, 40, 230), "JPEG"),
    ]:
        Image.new("RGB", (48, 40), colour).save(birds / name, fmt)
        images["birds"].append(birds / name)
    (birds / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    for name, colour in [("yellow.png", (240, 220, 20)), ("white.png", (250, 250, 250))]:
        Image.new("RGB", (40, 48), colour).save(flowers / name, "PNG")
        images["flowers"].append(flowers / name)
    return images


def _vllm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache: the default (4) is much more than a tiny model needs
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        VLLM_HOST_IP="127.0.0.1",  # vLLM's engine-core sockets stay on loopback
        PYTHONPATH=str(REPO),
    )
    return env


def _run_cli(cmd: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> tuple[int | None, str, str]:
    """Run the CLI in its own process group; on timeout end that group (its local Ray cluster included)."""
    out, err = cwd / "cli.stdout", cwd / "cli.stderr"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=o, stderr=e, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            rc = None
    return rc, out.read_text(), err.read_text()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(780)
@pytest.mark.skipif(not VLLM_PYTHON, reason="NEAR_RAY_VLLM_PYTHON is unset: run `make test` (builds .venv-vllm)")
def test_label_cli_with_a_real_vllm_engine_on_cpu(tmp_path: Path, bucket: str) -> None:
    images = _write_images(tmp_path / "images")
    built = tmp_path / "tiny-llava"
    env = _vllm_env()  # carries the AWS_* variables of the S3 server on 127.0.0.1
    subprocess.run([VLLM_PYTHON, str(REPO / "tests" / "tiny_vlm.py"), str(built)], check=True, env=env, timeout=180)
    # The engine loads the model from object storage, as production does from s3://: ray.data.llm
    # downloads it on the node before vLLM starts.
    model = f"{bucket}/models/tiny-llava"
    for f in built.rglob("*"):
        if f.is_file():
            Storage().write_bytes(f"{model}/{f.relative_to(built).as_posix()}", f.read_bytes())

    # The flowers' meta-class makes their prompt longer than the engine's context: the engine rejects
    # those requests, and the job must go on and record them as mllm_error rows.
    long_meta = " ".join(f"flower{i}" for i in range(300))
    domains = [
        {"name": "birds", "uri": str(tmp_path / "images" / "birds"), "meta_class": "bird"},
        {"name": "flowers", "uri": str(tmp_path / "images" / "flowers"), "meta_class": long_meta},
    ]
    workdir = tmp_path / "run"
    cmd = [
        VLLM_PYTHON, "-m", "near_ray", "label",
        "--set", f"storage.workdir={workdir}",
        "--set", "label.backend=vllm",
        "--set", f"label.vllm.model_source={model}",
        "--set", "label.vllm.gpus_per_replica=0",
        "--set", "label.vllm.cpus_per_replica=0.5",
        "--set", "label.vllm.max_tokens=12",
        "--set", "label.vllm.engine_kwargs={dtype: float32, max_model_len: 512, enforce_eager: true}",
        "--set", "label.samples=2",
        "--set", f"data.domains={json.dumps(domains)}",
    ]  # fmt: skip
    start = time.monotonic()
    rc, stdout, stderr = _run_cli(cmd, tmp_path, env, timeout_s=540)
    wall = time.monotonic() - start
    assert rc == 0, f"near-ray label exited {rc} after {wall:.0f} s:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    summary = json.JSONDecoder().raw_decode(stdout[stdout.index("{\n") :])[0]  # worker logs may follow
    print(f"vLLM label run: {wall:.1f} s wall, summary {summary['by_status']}", file=sys.stderr)

    from near_ray.label.table import read_labels_table

    df = read_labels_table(summary["labels"], Storage()).to_pandas()
    all_uris = {str(p) for ps in images.values() for p in ps} | {str(tmp_path / "images" / "birds" / "broken.jpg")}
    assert set(df["uri"]) == all_uris
    assert all(sorted(g) == [0, 1] for g in df.groupby("uri")["sample"].apply(list)), "every image has S=2 samples"
    assert len(df) == 2 * len(all_uris)
    assert (df["model"] == model).all()

    broken = df[df["uri"].str.endswith("broken.jpg")]
    assert set(broken["status"]) == {"bad_image"} and broken["error"].str.contains("broken.jpg").all()

    birds = df[df["uri"].isin({str(p) for p in images["birds"]})]
    assert set(birds["status"]) <= {"ok", "unparsable"}, birds[["uri", "status", "error"]]
    assert (birds["input_tokens"] > 0).all() and (birds["output_tokens"] > 0).all()
    assert birds["raw_answer"].notna().all() and (birds["latency_s"] > 0).all()
    assert birds.groupby("uri")["seed"].nunique().eq(2).all(), "each sample is asked with its own seed"

    flowers = df[df["domain"] == "flowers"]
    assert set(flowers["status"]) == {"mllm_error"}, flowers[["uri", "status", "error"]]
    assert all(uri in err and "vLLM" in err for uri, err in zip(flowers["uri"], flowers["error"], strict=True))
    assert summary["by_status"].get("mllm_error") == 4 and summary["by_status"].get("bad_image") == 2
