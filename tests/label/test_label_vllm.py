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
from tiny_vlm import CHAT_TEMPLATE as TINY_CHAT_TEMPLATE
from tiny_vlm import LLAVA_HF_CHAT_TEMPLATE, NO_SYSTEM_CHAT_TEMPLATE

from near_ray.config import ConfigError, LabelConfig, load_config
from near_ray.label.backends.chat_format import system_message, template_accepts_system, template_content_format
from near_ray.label.backends.vllm import answer_row, placement_group_config, processor_options, request_row
from near_ray.storage import Storage

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = os.environ.get("NEAR_RAY_VLLM_PYTHON")


def _label_config(**vllm: object) -> LabelConfig:
    return LabelConfig.model_validate({"backend": {"type": "vllm", "model_source": "/models/tiny", **vllm}})


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
    assert "gpu_memory_utilization" not in opts["engine_kwargs"]
    assert opts["prepare_multimodal_stage"]["enabled"] is True
    # The CPU stages around the engine must not ask for whole CPUs (deadlock on small nodes).
    assert all(opts[s]["num_cpus"] == cfg.actor_cpus for s in ("prepare_multimodal_stage", "chat_template_stage"))


def test_a_one_rank_gpu_engine_keeps_the_default_placement_unless_its_resources_differ() -> None:
    assert placement_group_config(_label_config()) is None
    shared = _label_config(gpus_per_replica=0.5, cpus_per_replica=2, accelerator_type="L4")
    assert placement_group_config(shared) == {"bundles": [{"CPU": 2, "GPU": 0.5}], "strategy": "PACK"}
    assert processor_options(shared)["accelerator_type"] == "L4"


def test_a_parallel_engine_gets_one_whole_gpu_bundle_per_rank_with_room_for_the_engine_actor() -> None:
    cfg = _label_config(tensor_parallel_size=2, gpus_per_replica=2, cpus_per_replica=8)
    assert placement_group_config(cfg) == {"bundles": [{"GPU": 1.0, "CPU": 4.0}] * 2, "strategy": "PACK"}
    assert processor_options(cfg)["engine_kwargs"]["tensor_parallel_size"] == 2
    # The engine actor takes Ray Data's default 1 CPU inside the group; the ranks' workers take none.
    few = _label_config(tensor_parallel_size=2, gpus_per_replica=2, cpus_per_replica=1)
    assert placement_group_config(few)["bundles"] == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 0.5}]
    pipeline = _label_config(tensor_parallel_size=2, gpus_per_replica=4, cpus_per_replica=4,
                             engine_kwargs={"pipeline_parallel_size": 2})
    assert placement_group_config(pipeline)["bundles"] == [{"GPU": 1.0, "CPU": 1.0}] * 4


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["label.backend.tensor_parallel_size=2", "label.backend.gpus_per_replica=1"], "tensor_parallel_size"),
        (["label.backend.engine_kwargs={tensor_parallel_size: 4}", "label.backend.gpus_per_replica=2"], "(4)"),
        (["label.backend.engine_kwargs={pipeline_parallel_size: 2}", "label.backend.gpus_per_replica=1.5"], "(2)"),
        (["label.backend.gpus_per_replica=2"], "tensor_parallel_size"),
    ],
)
def test_an_engine_that_cannot_schedule_is_refused_naming_the_fields(overrides: list[str], why: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["label.backend.type=vllm", *overrides])
    assert "label.backend" in str(err.value) and "gpus_per_replica" in str(err.value) and why in str(err.value)


