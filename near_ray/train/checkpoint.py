"""Training checkpoints as plain files: safetensors for tensors, JSON for the rest (no pickles).

A checkpoint folder holds ``model.safetensors`` (the unwrapped model), ``state.safetensors`` (the
per-sample NeaR state and the optimizer's tensors) and ``meta.json`` (epoch, metric history,
optimizer hyper-parameters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"))
    tensors = {f"state.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    meta = dict(meta)
    if optimizer is not None:
        sd = optimizer.state_dict()
        for pid, entries in sd["state"].items():
            for name, value in entries.items():
                tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        meta["optimizer_param_groups"] = sd["param_groups"]
    save_file(tensors, str(folder / "state.safetensors"))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def load_checkpoint(
    folder: str | Path, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load weights into ``model`` and moments into ``optimizer``; returns (per-sample state, meta)."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    if model is not None:
        unwrap(model).load_state_dict(load_file(str(folder / "model.safetensors")))
    tensors = load_file(str(folder / "state.safetensors"))
    state = {k[len("state.") :]: v for k, v in tensors.items() if k.startswith("state.")}
    if optimizer is not None and "optimizer_param_groups" in meta:
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer_param_groups"]})
    return state, meta
