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