# vLLM 0.29's ray executor (vllm/v1/executor/ray_executor.py `_init_workers_ray`, ray_utils.py
# `initialize_ray_cluster`) refuses a bundle with more than one GPU, needs a GPU bundle per rank, and
# starts each rank's worker with num_cpus=0, num_gpus=VLLM_RAY_PER_WORKER_GPUS (1.0) in the first
# bundles that hold a GPU. The probe below asks for exactly that inside the engine actor, which
# ray.data.llm's own stage code places (its ray_remote_args_fn) with Ray Data's default 1 CPU.
_PLACEMENT_PROBE = """
import json, sys, ray
from ray.data.llm import vLLMEngineProcessorConfig
from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStage
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

opts = json.loads(sys.argv[1])
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
c = vLLMEngineProcessorConfig(**opts)
stage = vLLMEngineStage(
    fn_constructor_kwargs=dict(batch_size=c.batch_size, max_concurrent_batches=c.max_concurrent_batches,
                               model=c.model_source, engine_kwargs=c.engine_kwargs,
                               placement_group_config=c.placement_group_config),
    map_batches_kwargs=dict(max_concurrency=c.max_concurrent_batches))
args = stage.map_batches_kwargs
world = c.engine_kwargs["tensor_parallel_size"] * c.engine_kwargs.get("pipeline_parallel_size", 1)

@ray.remote
class Worker:
    def gpus(self):
        return ray.get_gpu_ids()

@ray.remote
class Engine:
    def start_workers(self, world):
        pg = ray.util.get_current_placement_group()
        bundles = [i for i, b in enumerate(pg.bundle_specs) if b.get("GPU", 0)]
        if any(b.get("GPU", 0) > 1 for b in pg.bundle_specs) or len(bundles) < world:
            return "refused by vLLM"
        try:
            workers = [Worker.options(num_cpus=0, num_gpus=1.0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_capture_child_tasks=True, placement_group_bundle_index=i)).remote()
                for i in bundles[:world]]
        except ValueError:  # Ray refuses an actor that fits no bundle of its group
            return "workers refused by Ray"
        ready, _ = ray.wait([w.gpus.remote() for w in workers], num_returns=world, timeout=20)
        return "started" if len(ready) == world else "pending"

remote_args = {"num_cpus": args.get("num_cpus", 1), "num_gpus": args.get("num_gpus", 0)}
remote_args.update(args["ray_remote_args_fn"]())
try:
    engine = Engine.options(**remote_args).remote()
except ValueError:
    print("RESULT engine refused by Ray")
    sys.exit(0)
ready, _ = ray.wait([ref := engine.start_workers.remote(world)], timeout=60)
print("RESULT", ray.get(ref) if ready else "engine pending")
"""


def _probe_placement(opts: dict) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.setdefault("RAY_raylet_start_wait_time_s", "180")  # its own Ray cluster, patient with a busy machine
    out = subprocess.run([sys.executable, "-c", _PLACEMENT_PROBE, json.dumps(opts)], capture_output=True, text=True,
                         env=env, timeout=400)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-4000:]
    return lines[-1].removeprefix("RESULT ")


def test_a_tensor_parallel_engine_starts_its_workers_the_way_vllm_asks_for_them() -> None:
    """On a Ray node that advertises 2 GPUs (no GPU is needed to schedule): the ranks' workers start."""
    opts = processor_options(_label_config(tensor_parallel_size=2, gpus_per_replica=2, cpus_per_replica=1))
    assert _probe_placement(opts) == "started"
    # The half-GPU bundles this backend used to emit (TP 2, gpus_per_replica 1, cpus_per_replica 2) hold no
    # rank's worker; with less than a CPU in every bundle the engine actor itself does not fit.
    opts["placement_group_config"] = {"bundles": [{"CPU": 1.0, "GPU": 0.5}] * 2, "strategy": "PACK"}
    assert _probe_placement(opts) == "workers refused by Ray"
    opts["placement_group_config"] = {"bundles": [{"CPU": 0.5, "GPU": 1.0}] * 2, "strategy": "PACK"}
    assert _probe_placement(opts) == "engine refused by Ray"


def test_engines_sharing_a_gpu_each_ask_for_their_share_of_its_memory() -> None:
    def share(**vllm: object) -> float | None:
        return processor_options(_label_config(**vllm))["engine_kwargs"].get("gpu_memory_utilization")

    assert share() is None  # a whole GPU: vLLM's own 0.9
    assert share(gpus_per_replica=0.5) == pytest.approx(0.45)
    assert share(gpus_per_replica=0.25) == pytest.approx(0.225)
    assert share(gpus_per_replica=0.5, gpu_memory_utilization=0.3) == 0.3  # the user's choice stands
    assert share(gpus_per_replica=0.5, engine_kwargs={"gpu_memory_utilization": 0.2}) == 0.2
    assert share(tensor_parallel_size=2, gpus_per_replica=2) is None


