"""The Ray Train worker loop for NeaR fine-tuning (DDP over ``train.num_workers``).

Per-sample state (confidences W on each candidate set, the neighbours' mean prediction there, losses,
clean flags; see ``NearState``) is global: every worker holds it, updates the rows of the samples it
saw, and an all-reduce after each epoch (sum of updates, divided by how often each sample was seen)
gives every worker, and the GMM, the same state. Memory grows with N·|S|, not N·V.

One epoch:
  1. the neighbours' mean prediction at each candidate set, from the last epoch (NeaR only);
  2. per batch: logits over the sample's domain vocabulary, the phase's loss (``loss.LOSSES``), the new
     confidences;
  3. all-reduce W, P and losses; GMM on the losses decides who is clean next epoch;
  4. metrics and a checkpoint (weights + state + optimizer) via ``ray.train.report``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from near_ray.model.preprocess import autocast_settings
from near_ray.train import loss as L
from near_ray.train.checkpoint import load_checkpoint, unwrap
from near_ray.train.data import CandidateArrays, TrainPixels, to_pixels
from near_ray.train.methods import get_method
from near_ray.train.runner import RayTrainSession, epoch_batches, post_epoch, report_epoch, set_threads

if TYPE_CHECKING:
    from near_ray.config import ModelConfig, TrainConfig
    from near_ray.storage import Storage

TEXT_PREFIXES = ("transformer.", "token_embedding", "positional_embedding", "ln_final", "text_projection", "text.")


def freeze_towers(model: torch.nn.Module, towers: str) -> None:
    """Train the image tower, the text tower or both; the temperature stays fixed."""
    for name, p in model.named_parameters():
        is_text = name.startswith(TEXT_PREFIXES)
        is_image = name.startswith("visual.")
        p.requires_grad = (is_text and towers in ("text", "both")) or (is_image and towers in ("image", "both"))


CHECKPOINT_ABOVE = 512  # names: train.grad_checkpointing's auto rule


def text_checkpointing(model: torch.nn.Module, towers: str, names: int, setting: bool | None) -> bool:
    """Gradient checkpointing (open_clip's, in both towers' transformer blocks: the same gradients, less
    memory). Every step sends every vocabulary name through the text tower with autograd when it trains,
    so its kept activations grow with the vocabulary (docs/train.md): ``setting`` None turns it on then,
    above CHECKPOINT_ABOVE names; True or False decides for any tower."""
    enable = towers in ("text", "both") and names > CHECKPOINT_ABOVE if setting is None else setting
    if enable:
        model.set_grad_checkpointing(True)
    return enable


def ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_(*tensors: torch.Tensor) -> None:
    if _distributed():
        for t in tensors:
            torch.distributed.all_reduce(t)


@dataclass
class FaultInjection:
    """Kill a worker once, at the start of ``fail_once_at_epoch`` (the recovery tests): ``fail_marker``
    is written first, so the second attempt knows it already died."""

    fail_once_at_epoch: int
    fail_marker: str


@dataclass
class FineTuneJob:
    """Everything a fine-tuning worker needs, sent to it as one object (train_loop_config={"job": …})."""

    method: str
    model: ModelConfig
    train: TrainConfig
    storage: Storage
    prompts: list[str]  # the prompt of each vocabulary entry
    arrays: Any  # ObjectRef of the CandidateArrays (the object store carries them, not the job), or the arrays
    pixels: TrainPixels
    fault: FaultInjection | None = None
    feed: Any = None  # runner.epoch_feed(): rank 0 posts each epoch's metrics for the driver's progress line


@dataclass
class EpochContext:
    """What stays fixed across a worker's epochs."""

    device: torch.device
    world_size: int
    rank: int
    tokens: torch.Tensor
    scale: float
    amp: bool
    pixels: TrainPixels
    cached_text: torch.Tensor | None = None
    amp_dtype: torch.dtype = torch.bfloat16
    scaler: Any = None  # fp16 autocast: its loss scaled (its gradients underflow otherwise)


