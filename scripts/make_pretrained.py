"""Make the starting CLIP that near_ray ships for the synthetic world (`model.pretrained: synthetic`).

    .venv/bin/python scripts/make_pretrained.py [--seeds 0,1,2] [--work DIR]

Pretrains `near-tiny` contrastively on the synthetic caption corpus (the offline stand-in for the web
data a production CLIP learned from; its species are not the demo's or the benchmark's) once per
seed, through the same path as `near-ray pretrain` (Ray Train, 2 workers, as the demo uses), and
measures each model on data it never saw: zero-shot caption retrieval on the corpus's held-out
images, and linear-probe species accuracy on the demo's benchmark (a logistic regression on frozen
image embeddings: train split -> test split, per domain). The seed with the best held-out caption
retrieval is written in half precision to near_ray/model/pretrained/near-tiny.synthetic.safetensors
with a JSON beside it (every seed's numbers, the command); `--alt` also writes the runner-up as
`near-tiny.synthetic-alt` (the method benchmark's second starting model). Every step is seeded, so
the same command makes the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from near_ray.storage import Storage, join

OUT = Path(__file__).resolve().parents[1] / "near_ray" / "model" / "pretrained"
log = logging.getLogger("make_pretrained")


def linear_probe(clip: Any, bench: str, st: Storage) -> dict[str, float]:
    """Species accuracy of a logistic regression on frozen image embeddings, per domain (train -> test)."""
    from sklearn.linear_model import LogisticRegression

    from near_ray.images import decode_image
    from near_ray.model.clip import encode_images

    truth = st.read_parquet(join(bench, "truth.parquet")).to_pandas()
    emb = encode_images(clip, [decode_image(st.read_bytes(join(bench, p)), p) for p in truth["path"]])
    out = {}
    for domain, rows in truth.groupby("domain"):
        train, test = rows["split"] == "train", rows["split"] == "test"
        idx = rows.index.to_numpy()
        probe = LogisticRegression(max_iter=2000, C=10.0).fit(emb[idx[train.to_numpy()]], rows["species"][train])
        out[str(domain)] = float((probe.predict(emb[idx[test.to_numpy()]]) == rows["species"][test]).mean())
    out["mean"] = float(np.mean(list(out.values())))
    return out


def main() -> None:
    from safetensors.torch import save_file

    from near_ray.config import load_config
    from near_ray.demo import default_config
    from near_ray.model.clip import create_clip
    from near_ray.ray_session import ensure_ray
    from near_ray.sim.config import DemoConfig
    from near_ray.sim.synth import generate
    from near_ray.train.pretrain import caption_retrieval, pretrain, read_pairs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", default="pretrain_work")
    parser.add_argument("--alt", action="store_true", help="also ship the runner-up as synthetic-alt")
    parser.add_argument("--set", action="append", default=[], help="config overrides (train.pretrain_*, synth.pretrain_*)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    st, work = Storage(), str(Path(args.work).resolve())
    base = load_config(default_config(), [f"storage.workdir={work}", "model.pretrained=random", *args.set],
                       schema=DemoConfig)
    s = base.synth
    corpus, bench = join(work, "corpus"), join(work, "probe_benchmark")
    if not st.exists(join(corpus, "captions.parquet")):
        generate(out=corpus, domains=s.pretrain_domains, species=s.pretrain_species,
                 images_per_species=s.pretrain_images_per_species, image_size=s.image_size, seed=s.pretrain_seed,
                 test_fraction=0.05, storage=st)
    if not st.exists(join(bench, "truth.parquet")):  # the demo's benchmark: what the probe measures
        generate(out=bench, domains=s.domains, species=s.species, images_per_species=s.images_per_species,
                 image_size=s.image_size, seed=s.seed, test_fraction=s.test_fraction, storage=st)
    ensure_ray()
    runs = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        cfg = base.model_copy(deep=True)
        cfg.train.seed = seed
        t0 = time.monotonic()
        info = pretrain(cfg, join(corpus, "captions.parquet"), out=join(work, f"seed{seed}", "model.safetensors"))
        clip = create_clip(cfg.model.model_copy(update={"pretrained": info["weights"]}), st)
        probe = linear_probe(clip, bench, st)
        runs.append({"seed": seed, "weights": info["weights"], "retrieval": info["retrieval"],
                     "linear_probe": probe, "final_loss": info["epochs"][-1]["loss"] if info.get("epochs") else None,
                     "seconds": round(time.monotonic() - t0, 1)})
        log.info("seed %d: retrieval %s, linear probe %s", seed, info["retrieval"], probe)
    ranked = sorted(runs, key=lambda r: (-r["retrieval"]["caption_top1"], r["retrieval"]["rank_percentile"], r["seed"]))
    OUT.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/make_pretrained.py", "--seeds", args.seeds, *(["--alt"] if args.alt else []),
                        *(f"--set {x}" for x in args.set)])
    for tag, run in zip(("synthetic", "synthetic-alt"), ranked[: 2 if args.alt else 1], strict=False):
        from safetensors.torch import load

        weights = {k: v.half() if v.is_floating_point() else v for k, v in load(st.read_bytes(run["weights"])).items()}
        save_file(weights, str(OUT / f"near-tiny.{tag}.safetensors"))
        shipped = create_clip(base.model.model_copy(update={"arch": "near-tiny", "pretrained": tag}), st)
        held = read_pairs(join(corpus, "captions.parquet"), st)[1]
        (OUT / f"near-tiny.{tag}.json").write_text(json.dumps({
            "arch": "near-tiny", "tag": tag, "seed": run["seed"], "dtype": "float16", "command": command,
            "selected_by": "held-out caption retrieval (top-1, then rank percentile)",
            "pretrain": {k: v for k, v in base.train.model_dump().items() if k.startswith("pretrain_")},
            "corpus": {k: v for k, v in s.model_dump().items() if k.startswith("pretrain_")},
            # measured on the shipped half-precision weights; all_seeds holds the float32 numbers
            "retrieval": caption_retrieval(shipped, held, st), "linear_probe": linear_probe(shipped, bench, st),
            "all_seeds": [{k: r[k] for k in ("seed", "retrieval", "linear_probe", "final_loss", "seconds")}
                          for r in runs],
        }, indent=2) + "\n")
        log.info("shipped seed %d as near-tiny.%s", run["seed"], tag)


if __name__ == "__main__":
    main()
