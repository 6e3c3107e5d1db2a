"""The Ray Train worker loop for NeaR fine-tuning (DDP over ``train.num_workers``).

Per-sample state (confidences W [N, V], the epoch's predictions P [N, V], per-sample losses, clean
flags) is global: every worker holds the dense tensors, updates the rows of the samples it saw, and
an all-reduce after each epoch (sum of updates, divided by how often each sample was seen) gives
every worker, and the GMM, the same state. Memory: 2 * N * V * 4 bytes per worker.

One epoch:
  1. neighbours' mean prediction from last epoch's global P (NeaR only);
  2. per batch: logits over the sample's domain vocabulary, the method's loss, the new confidences;
  3. all-reduce W, P and losses; GMM on the losses decides who is clean next epoch;
  4. metrics and a checkpoint (weights + state + optimizer) via ``ray.train.report``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from near_ray.train import loss as L
from near_ray.train.checkpoint import load_checkpoint, save_checkpoint, unwrap
from near_ray.train.data import PixelSpec, to_pixels

TEXT_PREFIXES = ("transformer.", "token_embedding", "positional_embedding", "ln_final", "text_projection", "text.")


def freeze_towers(model: torch.nn.Module, towers: str) -> None:
    """Train the image tower, the text tower or both; the temperature stays fixed."""
    for name, p in model.named_parameters():
        is_text = name.startswith(TEXT_PREFIXES)
        is_image = name.startswith("visual.")
        p.requires_grad = (is_text and towers in ("text", "both")) or (is_image and towers in ("image", "both"))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_(*tensors: torch.Tensor) -> None:
    if _distributed():
        for t in tensors:
            torch.distributed.all_reduce(t)


def _maybe_fail(config: dict[str, Any], epoch: int) -> None:
    """Fault injection for the recovery test: kill this worker once, at a given epoch."""
    at, marker = config.get("fail_once_at_epoch"), config.get("fail_marker")
    if at is not None and marker and epoch == at and not Path(marker).exists():
        import ray.train

        # Die only once the last checkpoint is committed, so the test knows where training must resume.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        Path(marker).write_text(f"killed at epoch {epoch}\n")
        os._exit(1)


class NearState:
    """The global per-sample state, kept identical on every worker."""

    def __init__(self, config: dict[str, Any], device: torch.device) -> None:
        self.candidates = torch.as_tensor(config["candidates"], device=device)
        self.allowed = torch.as_tensor(config["allowed"], device=device)
        self.neighbours = torch.as_tensor(config["neighbours"], device=device)
        self.W0 = torch.as_tensor(config["confidences"], device=device).float()  # the sets' initial evidence
        self.W = self.W0.clone()
        self.P = self.W.clone()  # before any epoch, neighbours "predict" their own label distribution
        self.losses = torch.zeros(len(self.W), device=device)
        self.clean = torch.ones(len(self.W), dtype=torch.bool, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"W": self.W, "P": self.P, "losses": self.losses, "clean": self.clean.to(torch.uint8)}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.W.copy_(state["W"])
        self.P.copy_(state["P"])
        self.losses.copy_(state["losses"])
        self.clean.copy_(state["clean"].bool())


def _phase(method: str, epoch: int, warmup: int) -> str:
    if method == "naive":
        return "ce"
    if method == "near_no_gmm" or epoch < warmup:
        return "pll"
    return "near"


def _text_features(model: torch.nn.Module, tokens: torch.Tensor, cached: torch.Tensor | None, x: torch.Tensor):
    """(image features, text features): through the (DDP) forward so gradients of both towers sync."""
    if cached is not None:
        img, _, _ = model(x, None)[:3]
        return img, cached
    img, txt, _ = model(x, tokens)[:3]
    return img, txt


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Fine-tuning keeps BatchNorm statistics from pretraining (ResNet towers; ViTs have none).

    Frozen statistics make a sample's output independent of its batch, so N DDP workers compute the
    same update as one worker with the same global batch (CPU DDP has no SyncBatchNorm).
    """
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def set_threads(tc: dict[str, Any]) -> None:
    """``train.torch_threads`` when set (Ray gives a worker with under 2 CPUs a single thread)."""
    if tc.get("torch_threads"):
        torch.set_num_threads(int(tc["torch_threads"]))