def _maybe_fail(fault: FaultInjection | None, epoch: int) -> None:
    """Fault injection for the recovery test: kill this worker once, at a given epoch."""
    if fault is None:
        return
    at, marker = fault.fail_once_at_epoch, fault.fail_marker
    if epoch == at and not Path(marker).exists():
        import ray.train

        # Die only once the last checkpoint is committed, so the test knows where training must resume.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        Path(marker).write_text(f"killed at epoch {epoch}\n")
        os._exit(1)


class NearState:
    """The global per-sample state, kept identical on every worker, sized by the candidate sets.

    W (confidences) lives on each sample's candidate set S_i ([N, S]); so does ``nb``, the mean of its
    neighbours' last predictions at S_i, which is all the refinement needs of them. Predictions are
    never stored per sample: during an epoch each one is scattered at once to the candidate sets of the
    samples that have it as a neighbour (``reverse`` lists), and summed over names for the balance
    prior (``mean_pred`` [V]). Memory: O(N·(S + K) + V) per worker.
    """

    def __init__(self, arrays: CandidateArrays, device: torch.device) -> None:
        # torch.tensor copies: arrays from Ray's object store are read-only
        self.cand_idx = torch.tensor(arrays.cand_idx, device=device)
        self.cand_mask = self.cand_idx >= 0
        self.cand_safe = self.cand_idx.clamp_min(0)
        self.domain_of = torch.tensor(arrays.domain_of, device=device)
        self.domain_mask = torch.tensor(arrays.domain_mask, device=device)
        self.vocabulary_size = arrays.vocabulary_size
        self.W0 = torch.tensor(arrays.cand_w0, device=device).float()  # the sets' initial evidence
        self.W = self.W0.clone()
        self.set_neighbours(torch.tensor(arrays.neighbours, device=device))
        # before any epoch, neighbours "predict" their own label distribution W0
        self.nb = L.neighbour_mean(self._initial_neighbour_sums(), self.nb_count, self.W0)
        self.mean_pred: torch.Tensor | None = None  # [V]: the mean prediction of the last epoch
        self.losses = torch.zeros(len(self.W), device=device)
        self.clean = torch.ones(len(self.W), dtype=torch.bool, device=device)

    def set_neighbours(self, neighbours: torch.Tensor) -> None:
        """[N, K] sample indices (-1 = none): the neighbours whose predictions refine each target."""
        self.neighbours = neighbours
        self.nb_count = (neighbours >= 0).sum(dim=1).float()
        self.rev_ptr, self.rev_i = _reverse(neighbours, len(self.W))

    def dense(self, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[B, S] values of samples ``idx`` on their candidate sets -> [B, V] (0 elsewhere)."""
        out = torch.zeros(len(idx), self.vocabulary_size, dtype=values.dtype, device=values.device)
        return out.scatter_add_(1, self.cand_safe[idx], values * self.cand_mask[idx])

    def at_sets(self, dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[B, V] -> [B, S]: the values at the candidate sets of samples ``rows`` (0 at padding)."""
        return torch.gather(dense, 1, self.cand_safe[rows]) * self.cand_mask[rows]

    def _initial_neighbour_sums(self, chunk: int = 4096) -> torch.Tensor:
        """Σ over valid neighbours j of W0_j at the candidates of i, in chunks of samples ([N, S])."""
        out = torch.zeros_like(self.W0)
        if self.neighbours.shape[1] == 0:
            return out
        for start in range(0, len(out), chunk):
            nbr = self.neighbours[start : start + chunk]
            valid = (nbr >= 0).unsqueeze(-1).unsqueeze(-1)
            theirs = self.cand_idx[nbr.clamp_min(0)]  # [C, K, S_j]
            mine = self.cand_idx[start : start + chunk]  # [C, S_i]
            match = (theirs.unsqueeze(-1) == mine.unsqueeze(1).unsqueeze(2)) & (mine >= 0).unsqueeze(1).unsqueeze(2)
            weights = self.W0[nbr.clamp_min(0)].unsqueeze(-1)  # [C, K, S_j, 1]
            out[start : start + chunk] = (match * valid * weights).sum(dim=(1, 2))
        return out

    def scatter_to_neighbours(self, probs: torch.Tensor, idx: torch.Tensor, sums: torch.Tensor) -> None:
        """Add each batch sample's prediction ``probs`` [B, V] to the neighbour sums of every sample that
        has it as a neighbour, at that sample's candidate set."""
        counts = self.rev_ptr[idx + 1] - self.rev_ptr[idx]
        if int(counts.sum()) == 0:
            return
        row = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), counts)
        first = torch.repeat_interleave(self.rev_ptr[idx], counts)
        offset = torch.arange(len(row), device=idx.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        targets = self.rev_i[first + offset]
        values = probs[row.unsqueeze(1), self.cand_safe[targets]] * self.cand_mask[targets]
        sums.index_add_(0, targets, values)

    def labels(self) -> torch.Tensor:
        """Each sample's current label: the vocabulary index of its most confident candidate."""
        return self.cand_idx.gather(1, self.W.argmax(dim=1, keepdim=True)).squeeze(1)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"W": self.W, "nb": self.nb, "losses": self.losses, "clean": self.clean.to(torch.uint8),
               "neighbours": self.neighbours}
        if self.mean_pred is not None:
            out["mean_pred"] = self.mean_pred
        return out

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.W.copy_(state["W"])
        self.nb.copy_(state["nb"])
        self.losses.copy_(state["losses"])
        self.clean.copy_(state["clean"].bool())
        self.mean_pred = state["mean_pred"].clone() if "mean_pred" in state else None
        if "neighbours" in state:  # found again during training (train.neighbour_space: fine_tuned)
            self.set_neighbours(state["neighbours"].clone())


