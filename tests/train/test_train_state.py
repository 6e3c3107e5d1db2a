"""The NeaR training state, sized by the candidate sets: it computes what the dense [N, V] version
did (neighbour means at each candidate set, the mean prediction), and no tensor grows with N·V."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from near_ray.train import loss as L
from near_ray.train.data import CandidateArrays, densify
from near_ray.train.loop import NearState


def _arrays(n: int = 40, v: int = 12, k: int = 4, seed: int = 0) -> CandidateArrays:
    """Two domains (vocabulary halves); candidate sets of 1-4 names of the sample's domain; kNN in-domain."""
    rng = np.random.default_rng(seed)
    half = v // 2
    domain_of = rng.integers(0, 2, n)
    width = 4
    cand_idx = np.full((n, width), -1, dtype=np.int64)
    cand_w0 = np.zeros((n, width), dtype=np.float32)
    for i in range(n):
        size = int(rng.integers(1, width + 1))
        names = np.sort(rng.choice(half, size, replace=False)) + half * domain_of[i]
        cand_idx[i, :size] = names
        w = rng.random(size).astype(np.float32) + 0.1
        cand_w0[i, :size] = w / w.sum()
    neighbours = np.full((n, k), -1, dtype=np.int64)
    for i in range(n):
        same = [j for j in np.flatnonzero(domain_of == domain_of[i]) if j != i]
        take = rng.choice(same, min(len(same), int(rng.integers(0, k + 1))), replace=False)
        neighbours[i, : len(take)] = take
    domain_mask = np.zeros((2, v), dtype=bool)
    domain_mask[0, :half], domain_mask[1, half:] = True, True
    return CandidateArrays(cand_idx, cand_w0, domain_of.astype(np.int64), domain_mask, neighbours)


def _dense_neighbour_mean(p: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """The dense rule the state replaces: mean of the neighbours' [V] predictions, own when none."""
    valid = neighbours >= 0
    gathered = p[neighbours.clamp_min(0)] * valid.unsqueeze(-1)
    count = valid.sum(1, keepdim=True)
    return torch.where(count > 0, gathered.sum(1) / count.clamp_min(1), p)


def test_neighbour_means_at_the_candidate_sets_equal_the_dense_computation():
    arrays = _arrays()
    state = NearState(arrays, torch.device("cpu"))
    n, v = len(arrays.cand_idx), arrays.vocabulary_size
    mask = torch.tensor(arrays.cand_idx >= 0)
    # Before any epoch neighbours "predict" their initial confidences.
    w0 = torch.tensor(densify(arrays.cand_idx, arrays.cand_w0, v))
    expected = torch.gather(_dense_neighbour_mean(w0, state.neighbours), 1, state.cand_safe) * mask
    assert torch.allclose(state.nb, expected, atol=1e-6)
    # An epoch: predictions over each sample's domain arrive in batches and are scattered at once.
    logits = torch.randn(n, v).masked_fill(~state.domain_mask[state.domain_of], float("-inf"))
    probs = logits.softmax(1)
    sums, own = torch.zeros_like(state.W), torch.zeros_like(state.W)
    for batch in torch.randperm(n, generator=torch.Generator().manual_seed(0)).split(7):
        state.scatter_to_neighbours(probs[batch], batch, sums)
        own[batch] += state.at_sets(probs[batch], batch)
    got = L.neighbour_mean(sums, state.nb_count, own)
    expected = torch.gather(_dense_neighbour_mean(probs, state.neighbours), 1, state.cand_safe) * mask
    assert torch.allclose(got, expected, atol=1e-6)
    # dense() and at_sets() are inverses on the candidate sets
    rows = torch.arange(n)
    assert torch.allclose(state.at_sets(state.dense(state.W, rows), rows), state.W)
    assert torch.equal(state.labels(), torch.tensor(arrays.cand_idx)[rows, state.W.argmax(1)])


@pytest.mark.parametrize(("n", "v"), [(2_000, 20_000)])
def test_no_state_tensor_grows_with_images_times_names(n, v):
    """100k images x 10k names would be 4 GB per dense matrix; the state holds N·(S + K) + V numbers."""
    rng = np.random.default_rng(0)
    s, k = 6, 10
    cand_idx = np.sort(rng.choice(v, (n, s)), axis=1).astype(np.int64)
    cand_w0 = np.full((n, s), 1 / s, dtype=np.float32)
    neighbours = rng.integers(0, n, (n, k)).astype(np.int64)
    arrays = CandidateArrays(cand_idx, cand_w0, np.zeros(n, dtype=np.int64), np.ones((1, v), dtype=bool), neighbours)
    state = NearState(arrays, torch.device("cpu"))
    sizes = {name: t.numel() for name, t in vars(state).items() if isinstance(t, torch.Tensor)}
    assert max(sizes.values()) <= max(n * k, v), sizes
    assert sum(sizes.values()) < 20 * n * (s + k) + 2 * v < n * v / 10


# ------------------------------------------------------------------------------------------ the registries
def test_every_target_rule_and_every_phase_has_its_entry():
    """Each value of Method.targets that trains has one rule, and each phase a method can be in one loss."""
    from typing import get_args

    from near_ray.train.data import TARGET_RULES
    from near_ray.train.methods import METHODS, Targets

    assert set(TARGET_RULES) == set(get_args(Targets)) - {"none"}  # "none": zero-shot, nothing trains
    phases = {m.phase(e, 2) for m in METHODS.values() if m.trained for e in range(4)}
    assert phases == {"ce", "pll", "near"} and phases <= set(L.LOSSES)


def test_the_registered_losses_compute_what_the_loss_functions_do():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 5, generator=gen).log_softmax(1)
    cand = torch.rand(6, 5, generator=gen) > 0.4
    cand[:, 0] = True
    w = L.restrict(torch.rand(6, 5, generator=gen), cand)
    prior = torch.rand(6, 5, generator=gen) + 0.5
    clean = torch.tensor([True, False, True, False, False, True])
    nb = L.restrict(torch.rand(6, 5, generator=gen), cand)
    ctx = L.BatchContext(prior, clean, lambda: nb, 0.3, 0.7, "hard")
    per, new = L.LOSSES["near"](logp, w, cand, ctx)
    want = L.near_batch_loss(logp, w, cand, clean, nb, 0.3, 0.7, prior, "hard")
    assert torch.equal(per, want[0]) and torch.equal(new, want[1])
    per, new = L.LOSSES["pll"](logp, w, cand, ctx)
    assert torch.equal(per, L.partial_label_loss(logp, w)) and torch.equal(new, L.proden_update(logp.exp(), cand, prior))
    per, new = L.LOSSES["ce"](logp, w, cand, ctx)
    assert torch.equal(per, L.hard_cross_entropy(logp, w.argmax(1))) and new is w


