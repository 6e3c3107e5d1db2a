"""What the NeaR training state costs per worker as images (N) and names (V) grow: memory and the
state's part of an epoch, for the state as trained (sized by the candidate sets) beside the dense
[N, V] design it replaced (reproduced here as the reference, the way it worked: W, W0 and P as
[N, V] matrices, the neighbour mean through an [N, K, V] gather).

    .venv/bin/python benchmarks/train_state_scaling.py [--sizes 10000x1000,10000x10000,100000x1000,100000x10000]

Each (design, N, V) runs in a fresh process (peak RSS = that process's maximum resident set). The
epoch replays what the loop does to the state per batch of 256 (densify W, W0, the candidate mask and
the neighbour term to [B, V], NeaR's batch loss on predictions over the sample's domain, write the new
confidences back, pass predictions on to the neighbours) and the update at the end, with random
predictions in place of the CLIP: the model's own cost does not depend on N·V. 10 domains, candidate
sets of 3-10 names, K = 10 neighbours. The dense design is not run where its matrices alone would
exceed --max-dense-gb; the JSON says what it would need. Writes benchmarks/results/train_state_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "train_state_scaling.json"
DOMAINS, K, BATCH = 10, 10, 256


def arrays(n: int, v: int, seed: int = 0):
    import numpy as np

    from near_ray.train.data import CandidateArrays

    rng = np.random.default_rng(seed)
    per = v // DOMAINS
    domain_of = rng.integers(0, DOMAINS, n)
    sizes = rng.integers(3, 11, n)
    cand_idx = np.full((n, 10), -1, dtype=np.int64)
    for i in range(n):
        cand_idx[i, : sizes[i]] = np.sort(rng.choice(per, sizes[i], replace=False)) + per * domain_of[i]
    cand_w0 = np.where(cand_idx >= 0, 1.0, 0.0).astype(np.float32)
    cand_w0 /= cand_w0.sum(1, keepdims=True)
    order = np.argsort(domain_of, kind="stable")  # neighbours: random members of the same domain
    neighbours = np.empty((n, K), dtype=np.int64)
    for d in range(DOMAINS):
        members = order[domain_of[order] == d]
        neighbours[members] = rng.choice(members, (len(members), K))
    domain_mask = np.zeros((DOMAINS, v), dtype=bool)
    for d in range(DOMAINS):
        domain_mask[d, d * per : (d + 1) * per] = True
    return CandidateArrays(cand_idx, cand_w0, domain_of, domain_mask, neighbours)


def epoch_sparse(a) -> float:
    import torch

    from near_ray.train import loss as L
    from near_ray.train.loop import NearState

    state = NearState(a, torch.device("cpu"))
    n = len(state.W)
    t0 = time.perf_counter()
    W_new, nb_sums, own = torch.zeros_like(state.W), torch.zeros_like(state.W), torch.zeros_like(state.W)
    prob_sum, seen = torch.zeros(state.vocabulary_size), torch.zeros(n)
    for idx in torch.randperm(n).split(BATCH):
        logits = torch.randn(len(idx), state.vocabulary_size).masked_fill(
            ~state.domain_mask[state.domain_of[idx]], float("-inf"))
        logp = logits.log_softmax(1)
        w, cand = state.dense(state.W[idx], idx), state.dense(state.cand_mask[idx].float(), idx) > 0
        prior = L.confidence_prior(state.dense(state.W0[idx], idx), None, 1.0, 0.5)
        nb = state.dense(state.nb[idx], idx)
        _, new_w = L.near_batch_loss(logp, w, cand, state.clean[idx], nb, 0.5, 1.0, prior)
        probs = logp.exp()
        W_new[idx] += state.at_sets(new_w, idx)
        own[idx] += state.at_sets(probs, idx)
        state.scatter_to_neighbours(probs, idx, nb_sums)
        prob_sum += probs.sum(0)
        seen[idx] += 1
    state.W = W_new / seen.unsqueeze(1)
    state.nb = L.neighbour_mean(nb_sums, state.nb_count, own / seen.unsqueeze(1))
    return time.perf_counter() - t0


def epoch_dense(a) -> float:
    """The replaced design, as it trained: [N, V] state, neighbour mean through an [N, K, V] gather."""
    import torch

    from near_ray.train import loss as L
    from near_ray.train.data import densify

    v = a.vocabulary_size
    candidates = torch.tensor(densify(a.cand_idx, a.cand_idx >= 0, v))
    allowed = torch.tensor(a.domain_mask[a.domain_of])
    neighbours = torch.tensor(a.neighbours)
    W0 = torch.tensor(densify(a.cand_idx, a.cand_w0, v))
    W, P = W0.clone(), W0.clone()
    n = len(W)
    t0 = time.perf_counter()
    valid = neighbours >= 0
    nb_mean = (P[neighbours.clamp_min(0)] * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
    W_new, P_new, seen = torch.zeros_like(W), torch.zeros_like(P), torch.zeros(n)
    for idx in torch.randperm(n).split(BATCH):
        logp = torch.randn(len(idx), v).masked_fill(~allowed[idx], float("-inf")).log_softmax(1)
        prior = L.confidence_prior(W0[idx], None, 1.0, 0.5)
        _, new_w = L.near_batch_loss(logp, W[idx], candidates[idx], torch.ones(len(idx), dtype=torch.bool),
                                     nb_mean[idx], 0.5, 1.0, prior)
        W_new[idx] += new_w
        P_new[idx] += logp.exp()
        seen[idx] += 1
    W = W_new / seen.unsqueeze(1)
    P = P_new / seen.unsqueeze(1)
    return time.perf_counter() - t0


def dense_bytes(n: int, v: int) -> int:
    """W0, W, P, W_new, P_new, candidates, allowed as [N, V] (4 float, 2 bool) plus the [N, K, V] gather."""
    return n * v * (5 * 4 + 2) + n * K * v * 4


def child(design: str, n: int, v: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    a = arrays(n, v)
    seconds = (epoch_sparse if design == "sparse" else epoch_dense)(a)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"design": design, "n": n, "v": v, "epoch_s": round(seconds, 3), "peak_rss_mb": round(peak_mb, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000x1000,10000x10000,100000x1000,100000x10000,1000000x10000")
    parser.add_argument("--max-dense-gb", type=float, default=12.0)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    rows = []
    for size in args.sizes.split(","):
        n, v = (int(x) for x in size.split("x"))
        for design in ("sparse", "dense"):
            need = dense_bytes(n, v) / 2**30
            if design == "dense" and need > args.max_dense_gb:
                rows.append({"design": design, "n": n, "v": v, "epoch_s": None, "peak_rss_mb": None,
                             "skipped": f"its [N, V] state would need {need:.1f} GB"})
                print(rows[-1])
                continue
            out = subprocess.run([sys.executable, __file__, "--child", design, str(n), str(v)], capture_output=True,
                                 text=True, check=False)
            if out.returncode != 0:
                rows.append({"design": design, "n": n, "v": v, "epoch_s": None, "peak_rss_mb": None,
                             "skipped": f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}"})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    result = {"rows": rows, "setup": {"domains": DOMAINS, "k": K, "batch": BATCH, "candidate_set_sizes": "3-10",
                                      "threads": int(os.environ.get("BENCH_THREADS", "1"))},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
