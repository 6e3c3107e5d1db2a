"""Training throughput: the Ray Train loop on 1 worker against a plain single-process torch loop on the
same model, batch, data and threads, and 2 workers against 1.

    .venv/bin/python benchmarks/train_throughput.py [--images-per-species 24] [--epochs 6] [--batch 32] [--repeats 2]

Data: a synthetic benchmark's images with their true labels as refine's artifacts (one candidate per
image, so every method's state is the same size); model near-tiny from random init, the text tower
training (the default). Images/s are the loop's own per-epoch figures after the first epoch (start-up,
the Ray Data decode and the worker group's launch are reported apart). The plain loop does what one
worker does per step (crops, forward, NeaR's loss, backward, Adam step) over tensors already in
memory. Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from near_ray.storage import Storage, join

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def write_artifacts(root: str, work: str, st: Storage) -> list[str]:
    import pyarrow as pa

    from near_ray.images import image_id

    truth = st.read_parquet(join(root, "truth.parquet")).to_pandas()
    train = truth[truth["split"] == "train"]
    uris = [join(root, p) for p in train["path"]]
    vocab = [{"name": n, "domain": d, "synonyms": [n], "support": 1}
             for (d, n), _ in train.groupby(["domain", "species"], sort=True)]
    st.write_json(join(work, "refine/vocabulary.json"), vocab)
    st.write_parquet(join(work, "refine/candidates.parquet"), pa.table({
        "image_id": [image_id(st.read_bytes(u)) for u in uris], "uri": uris, "domain": train["domain"].tolist(),
        "own_labels": [[s] for s in train["species"]], "majority_label": train["species"].tolist(),
        "candidates": [[s] for s in train["species"]], "confidences": [[1.0] for _ in uris]}))
    return uris


def ray_train(cfg, workers: int, threads: int) -> dict:
    from near_ray.train.stage import run_train

    run = cfg.model_copy(deep=True)
    run.train.num_workers, run.train.torch_threads = workers, threads
    run.storage.workdir = cfg.storage.workdir
    t0 = time.monotonic()
    summary = run_train(run)
    steady = [e["images_per_s"] for e in summary["epochs"][1:]]
    return {"images_per_s": statistics.median(steady), "wall_s": round(time.monotonic() - t0, 1),
            "epoch_images_per_s": [e["images_per_s"] for e in summary["epochs"]]}


def plain_loop(cfg, uris: list[str], st: Storage, threads: int) -> dict:
    """One process, no Ray: the same per-step work as a worker, on tensors already in memory."""
    import torch
    import torch.nn.functional as F

    from near_ray.model.clip import create_clip
    from near_ray.train import loss as L
    from near_ray.train.data import TrainPixels, _decode_batch, to_pixels
    from near_ray.train.loop import freeze_batchnorm, freeze_towers

    torch.set_num_threads(threads)
    tc = cfg.train
    clip = create_clip(cfg.model, st)
    freeze_towers(clip.model, tc.train_towers)
    spec = TrainPixels.for_model(clip, tc.augment)
    decoded = _decode_batch({"idx": np.arange(len(uris)), "uri": np.array(uris)}, st, clip.pixels)
    images, idx_all = torch.as_tensor(decoded["image"]), torch.arange(len(uris))
    vocab = st.read_json(cfg.artifact("refine/vocabulary.json"))
    names = [v["name"] for v in vocab]
    cands = st.read_parquet(cfg.artifact("refine/candidates.parquet")).to_pandas()
    labels = torch.tensor([names.index(n) for n in cands["majority_label"]])
    domains = np.array([v["domain"] for v in vocab])
    allowed = torch.tensor(domains[None, :] == cands["domain"].to_numpy()[:, None])
    tokens = clip.tokenizer([cfg.model.prompt_template.format(n) for n in names])
    scale = float(min(100.0, clip.model.logit_scale.exp().item()))
    optimizer = torch.optim.AdamW([p for p in clip.model.parameters() if p.requires_grad], lr=tc.lr,
                                  weight_decay=tc.weight_decay)
    rates = []
    for epoch in range(tc.epochs):
        clip.model.train()
        freeze_batchnorm(clip.model)
        t0 = time.monotonic()
        order = torch.randperm(len(uris), generator=torch.Generator().manual_seed(epoch))
        for batch in order.split(tc.batch_size):
            x = to_pixels(images[batch], idx_all[batch], spec, tc.seed, epoch)
            img, txt, _ = clip.model(x, tokens)[:3]
            logp = F.log_softmax(L.clip_logits(img.float(), txt.float(), scale, allowed[batch]), dim=1)
            loss = L.hard_cross_entropy(logp, labels[batch]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rates.append(len(uris) / (time.monotonic() - t0))
    return {"images_per_s": statistics.median(rates[1:]), "epoch_images_per_s": [round(r, 2) for r in rates]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--species", type=int, default=16)
    parser.add_argument("--images-per-species", type=int, default=24, help="half of them train")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2, help="Ray / plain pairs, alternating")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from near_ray.config import RunConfig
    from near_ray.ray_session import ensure_ray
    from near_ray.sim.synth import generate

    st, work = Storage(), tempfile.mkdtemp(prefix="train_throughput_")
    root = join(work, "bench")
    generate(out=root, domains=["birds", "flowers"], species=args.species, images_per_species=args.images_per_species,
             image_size=64, seed=0, test_fraction=0.5, storage=st)
    cfg = RunConfig.model_validate({"storage": {"workdir": join(work, "run")}, "model": {"arch": "near-tiny", "pretrained": "random"},
                                    "train": {"method": "naive", "epochs": args.epochs, "batch_size": args.batch,
                                              "cpus_per_worker": 0.5, "augment": True}})
    uris = write_artifacts(root, cfg.storage.workdir, st)
    ensure_ray()

    def fresh(name: str):  # a run of its own: a second run in the same workdir would resume the first
        run = cfg.model_copy(deep=True)
        run.storage.workdir = join(work, name)
        write_artifacts(root, run.storage.workdir, st)
        return run

    # Ray and plain alternate, --repeats times: the machine's speed drifts over minutes, and each side
    # gets the same share of it. The figures are medians over every repeat's epochs after the first.
    repeats = []
    for r in range(args.repeats):
        repeats.append({"ray_train_1": ray_train(fresh(f"run1-{r}"), 1, args.threads),
                        "plain": plain_loop(cfg, uris, st, args.threads)})
    steady = {k: [x for rep in repeats for x in rep[k]["epoch_images_per_s"][1:]] for k in ("ray_train_1", "plain")}
    one = {**repeats[0]["ray_train_1"], "images_per_s": statistics.median(steady["ray_train_1"])}
    plain = {**repeats[0]["plain"], "images_per_s": statistics.median(steady["plain"])}
    two = ray_train(fresh("run2"), 2, max(1, args.threads // 2))
    result = {"ray_train_1_images_per_s": round(one["images_per_s"], 2), "plain_images_per_s": round(plain["images_per_s"], 2),
              "ratio": round(one["images_per_s"] / plain["images_per_s"], 3),
              "ray_train_2_images_per_s": round(two["images_per_s"], 2),
              "scaling_2_vs_1": round(two["images_per_s"] / one["images_per_s"], 3),
              "runs": {"ray_train_1": one, "plain": plain, "ray_train_2": two},
              "repeats": repeats,
              "images": len(uris), "model": "near-tiny", "batch": args.batch, "threads": args.threads,
              "load_average_1m": round(os.getloadavg()[0], 2),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "repeats")}, indent=2))


if __name__ == "__main__":
    main()