def test_a_loss_registered_for_a_new_phase_is_the_one_an_epoch_trains_with(tmp_path, monkeypatch):
    """The loop dispatches on the phase alone: a new phase is one LOSSES entry (here, in one process, no Ray)."""
    import json

    from near_ray.config import ModelConfig, TrainConfig
    from near_ray.model.clip import create_clip
    from near_ray.storage import Storage
    from near_ray.train.data import TrainPixels
    from near_ray.train.loop import FineTuneJob, train_loop
    from near_ray.train.methods import Method
    from near_ray.train.runner import InProcessSession, MemoryShard

    seen = []

    def probe(logp, w, cand, ctx):
        seen.append((tuple(logp.shape), ctx.neighbours is not None))
        return L.partial_label_loss(logp, w), w

    monkeypatch.setitem(L.LOSSES, "probe", probe)
    monkeypatch.setattr(Method, "phase", lambda self, epoch, warmup: "probe")
    arrays = _arrays(n=12, v=6, k=2)
    model = ModelConfig(arch="near-tiny", pretrained="random", init_seed=0)
    clip = create_clip(model)
    size = clip.pixels.size
    pixels = np.random.default_rng(0).integers(0, 255, (12, size, size, 3), dtype=np.uint8)
    job = FineTuneJob(method="near", model=model, train=TrainConfig(epochs=1, batch_size=6, num_workers=1),
                      storage=Storage(), prompts=[f"a photo of a species number {i}." for i in range(6)],
                      arrays=arrays, pixels=TrainPixels.for_model(clip, False))
    shard = MemoryShard({"idx": np.arange(12, dtype=np.int64), "image": pixels})
    train_loop({"job": job}, InProcessSession(shard, str(tmp_path / "run")))
    assert seen == [((6, 6), True), ((6, 6), True)]  # both batches, with NeaR's neighbours on offer
    assert [h["phase"] for h in json.loads((tmp_path / "run" / "meta.json").read_text())["history"]] == ["probe"]


def test_a_run_name_hashes_what_training_learns_under_the_fields_former_names():
    from near_ray.config import RunConfig
    from near_ray.train.runner import NOT_LEARNED, learned_settings, run_name

    base = RunConfig()
    settings = learned_settings(base.train)
    assert {"refine_k", "refine_alpha", "lr"} <= set(settings) and not {"neighbour_k", "num_workers"} & set(settings)
    assert {"num_workers", "use_gpu", "tracking", "method", "prototype_weight"} <= NOT_LEARNED
    elsewhere = RunConfig.model_validate({"train": {"num_workers": 8, "cpus_per_worker": 3, "torch_threads": 2}})
    assert run_name("near", elsewhere) == run_name("near", base), "where it runs: the same run"
    old = RunConfig.model_validate({"train": {"refine_k": 3}})
    assert run_name("near", old) == run_name("near", RunConfig.model_validate({"train": {"neighbour_k": 3}}))
    assert run_name("near", old) != run_name("near", base)
