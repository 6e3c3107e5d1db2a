"""The method benchmark's protocol: dev and test draws are different benchmarks, a test run is refused
unless its configuration is the one frozen on dev draws, and intervals count independent units."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from near_ray.storage import Storage, join

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "method_benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("method_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--domains", "birds,flowers", "--species", "4", "--discovery", "2", "--test", "2", "--models", "synthetic",
        "--methods", "near,naive"]


def test_a_test_draw_and_a_dev_draw_share_no_image_and_no_taxonomy(bench, tmp_path):
    args = argparse.Namespace(domains="birds,flowers", species=4, discovery=2, test=2, collection="synthetic")
    st = Storage()
    draws = {}
    for seed in (bench.DRAWS["dev"][0], bench.DRAWS["test"][0]):
        root = bench.make_draw(str(tmp_path), seed, args, st)
        truth = st.read_parquet(join(root, "truth.parquet")).to_pandas()
        taxonomy = st.read_json(join(root, "taxonomy.json"))
        draws[seed] = (root, truth, taxonomy)
    (dev_root, dev, dev_tax), (test_root, test, test_tax) = draws.values()
    assert len(dev) == len(test) == 2 * 4 * 4
    assert not set(dev["sha256"]) & set(test["sha256"])  # no image bytes in common, discovery or test
    assert not {join(dev_root, p) for p in dev["path"]} & {join(test_root, p) for p in test["path"]}
    for domain in ("birds", "flowers"):
        dev_names = sorted(dev.loc[dev["domain"] == domain, "species"].unique())
        test_names = sorted(test.loc[test["domain"] == domain, "species"].unique())
        # names come from a finite pool: at 16 species a single name can recur by chance, on another species
        assert not set(dev_names) & set(test_names)
        assert dev_tax["domains"][domain] != test_tax["domains"][domain]
    # generating a draw again reuses it, byte for byte
    bench.make_draw(str(tmp_path), bench.DRAWS["dev"][0], args, st)
    again = st.read_parquet(join(dev_root, "truth.parquet")).to_pandas()
    assert again["sha256"].tolist() == dev["sha256"].tolist()


def test_a_run_never_crosses_into_the_other_draw_set(bench):
    assert bench.draw_seeds("dev", None) == [100, 101, 102]
    assert bench.draw_seeds("test", None) == [200, 201, 202, 203, 204]
    assert bench.draw_seeds("dev", "100,7") == [100, 7]
    with pytest.raises(SystemExit, match="200 are test draws"):
        bench.draw_seeds("dev", "100,200")
    with pytest.raises(SystemExit, match="101 are dev draws"):
        bench.draw_seeds("test", "101")


def test_a_test_run_needs_the_frozen_configuration_and_gets_it(bench, tmp_path):
    frozen = tmp_path / "frozen.json"
    dev = bench.parse_args(["--draws", "dev", "--freeze", str(frozen), "--set", "train.epochs=3", *TINY])
    written = bench.write_frozen(str(frozen), dev.config, dev.draw_list)
    assert written["config_hash"] == bench.config_hash(dev.config) and len(written["config_hash"]) == 64
    assert written["commit"] == bench.git_commit() != ""
    if written["commit"] != "unknown":  # in a git checkout: a hex commit, and whether the tree differed from it
        assert len(written["commit"]) == 40 and isinstance(written["uncommitted_changes"], bool)
    on_disk = json.loads(frozen.read_text())
    assert on_disk["config"]["set"] == ["train.epochs=3"] and on_disk["config"]["train"]["epochs"] == 3
    assert set(on_disk["config"]["default_profiles"]) == {"appearance-strong", "appearance-weak"}

    # the same configuration (other annotator seeds, an unseen profile: held-out axes, not choices) runs
    test = bench.parse_args(["--draws", "test", "--frozen", str(frozen), "--set", "train.epochs=3", *TINY,
                             "--seeds", "5,6", "--profiles", "confuser"])
    assert test.frozen_record == {"config_hash": written["config_hash"], "commit": written["commit"]}
    assert test.draw_list == [200, 201, 202, 203, 204] and test.out.endswith("method_benchmark.json")
    # another option, another method list: refused
    with pytest.raises(SystemExit, match=r"not the frozen one .*differs in: set, train\."):
        bench.parse_args(["--draws", "test", "--frozen", str(frozen), "--set", "train.epochs=4", *TINY])
    with pytest.raises(SystemExit, match="differs in: methods"):
        bench.parse_args(["--draws", "test", "--frozen", str(frozen), "--set", "train.epochs=3", *TINY[:-1],
                          "near,naive,naive_prototypes"])
    with pytest.raises(SystemExit, match="cannot read a frozen configuration"):
        bench.parse_args(["--draws", "test", "--frozen", str(tmp_path / "none.json"), *TINY])


def test_a_configuration_frozen_before_a_rename_still_matches_the_same_settings(bench, tmp_path):
    """A frozen file written under a train field's former name (refine_k) is compared under today's name; a
    changed value is still refused."""
    from near_ray.config.train import RENAMED

    dev = bench.parse_args(["--draws", "dev", *TINY])
    config = json.loads(json.dumps(dev.config))
    config["train"] = {RENAMED.get(k, k): v for k, v in config["train"].items()}  # as written before the rename
    assert "refine_k" in config["train"] and "neighbour_k" not in config["train"]
    frozen = tmp_path / "frozen.json"
    frozen.write_text(json.dumps({"config_hash": bench.config_hash(config), "commit": "abc", "config": config}))
    test = bench.parse_args(["--draws", "test", "--frozen", str(frozen), *TINY])
    assert test.frozen_record == {"config_hash": bench.config_hash(config), "commit": "abc"}
    with pytest.raises(SystemExit, match=r"differs in: set, train"):
        bench.parse_args(["--draws", "test", "--frozen", str(frozen), *TINY, "--set", "train.neighbour_k=3"])


@pytest.fixture(scope="module")
def elpv():
    spec = importlib.util.spec_from_file_location("elpv", SCRIPT.with_name("elpv.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_pixel_collection_keeps_each_module_on_one_side_of_every_split(elpv):
    """elpv: modules (runs of <= 60 cells of one type) are split, never cells; dev and test draws use
    disjoint halves of the modules; every draw has both cell types among its discovery modules."""
    kinds = ["mono"] * 130 + ["poly"] * 300 + ["mono"] * 50 + ["poly"] * 75
    modules = elpv.assign_modules(kinds)
    assert modules[:130] == [0] * 60 + [1] * 60 + [2] * 10  # a module ends at 60 cells or where the type changes
    assert modules[130] == 3 and modules[430] == 8 and max(modules) == 10
    rows = [{"module": m, "type": k} for m, k in zip(modules, kinds, strict=True)]
    halves = {}
    for half, seeds in (("dev", elpv.DEV_SEEDS), ("test", elpv.TEST_SEEDS)):
        seen = set()
        for seed in seeds:
            discovery, test = elpv.split_modules(rows, seed, half)
            assert discovery and test and not discovery & test
            assert {r["type"] for r in rows if r["module"] in discovery} == {"mono", "poly"}
            seen |= discovery | test
        halves[half] = seen
    assert not halves["dev"] & halves["test"] and halves["dev"] | halves["test"] == set(modules)
    assert elpv.split_modules(rows, 200, "test") != elpv.split_modules(rows, 201, "test")  # a draw is its seed's
    with pytest.raises(SystemExit, match="dev draws are"):
        elpv.half_of(7)
    species = elpv.taxonomy()["domains"]["solar_cells"]["species"]
    assert len(species) == 8 and elpv.class_name(1 / 3, "poly") == "possibly defective polycrystalline cell"
    for name, entry in species.items():  # siblings: the same cell type's other defect levels, nearest first
        assert all(s.split()[-2] == name.split()[-2] for s in entry["siblings"]) and len(entry["siblings"]) == 3


def test_a_configuration_frozen_on_synthetic_draws_runs_on_real_pixels_unchanged(bench, tmp_path):
    frozen = tmp_path / "frozen.json"
    dev = bench.parse_args(["--draws", "dev", "--freeze", str(frozen), *TINY])
    written = bench.write_frozen(str(frozen), dev.config, dev.draw_list)
    real = ["--collection", "elpv", "--models", "synthetic,timm:tf_efficientnet_lite0@lite0.safetensors"]
    test = bench.parse_args(["--draws", "test", "--frozen", str(frozen), *TINY, *real])
    assert test.frozen_record["config_hash"] == written["config_hash"]
    assert test.out.endswith("method_benchmark_elpv.json") and test.config["benchmark"]["collection"] == "elpv"
    assert bench._label("timm:tf_efficientnet_lite0@lite0.safetensors") == "tf_efficientnet_lite0"
    with pytest.raises(SystemExit, match="differs in: set, train"):  # a setting a figure depends on is still refused
        bench.parse_args(["--draws", "test", "--frozen", str(frozen), *TINY, *real, "--set", "train.epochs=4"])


def test_the_script_refuses_an_unfrozen_test_run_before_any_work(tmp_path):
    frozen = tmp_path / "frozen.json"
    frozen.write_text(json.dumps({"config_hash": "0" * 64, "commit": "abc", "config": {}}))
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    base = [sys.executable, str(SCRIPT), "--draws", "test", "--work", str(work), "--out", str(tmp_path / "out.json"),
            *TINY]
    missing = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "--draws test needs --frozen FILE" in missing.stderr
    other = subprocess.run([*base, "--frozen", str(frozen)], capture_output=True, text=True, env=env, timeout=300)
    assert other.returncode == 1 and "is not the frozen one (000000000000, commit abc)" in other.stderr
    assert not work.exists() and not (tmp_path / "out.json").exists()  # nothing generated, trained or written


def _run(draw, seed, model, near, **others):
    metrics = {"near": {"cacc": near, "sacc": near + 0.2, "nmi": 0.5, "ari": 0.3},
               **{m: {"cacc": v, "sacc": v + 0.25, "nmi": 0.5, "ari": 0.3} for m, v in others.items()}}
    return {"draw": draw, "model": model, "profile": "appearance-strong", "seed": seed, "metrics": metrics}


def test_the_paired_section_counts_units_not_runs(bench):
    """Two draws x two annotator seeds x two starting CLIPs: 8 runs, 4 units; the two CLIPs of a unit
    are averaged before the interval, and an ablation run on fewer units counts those."""
    runs = [_run(100, 0, "a", 0.60, naive=0.50, near_no_knn=0.55), _run(100, 0, "b", 0.58, naive=0.52),
            _run(100, 1, "a", 0.62, naive=0.55, near_no_knn=0.50), _run(100, 1, "b", 0.64, naive=0.50),
            _run(101, 0, "a", 0.55, naive=0.50), _run(101, 0, "b", 0.57, naive=0.49),
            _run(101, 1, "a", 0.61, naive=0.52), _run(101, 1, "b", 0.59, naive=0.53)]
    out = bench.summarize(runs, ["near", "naive", "near_no_knn"])
    naive = out["paired"]["appearance-strong"]["naive"]
    unit_means = [(0.10 + 0.06) / 2, (0.07 + 0.14) / 2, (0.05 + 0.08) / 2, (0.09 + 0.06) / 2]
    assert naive["n"] == 4 and naive["runs"] == 8 and naive["interval"] == "t over units"
    assert naive["mean_diff"] == pytest.approx(np.mean(unit_means))
    half = 3.182446 * np.std(unit_means, ddof=1) / 2  # t(0.975, 3): 3 degrees of freedom, not 7
    assert naive["ci95"] == pytest.approx([np.mean(unit_means) - half, np.mean(unit_means) + half], abs=1e-6)
    assert naive["sacc"]["n"] == 4 and naive["sacc"]["mean_diff"] == pytest.approx(np.mean(unit_means) - 0.05)
    ablation = out["paired"]["appearance-strong"]["near_no_knn"]
    assert (ablation["n"], ablation["runs"]) == (2, 2)
    assert out["profiles"]["appearance-strong"]["naive"]["units"] == 4
    assert out["profiles"]["appearance-strong"]["naive"]["runs"] == 8
    assert [(u["draw"], u["seed"], u["models"]) for u in out["units"]["appearance-strong"]] == [
        (100, 0, ["a", "b"]), (100, 1, ["a", "b"]), (101, 0, ["a", "b"]), (101, 1, ["a", "b"])]
    text = bench.markdown({**out, "runs": runs, "models": ["a", "b"], "setup": {"test_images": 4},
                           "draws": {"dev": [100, 101]}})
    assert "4 units of draw × annotator seed, 8 runs" in text and "(n=4)" in text and "(n=2)" in text


def test_the_bootstrap_interval_pairs_by_unit_and_scores_cacc_as_the_metrics_do(bench):
    from near_ray.eval.metrics import cluster_accuracy

    rng = np.random.default_rng(0)
    domains = ["birds"] * 30 + ["flowers"] * 30
    truth = [f"s{k}" for k in rng.integers(0, 5, 60)]
    runs, preds = [], {}
    for draw, seed, model in [(100, 0, "a"), (100, 0, "b"), (100, 1, "a"), (100, 1, "b"), (101, 0, "a")]:
        near = [t if rng.random() < 0.8 else f"s{rng.integers(0, 5)}" for t in truth]
        naive = [t if rng.random() < 0.5 else (None if rng.random() < 0.2 else f"s{rng.integers(0, 5)}")
                 for t in truth]
        qualified = [f"{d}/{t}" for d, t in zip(domains, truth, strict=True)]
        cacc = {m: cluster_accuracy(qualified, [None if p is None else f"{d}/{p}" for d, p in zip(domains, ps, strict=True)])
                for m, ps in (("near", near), ("naive", naive))}
        run = _run(draw, seed, model, cacc["near"], naive=cacc["naive"])
        runs.append(run)
        preds[bench._run_key(run)] = bench.encode_predictions(domains, truth, {"near": near, "naive": naive})
        coded = preds[bench._run_key(run)]
        assert bench.cacc_codes(coded["truth"], coded["naive"]) == pytest.approx(cacc["naive"])
    d = bench.summarize(runs, ["near", "naive"], preds)["paired"]["appearance-strong"]["naive"]
    assert d["interval"] == bench.BOOTSTRAP and d["n"] == 3 and d["runs"] == 5
    assert d["ci95"][0] < d["mean_diff"] < d["ci95"][1] and d["ci95"] != d["t_ci95"]