def shuffle_kwargs(tc: dict[str, Any], epoch: int, rank: int) -> dict[str, Any]:
    """``iter_torch_batches`` arguments for a different, reproducible order every epoch on every worker."""
    if not tc["shuffle_buffer"]:
        return {}
    return {"local_shuffle_buffer_size": tc["shuffle_buffer"], "local_shuffle_seed": tc["seed"] * 100_003 + epoch * 1_009 + rank}


def run_epoch(model, optimizer, shard, state: NearState, config: dict[str, Any], epoch: int, ctx: dict) -> dict:
    """One pass over this worker's shard; returns the epoch's metrics after the global state update."""
    tc = config["train"]
    method, device = config["method"], ctx["device"]
    phase = _phase(method, epoch, tc["warmup_epochs"])
    nb_mean = L.neighbour_mean(state.P, state.neighbours) if method in ("near", "near_no_gmm") else None
    mean_pred = state.P.mean(dim=0, keepdim=True) if epoch > 0 else None
    before = state.W.argmax(dim=1)
    n = len(state.W)
    W_new, P_new = torch.zeros_like(state.W), torch.zeros_like(state.P)
    loss_new, seen = torch.zeros(n, device=device), torch.zeros(n, device=device)
    local_bs = max(1, tc["batch_size"] // ctx["world_size"])
    model.train()
    freeze_batchnorm(model)
    batches = shard.iter_torch_batches(batch_size=local_bs, device=device, drop_last=False,
                                       **shuffle_kwargs(tc, epoch, ctx["rank"]))
    for batch in batches:
        idx = batch["idx"].long()
        x = to_pixels(batch["image"], idx, ctx["pixels"], tc["seed"], epoch)
        count = torch.tensor([float(len(idx))], device=device)
        all_reduce_(count)  # the global batch size, so that DDP's gradient mean is a mean over samples
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx["amp"]):
            img, txt = _text_features(model, ctx["tokens"], ctx["cached_text"], x)
        logits = L.clip_logits(img.float(), txt.float(), ctx["scale"], state.allowed[idx])
        logp = F.log_softmax(logits, dim=1)
        w, cand = state.W[idx], state.candidates[idx]
        prior = None if phase == "ce" else L.confidence_prior(state.W0[idx], mean_pred, tc["prior_power"], tc["balance"])
        if phase == "ce":
            per, new_w = L.hard_cross_entropy(logp, w.argmax(dim=1)), w
        elif phase == "pll":
            per, new_w = L.partial_label_loss(logp, w), L.proden_update(logp.exp(), cand, prior)
        else:
            nb = nb_mean[idx] if nb_mean is not None else None
            per, new_w = L.near_batch_loss(logp, w, cand, state.clean[idx], nb, tc["refine_alpha"], tc["lambda_noisy"],
                                           prior, tc["clean_loss"])
        optimizer.zero_grad(set_to_none=True)
        (per.sum() * ctx["world_size"] / count.clamp_min(1)).backward()
        optimizer.step()
        W_new[idx] += new_w.detach()
        P_new[idx] += logp.detach().exp()
        loss_new[idx] += L.partial_label_loss(logp.detach(), w)
        seen[idx] += 1
    all_reduce_(W_new, P_new, loss_new, seen)
    upd = seen > 0
    state.W[upd] = W_new[upd] / seen[upd].unsqueeze(1)
    state.P[upd] = P_new[upd] / seen[upd].unsqueeze(1)
    state.losses[upd] = loss_new[upd] / seen[upd]
    clean_used = float(state.clean.float().mean()) if phase == "near" else 1.0
    if method in ("near", "near_no_knn") and epoch + 1 >= tc["warmup_epochs"]:
        flags = L.fit_clean_split(state.losses.cpu().numpy(), tc["gmm_clean_threshold"], seed=tc["seed"])
        state.clean.copy_(torch.as_tensor(flags, device=device))
    after = state.W.argmax(dim=1)
    return {
        "epoch": epoch,
        "phase": phase,
        "loss": float(state.losses[upd].mean()) if bool(upd.any()) else float("nan"),
        "clean_fraction": clean_used,
        "label_change_rate": float((after != before).float().mean()),
        "vocab_in_use": int(torch.unique(after).numel()),
        "samples_seen": int(upd.sum()),
    }


