"""Which classes the MLLM gets to see: `label.select` random against diversity on a long-tailed collection.

    .venv/bin/python benchmarks/discovery_coverage.py [--draws 200,201,202,203,204] [--per-class 1,2,3,5]

A user's collection is rarely balanced. Each test draw here (a synthesis seed: a new taxonomy and new
images) is 3 domains x 16 species whose sizes follow a Zipf law (the largest class 30x the smallest;
FineR's "random" setting draws its discovery set from such a collection). For budgets of 1, 2, 3 and 5
discovery images per class (48, 96, 144 and 240 images), both rules choose with the product's own code
(near_ray.label.select: the seeded bottom-k sample; k-center greedy over a pool of `label.select_pool` x
the domain's share of that sample), on embeddings of the shipped `synthetic` near-tiny CLIP through the
one pixel path. Reported per budget: the share of classes with at least one chosen image, and the share
of the chosen images that fall in the 8 largest classes of a domain; mean over draws x sample seeds, a
t interval over draws of the paired difference (diversity - random), n = draws. No MLLM is asked and no
model is trained: what a discovery set covers, not how well the classifier then names the collection.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "discovery_coverage.json"
DOMAINS = ("birds", "flowers", "butterflies")
SPECIES, LARGEST, SMALLEST = 16, 60, 2


def class_sizes(rng: np.random.Generator) -> np.ndarray:
    """Per species: a Zipf-law size from LARGEST down to SMALLEST, in a random order."""
    ranks = np.arange(1, SPECIES + 1, dtype=float)
    s = np.log(LARGEST / SMALLEST) / np.log(SPECIES)
    return rng.permutation(np.maximum(SMALLEST, np.round(LARGEST / ranks ** s)).astype(int))


def collection(seed: int, work: str) -> dict[str, list[tuple[str, str]]]:
    """Per domain: (uri, species) of the long-tailed collection of one draw."""
    from near_ray.sim.synth import generate
    from near_ray.storage import Storage, join

    st, root = Storage(), join(work, f"draw{seed}")
    if not st.exists(join(root, "truth.parquet")):
        generate(out=root, domains=list(DOMAINS), species=SPECIES, images_per_species=LARGEST, image_size=64,
                 seed=seed, test_fraction=0.5, storage=st)  # both splits are the collection
    truth = st.read_parquet(join(root, "truth.parquet")).to_pandas()
    rng, out = np.random.default_rng(seed), {}
    for d in DOMAINS:
        rows = truth[truth["domain"] == d]
        species = sorted(set(rows["species"]))
        keep = []
        for name, size in zip(species, class_sizes(rng), strict=True):
            keep += [(join(root, p), name) for p in rows[rows["species"] == name]["path"].iloc[:size]]
        out[d] = keep
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", default="200,201,202,203,204")
    parser.add_argument("--sample-seeds", default="0,1,2")
    parser.add_argument("--per-class", default="1,2,3,5", help="budgets in discovery images per class")
    parser.add_argument("--pool", type=int, default=10, help="label.select_pool")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    from near_ray.config import ModelConfig
    from near_ray.images import decode_image
    from near_ray.label.select import k_center, sample_keys, split_budget
    from near_ray.model.clip import create_clip, encode_images
    from near_ray.storage import Storage

    t0, st = time.monotonic(), Storage()
    clip = create_clip(ModelConfig(arch="near-tiny", pretrained="synthetic"))
    work = tempfile.mkdtemp(prefix="discovery_coverage_")
    budgets = [int(k) for k in args.per_class.split(",")]
    rows: list[dict] = []
    for draw in [int(x) for x in args.draws.split(",")]:
        coll = collection(draw, work)
        emb = {d: encode_images(clip, [decode_image(st.read_bytes(u)) for u, _ in items]) for d, items in coll.items()}
        sizes = {d: len(items) for d, items in coll.items()}
        for per_class in budgets:
            shares = split_budget(sizes, per_class * SPECIES * len(DOMAINS))
            for seed in [int(x) for x in args.sample_seeds.split(",")]:
                for rule in ("random", "diversity"):
                    covered, in_large, chosen_n = 0, 0, 0
                    for d, items in coll.items():
                        order = np.lexsort(sample_keys([u for u, _ in items], seed).T[::-1])  # smallest key first
                        if rule == "random":
                            picks = order[: shares[d]]
                        else:
                            pool = order[: args.pool * shares[d]]
                            picks = pool[k_center(emb[d][pool], shares[d])[0]]
                        names = [items[i][1] for i in picks]
                        counts = {n: sum(1 for _, m in items if m == n) for n in {m for _, m in items}}
                        large = set(sorted(counts, key=lambda n: -counts[n])[: SPECIES // 2])
                        covered += len(set(names))
                        in_large += sum(n in large for n in names)
                        chosen_n += len(names)
                    rows.append({"draw": draw, "per_class": per_class, "seed": seed, "rule": rule,
                                 "images": chosen_n, "class_coverage": covered / (SPECIES * len(DOMAINS)),
                                 "share_in_largest_half": in_large / max(chosen_n, 1)})
        print(f"draw {draw}: {sum(sizes.values())} images, class sizes {SMALLEST}-{LARGEST}")
    summary = {}
    for per_class in budgets:
        entry = {}
        for key in ("class_coverage", "share_in_largest_half"):
            by_draw = {}
            for r in rows:
                if r["per_class"] == per_class:
                    by_draw.setdefault(r["draw"], {}).setdefault(r["rule"], []).append(r[key])
            rnd = np.array([np.mean(v["random"]) for v in by_draw.values()])
            div = np.array([np.mean(v["diversity"]) for v in by_draw.values()])
            diff, n = div - rnd, len(rnd)
            from scipy import stats

            half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
            entry[key] = {"random": round(float(rnd.mean()), 4), "diversity": round(float(div.mean()), 4),
                          "diversity_minus_random": round(float(diff.mean()), 4),
                          "ci95": [round(float(diff.mean()) - half, 4), round(float(diff.mean()) + half, 4)], "n": n}
        summary[per_class] = entry
        c, s = entry["class_coverage"], entry["share_in_largest_half"]
        print(f"{per_class} per class ({per_class * SPECIES * len(DOMAINS)} images): classes covered random "
              f"{c['random']:.3f}, diversity {c['diversity']:.3f} ({c['diversity_minus_random']:+.3f} "
              f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}], n={c['n']}); in the largest half: random "
              f"{s['random']:.3f}, diversity {s['diversity']:.3f}")
    result = {"summary": summary, "runs": rows, "pool": args.pool, "model": "near-tiny synthetic",
              "collection": {"domains": list(DOMAINS), "species": SPECIES, "largest": LARGEST, "smallest": SMALLEST},
              "machine": {"platform": platform.platform(), "seconds": round(time.monotonic() - t0, 1)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out} ({result['machine']['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