def test_engines_sharing_a_gpu_get_a_fixed_kv_cache_and_a_whole_gpu_keeps_vllms_profile(caplog) -> None:
    def kv(**vllm: object) -> int | None:
        return processor_options(_label_config(**vllm))["engine_kwargs"].get("kv_cache_memory_bytes")

    assert kv() is None  # a GPU of its own: vLLM's memory profile sizes the cache
    assert kv(gpus_per_replica=0.5) == 4 * 2**30  # a shared GPU: a neighbour's loading must not size it
    assert kv(gpus_per_replica=0.5, kv_cache_memory_gib=1.5) == int(1.5 * 2**30)
    assert kv(gpus_per_replica=0.5, kv_cache_memory_gib=0) is None
    assert kv(kv_cache_memory_gib=8) == 8 * 2**30
    with caplog.at_level("WARNING"):
        kv(gpus_per_replica=0.5, engine_kwargs={"gpu_memory_utilization": 0.9})
    assert "more than this engine's share" in caplog.text and "label.backend.gpu_memory_utilization" in caplog.text


def test_the_engine_is_sized_for_labeling_prompts_and_the_stage_images() -> None:
    kwargs = processor_options(_label_config())["engine_kwargs"]
    assert kwargs["max_model_len"] == 4096  # not the model's 128k, whose KV cache does not fit a 24 GB GPU
    assert kwargs["limit_mm_per_prompt"] == {"image": {"count": 1, "width": 448, "height": 448}}
    assert kwargs["mm_processor_kwargs"] == {"max_pixels": 448 * 448}
    small = LabelConfig.model_validate({"backend": {"type": "vllm", "max_model_len": -1}, "image": {"max_side": 336}})
    kwargs = processor_options(small)["engine_kwargs"]
    assert kwargs["max_model_len"] == -1  # vLLM 0.29 fits the context to the memory left
    assert kwargs["limit_mm_per_prompt"]["image"] == {"count": 1, "width": 336, "height": 336}
    assert kwargs["mm_processor_kwargs"]["max_pixels"] == 336 * 336
    assert "max_model_len" not in processor_options(_label_config(max_model_len=None))["engine_kwargs"]
    with pytest.raises(ConfigError, match="label.backend.max_model_len"):
        load_config(None, ["label.backend.type=vllm", "label.backend.max_model_len=0"])


def test_user_engine_kwargs_override_the_backend_defaults() -> None:
    cfg = _label_config(max_model_len=256, engine_kwargs={"max_model_len": 1024, "limit_mm_per_prompt": {"image": 2}})
    kwargs = processor_options(cfg)["engine_kwargs"]
    assert kwargs["max_model_len"] == 1024 and kwargs["limit_mm_per_prompt"] == {"image": 2}


def test_in_flight_batches_per_engine_are_a_setting() -> None:
    assert processor_options(_label_config())["max_concurrent_batches"] == 8
    assert processor_options(_label_config(max_concurrent_batches=32))["max_concurrent_batches"] == 32


# ------------------------------------------------------------------------------------------ chat templates
QWEN_VL_STYLE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
)
PHI_VISION_STYLE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
LOOP_MESSAGES_STYLE = (
    "{% set loop_messages = messages[1:] %}{% for m in loop_messages %}{% for part in m.content %}"
    "{{ part.text }}{% endfor %}{% endfor %}"
)


def test_the_content_format_follows_how_a_template_reads_message_content() -> None:
    assert template_content_format(LLAVA_HF_CHAT_TEMPLATE) == "openai"
    assert template_content_format(QWEN_VL_STYLE) == "openai"
    assert template_content_format(LOOP_MESSAGES_STYLE) == "openai"
    assert template_content_format(TINY_CHAT_TEMPLATE) == "openai"
    assert template_content_format(PHI_VISION_STYLE) == "string"


