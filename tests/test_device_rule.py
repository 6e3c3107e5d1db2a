"""The device rule: a process that Ray gave GPUs which torch cannot use fails loudly, never falls back to the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A Ray cluster of its own that declares one GPU on this CPU-only machine: Ray assigns it to a task,
# sets CUDA_VISIBLE_DEVICES, and torch finds no CUDA device, as on a node whose driver is too old.
SCRIPT = """
import os, ray
ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
         runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(__import__("sys").path)}})

@ray.remote(num_gpus=1, num_cpus=0)
def with_gpu():
    from near_ray.device import torch_device
    try:
        return "device " + torch_device()
    except Exception as e:
        return f"{type(e).__name__}: {e}"

@ray.remote(num_gpus=0, num_cpus=0)
def without_gpu():
    from near_ray.device import torch_device
    return "device " + torch_device()

print(ray.get(with_gpu.remote()))
print(ray.get(without_gpu.remote()))
ray.shutdown()
"""


@pytest.mark.slow
def test_gpus_assigned_but_no_cuda_is_a_clear_error_and_no_gpus_is_the_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this check is about a node where torch sees no CUDA device")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("device", "DeviceError"))]
    assert out.returncode == 0, out.stderr[-3000:]
    assert lines[0].startswith("DeviceError: Ray assigned GPU(s)"), lines
    assert "sees no CUDA device" in lines[0] and "gpus_per_replica: 0" in lines[0]
    assert lines[1] == "device cpu"


def test_outside_ray_a_cpu_machine_uses_the_cpu():
    import torch

    from near_ray.device import torch_device

    assert torch_device() == ("cuda" if torch.cuda.is_available() else "cpu")