def _reverse(neighbours: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR lists of who has each sample as a neighbour: samples rev_i[rev_ptr[j]:rev_ptr[j+1]] list j."""
    valid = neighbours >= 0
    owners = torch.arange(n, device=neighbours.device).unsqueeze(1).expand_as(neighbours)[valid]
    listed = neighbours[valid]
    order = torch.argsort(listed, stable=True)
    counts = torch.bincount(listed, minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.long, device=neighbours.device)
    ptr[1:] = counts.cumsum(0)
    return ptr, owners[order]


def _text_features(model: torch.nn.Module, tokens: torch.Tensor, cached: torch.Tensor | None, x: torch.Tensor,
                   active: torch.Tensor | None = None):
    """(image features, text features), through the (DDP) forward so both towers' gradients sync. ``active``
    ([V] bool: the batch's domains' names) sends only those through the text tower; the other rows are
    zeros no logit reads (logits are masked to a sample's domain): the same loss and gradients."""
    if cached is not None:
        img, _, _ = model(x, None)[:3]
        return img, cached
    if active is not None:
        rows = active.nonzero().squeeze(1)
        img, part, _ = model(x, tokens[rows])[:3]
        return img, part.new_zeros((tokens.shape[0], part.shape[1])).index_copy(0, rows, part)
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


def run_epoch(model, optimizer, shard, state: NearState, job: FineTuneJob, epoch: int, ctx: EpochContext) -> dict:
    """One pass over this worker's shard; returns the epoch's metrics after the global state update."""
    tc, method, device = job.train, get_method(job.method), ctx.device
    phase = method.phase(epoch, tc.warmup_epochs)
    mean_pred = state.mean_pred.unsqueeze(0) if state.mean_pred is not None and epoch > 0 else None
    before = state.labels()
    n = len(state.W)
    W_new, nb_sums, own = torch.zeros_like(state.W), torch.zeros_like(state.W), torch.zeros_like(state.W)
    prob_sum = torch.zeros(state.vocabulary_size, device=device)
    refresh = method.neighbour_refinement and tc.neighbour_space == "fine_tuned" and epoch + 1 >= tc.warmup_epochs
    feats, text = None, None  # each sample's image embedding this epoch, the vocabulary's (refresh only)
    loss_new, seen = torch.zeros(n, device=device), torch.zeros(n, device=device)
    local_bs = max(1, tc.batch_size // ctx.world_size)
    model.train()
    freeze_batchnorm(model)
    batches = epoch_batches(shard, local_bs, device, tc, epoch, ctx.rank)
    for batch in batches:
        idx = batch["idx"].long()
        x = to_pixels(batch["image"], idx, ctx.pixels, tc.seed, epoch)
        count = torch.tensor([float(len(idx))], device=device)
        all_reduce_(count)  # the global batch size, so that DDP's gradient mean is a mean over samples
        active = None if refresh else state.domain_mask[state.domain_of[idx]].any(dim=0)  # the batch's domains
        with torch.autocast(device.type, dtype=ctx.amp_dtype, enabled=ctx.amp):
            img, txt = _text_features(model, ctx.tokens, ctx.cached_text, x,
                                      None if active is None or bool(active.all()) else active)
        logits = L.clip_logits(img.float(), txt.float(), ctx.scale, state.domain_mask[state.domain_of[idx]])
        logp = F.log_softmax(logits, dim=1)
        w, cand = state.dense(state.W[idx], idx), state.dense(state.cand_mask[idx].float(), idx) > 0
        prior = None if phase == "ce" else L.confidence_prior(state.dense(state.W0[idx], idx), mean_pred,
                                                               tc.prior_power, tc.balance)
        nb = partial(state.dense, state.nb[idx], idx) if method.neighbour_refinement else None
        batch_ctx = L.BatchContext(prior, state.clean[idx], nb, tc.neighbour_alpha, tc.lambda_noisy, tc.clean_loss)
        per, new_w = L.LOSSES[phase](logp, w, cand, batch_ctx)
        optimizer.zero_grad(set_to_none=True)
        loss = per.sum() * ctx.world_size / count.clamp_min(1)
        (ctx.scaler.scale(loss) if ctx.scaler else loss).backward()
        ctx.scaler.step(optimizer) if ctx.scaler else optimizer.step()  # fp16: an overflowed step is skipped
        ctx.scaler.update() if ctx.scaler else None
        probs = logp.detach().exp()
        W_new[idx] += state.at_sets(new_w.detach(), idx)
        own[idx] += state.at_sets(probs, idx)
        state.scatter_to_neighbours(probs, idx, nb_sums)
        prob_sum += probs.sum(dim=0)
        loss_new[idx] += L.partial_label_loss(logp.detach(), w)
        seen[idx] += 1
        if refresh:
            feats = torch.zeros(n, img.shape[1], device=device) if feats is None else feats
            feats[idx] += F.normalize(img.detach().float(), dim=-1)
            text = txt.detach().float()
    all_reduce_(W_new, nb_sums, own, prob_sum, loss_new, seen)
    upd = seen > 0
    state.W[upd] = W_new[upd] / seen[upd].unsqueeze(1)
    state.nb = L.neighbour_mean(nb_sums, state.nb_count, own / seen.clamp_min(1).unsqueeze(1))
    state.mean_pred = prob_sum / n
    state.losses[upd] = loss_new[upd] / seen[upd]
    if refresh and feats is not None:  # next epoch's neighbours, from the model this epoch ended with
        all_reduce_(feats, text)  # the workers' text embeddings are the same model's: their mean is it
        text = text / ctx.world_size
        state.set_neighbours(L.logit_space_neighbours(feats / seen.clamp_min(1).unsqueeze(1), text, state.domain_of,
                                                      state.domain_mask, state.neighbours.shape[1]))
    clean_used = float(state.clean.float().mean()) if phase == "near" else 1.0
    if method.gmm and epoch + 1 >= tc.warmup_epochs:
        flags = L.fit_clean_split(state.losses.cpu().numpy(), tc.gmm_clean_threshold, seed=tc.seed)
        state.clean.copy_(torch.as_tensor(flags, device=device))
    after = state.labels()
    return {
        "epoch": epoch,
        "phase": phase,
        "loss": float(state.losses[upd].mean()) if bool(upd.any()) else float("nan"),
        "clean_fraction": clean_used,
        "label_change_rate": float((after != before).float().mean()),
        "vocab_in_use": int(torch.unique(after).numel()),
        "samples_seen": int(upd.sum()),
    }


def _setup(job: FineTuneJob, device: torch.device):
    from near_ray.model.clip import create_clip

    tc = job.train
    set_threads(tc)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    clip = create_clip(job.model, job.storage)
    freeze_towers(clip.model, tc.train_towers)
    text_checkpointing(clip.model, tc.train_towers, len(job.prompts), tc.grad_checkpointing)
    tokens = clip.tokenizer(job.prompts).to(device)
    clip.model.to(device)
    scale = float(min(100.0, clip.model.logit_scale.exp().item()))
    params = [p for p in clip.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    return clip, tokens, scale, optimizer


def train_loop(config: dict[str, Any], session: Any = None) -> None:
    """Ray Train ``train_loop_per_worker`` for NeaR, its ablations and the naive baseline
    (``config = {"job": FineTuneJob}``)."""
    job: FineTuneJob = config["job"]
    tc = job.train
    session = session or RayTrainSession()
    device = session.device
    clip, tokens, scale, optimizer = _setup(job, device)
    arrays = job.arrays if isinstance(job.arrays, CandidateArrays) else ray_get(job.arrays)
    state = NearState(arrays, device)
    meta: dict[str, Any] = {"epoch": -1, "history": [], "starts": [], "logit_scale": scale}
    if (restored := session.checkpoint_dir()) is not None:
        with restored as folder:
            saved, meta = load_checkpoint(folder, clip.model, optimizer)
        state.restore({k: v.to(device) for k, v in saved.items()})
    start = meta["epoch"] + 1
    meta["starts"] = meta["starts"] + [start]
    model = session.prepare_model(clip.model)
    amp, amp_dtype, scaled = autocast_settings(job.model.precision, device)
    ctx = EpochContext(device=device, world_size=session.world_size, rank=session.rank, tokens=tokens, scale=scale,
                       amp=amp, amp_dtype=amp_dtype, pixels=job.pixels,
                       scaler=torch.amp.GradScaler("cuda") if scaled else None)  # a resume starts a new scale
    if tc.train_towers == "image":
        with torch.no_grad():  # frozen text tower: embed the vocabulary once
            ctx.cached_text = F.normalize(unwrap(model).encode_text(tokens).float(), dim=-1)
    shard = session.dataset()
    for epoch in range(start, max(start, tc.epochs)):
        _maybe_fail(job.fault, epoch)
        t0 = time.monotonic()
        metrics = run_epoch(model, optimizer, shard, state, job, epoch, ctx)
        metrics["epoch_time_s"] = round(time.monotonic() - t0, 3)
        metrics["images_per_s"] = round(metrics["samples_seen"] / max(metrics["epoch_time_s"], 1e-9), 2)
        meta.update(epoch=epoch, history=meta["history"] + [metrics])
        report_epoch(session, metrics, model, optimizer, state.tensors(), meta)
        if session.rank == 0:
            post_epoch(job.feed, metrics)
    if start >= tc.epochs:  # nothing left to train (a re-run of a finished run): report it once more
        last = dict(meta["history"][-1]) if meta["history"] else {"epoch": -1}
        report_epoch(session, last, model, optimizer, state.tensors(), meta)