def test_the_content_format_of_a_model_is_read_from_its_folder_or_its_family(tmp_path: Path) -> None:
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "chat_template.jinja").write_text(LLAVA_HF_CHAT_TEMPLATE)
    phi = tmp_path / "phi"
    phi.mkdir()
    (phi / "tokenizer_config.json").write_text(json.dumps({"chat_template": PHI_VISION_STYLE}))

    def fmt(source: str, **vllm: object) -> str:
        return processor_options(_label_config(model_source=source, **vllm))["prepare_multimodal_stage"][
            "chat_template_content_format"]

    assert fmt(str(llava)) == "openai"  # Ray's default, "string", makes this template drop the image
    assert fmt(str(phi)) == "string"
    assert fmt("llava-hf/llava-1.5-7b-hf") == "openai"
    assert fmt("Qwen/Qwen2.5-VL-7B-Instruct") == "openai"
    assert fmt("s3://models/Qwen2.5-VL-72B-Instruct/") == "openai"
    assert fmt("microsoft/Phi-3.5-vision-instruct") == "string"
    assert fmt("OpenGVLab/InternVL2_5-8B") == "string" and fmt("OpenGVLab/InternVL3-8B-hf") == "openai"
    assert fmt(str(llava), chat_template_content_format="string") == "string"  # an explicit setting wins