class RayTrainSession:
    """What the loop needs from its runtime, served by Ray Train (the normal case)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train, self._torch = ray.train, ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint_dir(self):
        checkpoint = self._train.get_checkpoint()
        return None if checkpoint is None else checkpoint.as_directory()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._torch.prepare_model(model)

    def dataset(self) -> Any:
        return self._train.get_dataset_shard("train")

    def report(self, metrics: dict, folder: str | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(folder) if folder else None
        self._train.report(metrics, checkpoint=checkpoint)


class InProcessSession:
    """One worker in the calling process, without a Ray Train worker group (benchmarks, quick runs).

    Checkpoints are copied to ``folder`` (latest kept), so the run still resumes and exports the same way.
    """

    def __init__(self, dataset: Any, folder: str) -> None:
        self.rank, self.world_size, self.device = 0, 1, torch.device("cpu")
        self._dataset, self.folder = dataset, Path(folder)

    def checkpoint_dir(self):
        from contextlib import nullcontext

        return nullcontext(str(self.folder)) if (self.folder / "meta.json").exists() else None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def dataset(self) -> Any:
        return self._dataset

    def report(self, metrics: dict, folder: str | None) -> None:
        import shutil

        if folder:
            tmp = self.folder.with_name(self.folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(folder, tmp)
            shutil.rmtree(self.folder, ignore_errors=True)
            tmp.rename(self.folder)


def _setup(config: dict[str, Any], device: torch.device):
    from near_ray.clip import create_clip
    from near_ray.config import ModelConfig

    tc = config["train"]
    set_threads(tc)
    torch.manual_seed(tc["seed"])
    np.random.seed(tc["seed"])
    clip = create_clip(ModelConfig(**config["model"]), config["storage"])
    freeze_towers(clip.model, tc["train_towers"])
    tokens = clip.tokenizer(config["prompts"]).to(device)
    clip.model.to(device)
    scale = float(min(100.0, clip.model.logit_scale.exp().item()))
    params = [p for p in clip.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc["lr"], weight_decay=tc["weight_decay"])
    return clip, tokens, scale, optimizer


def train_loop(config: dict[str, Any], session: Any = None) -> None:
    """Ray Train ``train_loop_per_worker`` for NeaR, its ablations and the naive baseline."""
    tc = config["train"]
    session = session or RayTrainSession()
    device = session.device
    clip, tokens, scale, optimizer = _setup(config, device)
    state = NearState(config, device)
    meta: dict[str, Any] = {"epoch": -1, "history": [], "starts": [], "logit_scale": scale}
    if (restored := session.checkpoint_dir()) is not None:
        with restored as folder:
            saved, meta = load_checkpoint(folder, clip.model, optimizer)
        state.restore({k: v.to(device) for k, v in saved.items()})
    start = meta["epoch"] + 1
    meta["starts"] = meta["starts"] + [start]
    model = session.prepare_model(clip.model)
    run_ctx = {
        "device": device,
        "world_size": session.world_size,
        "rank": session.rank,
        "tokens": tokens,
        "scale": scale,
        "amp": device.type == "cuda" and config["model"]["precision"] == "amp",
        "cached_text": None,
        "pixels": PixelSpec(**config["pixels"]),
    }
    if tc["train_towers"] == "image":
        with torch.no_grad():  # frozen text tower: embed the vocabulary once
            run_ctx["cached_text"] = F.normalize(unwrap(model).encode_text(tokens).float(), dim=-1)
    shard = session.dataset()
    for epoch in range(start, max(start, tc["epochs"])):
        _maybe_fail(config, epoch)
        t0 = time.monotonic()
        metrics = run_epoch(model, optimizer, shard, state, config, epoch, run_ctx)
        metrics["epoch_time_s"] = round(time.monotonic() - t0, 3)
        metrics["images_per_s"] = round(metrics["samples_seen"] / max(metrics["epoch_time_s"], 1e-9), 2)
        meta.update(epoch=epoch, history=meta["history"] + [metrics])
        report_epoch(session, metrics, model, optimizer, state.tensors(), meta)
    if start >= tc["epochs"]:  # nothing left to train (a re-run of a finished run): report it once more
        last = dict(meta["history"][-1]) if meta["history"] else {"epoch": -1}
        report_epoch(session, last, model, optimizer, state.tensors(), meta)


def report_epoch(session: Any, metrics: dict, model, optimizer, state: dict[str, torch.Tensor], meta: dict) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (weights, state and optimizer are replicated)."""
    if session.rank != 0:
        session.report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, model, optimizer, state, meta)
        session.report(metrics, folder)