_RENDER = """
import asyncio, json, sys
from near_ray.config import LabelConfig
from near_ray.label.backends.vllm import processor_options, request_row
from near_ray.label.backends.chat_format import system_message, template_accepts_system, template_content_format
from ray.llm._internal.batch.stages.chat_template_stage import ChatTemplateUDF
from ray.llm._internal.batch.stages.prepare_multimodal_stage import PrepareMultimodalUDF
from vllm.renderers.hf import _detect_content_format

model = sys.argv[1]
request = json.loads(sys.argv[2])
request["image"] = bytes.fromhex(request["image"])
label = LabelConfig.model_validate({"backend": {"type": "vllm", "model_source": model}})
row = request_row(request, max_tokens=8, guided_decoding=False, system_message=system_message(label.backend))

async def render(fmt):
    prepare = PrepareMultimodalUDF("__data", ["messages"], {"model": model}, fmt)
    chat = ChatTemplateUDF("__data", ["messages"], model)
    rows = [o async for o in prepare({"__data": [dict(row)]})][0]["__data"]
    return [o async for o in chat({"__data": rows})][0]["__data"][0]["prompt"]

auto = processor_options(LabelConfig.model_validate({"backend": {"type": "vllm", "model_source": model}}))
template = open(model + "/chat_template.jinja").read()
print("RESULT " + json.dumps({
    "string": asyncio.run(render("string")), "openai": asyncio.run(render("openai")),
    "auto": auto["prepare_multimodal_stage"]["chat_template_content_format"],
    "vllm_detects": _detect_content_format(template, default="string"),
    "near_ray_detects": template_content_format(template)}))
"""


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON, reason="NEAR_RAY_VLLM_PYTHON is unset: run `make test` (builds .venv-vllm)")
def test_rendered_prompts_keep_the_image_and_question_in_the_chosen_content_format(tmp_path: Path) -> None:
    """Ray's own multimodal and chat-template stages render the tiny model's prompts, in both formats."""
    env = _vllm_env()

    def render(*template_flag: str) -> dict:
        model = tmp_path / (template_flag[0].strip("-") if template_flag else "tiny")
        subprocess.run([VLLM_PYTHON, str(REPO / "tests" / "tiny_vlm.py"), str(model), *template_flag], check=True,
                       env=env, timeout=180, capture_output=True)
        request = _request()
        request["image"] = request["image"].hex()
        out = subprocess.run([VLLM_PYTHON, "-c", _RENDER, str(model), json.dumps(request)], env=env, timeout=300,
                             capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, out.stdout[-2000:] + out.stderr[-4000:]
        return json.loads(lines[-1].removeprefix("RESULT "))

    llava = render("--llava-hf-template")
    assert llava["string"].count("<image>") == 0 and "What is this bird?" not in llava["string"]  # Ray's default
    assert llava["openai"].count("<image>") == 1 and "What is this bird?" in llava["openai"]
    assert llava["auto"] == "openai" and llava["near_ray_detects"] == llava["vllm_detects"] == "openai"

    # a template that raises on a system role (llava-v1.6-mistral's shape): the request carries none, and the
    # system text opens the question
    mistral = render("--no-system-template")
    assert mistral["openai"].count("<image>") == 1 and "What is this bird?" in mistral["openai"]
    assert "You name things." in mistral["openai"] and mistral["auto"] == "openai"

    tiny = render()  # a template that reads both formats renders the image either way
    for fmt in ("string", "openai"):
        assert tiny[fmt].count("<image>") == 1 and "What is this bird?" in tiny[fmt], tiny
    assert tiny["near_ray_detects"] == tiny["vllm_detects"]


def test_a_template_that_rejects_the_system_role_gets_the_system_text_in_the_question(tmp_path: Path) -> None:
    assert template_accepts_system(NO_SYSTEM_CHAT_TEMPLATE) is False
    assert template_accepts_system(TINY_CHAT_TEMPLATE) is True
    assert template_accepts_system(LLAVA_HF_CHAT_TEMPLATE) is True
    assert template_accepts_system("{{ messages[0]['nothing']['here'] }}") is None  # cannot tell: keep the message

    folder = tmp_path / "mistral-like"
    folder.mkdir()
    (folder / "chat_template.jinja").write_text(NO_SYSTEM_CHAT_TEMPLATE)
    cfg = _label_config(model_source=str(folder))
    assert system_message(cfg.backend) is False
    messages = request_row(_request(), max_tokens=8, guided_decoding=False,
                           system_message=system_message(cfg.backend))["messages"]
    assert [m["role"] for m in messages] == ["user"]
    assert messages[0]["content"][1]["text"] == "You name things.\n\nWhat is this bird?"
    assert messages[0]["content"][0]["type"] == "image_url"


def test_a_model_not_on_this_machine_goes_by_its_family_and_the_setting_wins() -> None:
    assert system_message(_label_config(model_source="llava-hf/llava-v1.6-mistral-7b-hf").backend) is False
    assert system_message(_label_config(model_source="Qwen/Qwen2.5-VL-7B-Instruct").backend) is True
    assert system_message(_label_config(model_source="llava-hf/llava-v1.6-mistral-7b-hf",
                                        system_prompt="message").backend) is True
    assert system_message(_label_config(model_source="Qwen/Qwen2.5-VL-7B-Instruct", system_prompt="in_user").backend) is False
    messages = request_row(_request(), max_tokens=8, guided_decoding=False)["messages"]  # today's requests
    assert [m["role"] for m in messages] == ["system", "user"]


# ------------------------------------------------------------------------------------------ seeds
def test_requests_carry_their_seed_only_when_samples_differ_by_it() -> None:
    assert request_row(_request(), 32, True, seeded=True)["sampling_params"]["seed"] == 1234
    assert request_row(_request(), 32, True, seeded=False)["sampling_params"]["seed"] is None  # S = 1
    assert request_row(_request(temperature=0.0), 32, True, seeded=True)["sampling_params"]["seed"] is None  # greedy


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
    # The llava-hf-shaped template renders no image from string content: the run only answers if the
    # stage asks vLLM for the format the model needs ("openai", from the family name "llava").
    subprocess.run([VLLM_PYTHON, str(REPO / "tests" / "tiny_vlm.py"), str(built), "--llava-hf-template"], check=True,
                   env=env, timeout=180)
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
        "--set", "label.backend.type=vllm",
        "--set", f"label.backend.model_source={model}",
        "--set", "label.backend.gpus_per_replica=0",
        "--set", "label.backend.cpus_per_replica=0.5",
        "--set", "label.backend.max_tokens=12",
        "--set", "label.backend.engine_kwargs={dtype: float32, max_model_len: 512, enforce_eager: true}",
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
