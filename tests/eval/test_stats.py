import json
import math

import pytest

from near_ray.eval.stats import mean_std, paired_difference


def test_paired_difference_and_its_interval_on_constructed_numbers():
    near = [0.60, 0.55, 0.70, 0.65, 0.58]
    naive = [0.50, 0.49, 0.61, 0.60, 0.50]  # differences 0.10, 0.06, 0.09, 0.05, 0.08
    d = paired_difference(near, naive)
    assert d["n"] == 5 and d["mean_diff"] == pytest.approx(0.076)
    sd = math.sqrt(sum((x - 0.076) ** 2 for x in (0.10, 0.06, 0.09, 0.05, 0.08)) / 4)
    half = 2.7764451 * sd / math.sqrt(5)  # t(0.975, 4)
    assert d["ci95"] == pytest.approx([0.076 - half, 0.076 + half], abs=1e-6)
    assert d["ci95"][0] > 0  # the seeds' shared part cancels: separately the two spreads overlap
    assert max(naive) > min(near)


def test_identical_methods_differ_by_nothing_and_one_pair_has_no_interval():
    d = paired_difference([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert d["mean_diff"] == 0 and d["ci95"] == [0, 0]
    assert paired_difference([0.5], [0.4])["ci95"] == [None, None]
    with pytest.raises(ValueError, match="same runs"):
        paired_difference([0.1, 0.2], [0.1])
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def _benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "method_benchmark.py"
    spec = importlib.util.spec_from_file_location("method_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(model, seed, **cacc):
    return {"model": model, "profile": "weak", "seed": seed,
            "metrics": {m: {"cacc": v, "sacc": v + 0.2, "nmi": v / 2, "ari": v / 3} for m, v in cacc.items()}}


def test_a_screened_candidate_is_paired_only_where_the_reference_is_reproduced():
    """`method_benchmark.py --against`: a candidate's NeaR against a finished benchmark's runs, paired run by
    run; a run whose untouched figures (the teacher, the ceilings) differ from the reference's is not
    paired, because then the two runs did not see the same labels."""
    bench = _benchmark()
    reference = {"runs": [_run("a", 0, direct_mllm=0.30, naive=0.40, near=0.42, upper_bound_supervised=0.7),
                          _run("a", 1, direct_mllm=0.31, naive=0.45, near=0.44, upper_bound_supervised=0.7),
                          _run("b", 0, direct_mllm=0.30, naive=0.38, near=0.40, upper_bound_supervised=0.6)]}
    candidate = [_run("a", 0, direct_mllm=0.30, near=0.45, upper_bound_supervised=0.7),
                 _run("a", 1, direct_mllm=0.31, near=0.47, upper_bound_supervised=0.7),
                 _run("b", 0, direct_mllm=0.30, near=0.49, upper_bound_supervised=0.61),  # a ceiling moved
                 _run("b", 1, direct_mllm=0.30, near=0.49, upper_bound_supervised=0.6)]  # not in the reference
    candidate[1]["metrics"]["direct_mllm"]["sacc"] += 3e-8  # sACC's last digits move between CPUs
    out = bench.against(candidate, reference)
    weak = out["profiles"]["weak"]
    assert weak["runs"] == [{"model": "a", "seed": 0}, {"model": "a", "seed": 1}]
    assert weak["near"]["mean_diff"] == pytest.approx(0.03) and weak["near"]["n"] == 2
    assert weak["naive"]["mean_diff"] == pytest.approx(0.035)
    assert weak["direct_mllm"]["mean_diff"] == pytest.approx(0.155)
    assert weak["candidate_cacc_mean"] == pytest.approx(0.46)
    assert [(u["model"], u["seed"], u["why"]) for u in out["unmatched"]] == [
        ("b", 0, "baselines differ"), ("b", 1, "not in the reference")]
    text = bench.against_text({"reference": "ref.json", "overrides": ["refine.x=y"], **out})
    assert "| weak | 2 | 0.460 | +0.030 [" in text and "b/weak/s1 (not in the reference)" in text


def test_runs_under_overrides_never_share_a_folder_with_default_runs(tmp_path):
    bench = _benchmark()
    work = str(tmp_path)
    assert bench.overrides_folder(work, []) == work
    a = bench.overrides_folder(work, ["refine.neighbour_votes=agreement"])
    assert a != work and a == bench.overrides_folder(work, ["refine.neighbour_votes=agreement"])
    assert bench.overrides_folder(work, ["refine.neighbour_votes=similarity"]) != a
    # labels are shared with the default run unless an override reaches the label stage
    assert bench.overrides_folder(work, ["refine.neighbour_votes=agreement"], ("label.", "synth.")) == work
    assert bench.overrides_folder(work, ["label.samples=5"], ("label.", "synth.")) != work


def test_kept_methods_are_carried_only_into_runs_made_from_the_same_labels_and_model(tmp_path):
    bench = _benchmark()

    def scores(c):
        return {"cacc": c, "sacc": 0.5, "nmi": 0.1, "ari": 0.1}

    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"runs": [
        {"model": "a", "profile": "weak", "seed": 0,
         "metrics": {"direct_mllm": scores(0.3), "upper_bound_supervised": scores(0.6), "naive": scores(0.44),
                     "near": scores(0.47)}},
        {"model": "a", "profile": "weak", "seed": 1,
         "metrics": {"direct_mllm": scores(0.31), "upper_bound_supervised": scores(0.6), "naive": scores(0.45)}}]}))
    keep = bench.parse_keep([f"{ref}:naive"])
    assert bench.kept_setup(keep, {}, {"neighbour_votes": "above_chance"}) == [{
        "file": str(ref), "methods": ["naive"],
        "refine_differs": {"neighbour_votes": {"file": None, "this_run": "above_chance"}}}]
    # a setting the code gained since the file was made is recorded; another value of a shared one refused
    assert bench.kept_setup(keep, {"prefetch_batches": None}, {})[0]["train_not_in_file"] == {"prefetch_batches": None}
    ref.write_text(json.dumps({"runs": [], "setup": {"train": {"epochs": 10}}}))
    with pytest.raises(SystemExit, match="other training settings \\(epochs\\)"):
        bench.kept_setup(bench.parse_keep([f"{ref}:naive"]), {"epochs": 3}, {})
    untouched = {"direct_mllm": scores(0.3), "upper_bound_supervised": scores(0.6)}
    got = bench.carried(keep, (0, "a", "weak", 0), untouched, ["naive", "near"])
    assert got == {"naive": (str(ref), scores(0.44))}  # near is in the file but was not asked for
    assert bench.carried(keep, (0, "a", "weak", 0), untouched, ["near"]) == {}  # not wanted in this run
    # another teacher (labels) or a run the file lacks: trained, not carried
    assert bench.carried(keep, (0, "a", "weak", 1), untouched, ["naive"]) == {}
    assert bench.carried(keep, (0, "b", "weak", 0), untouched, ["naive"]) == {}
    # a file made before draws existed holds synthesis seed 0: a run on another draw never takes its figures
    assert bench.carried(keep, (100, "a", "weak", 0), untouched, ["naive"]) == {}
    with pytest.raises(SystemExit, match="naiv: .*not a trained method"):
        bench.parse_keep([f"{ref}:naiv"])
    with pytest.raises(SystemExit, match="cannot read the runs of .*missing.json"):
        bench.parse_keep([f"{tmp_path / 'missing.json'}:naive"])


def test_two_runs_inside_one_unit_count_once():
    """Two starting CLIPs trained on one seed's labels are one unit: the interval has n = units, not runs."""
    from near_ray.eval.stats import clustered_difference

    diffs = {("draw100", 0): [0.10, 0.06], ("draw100", 1): [0.09, 0.05], ("draw101", 0): [0.08, 0.04]}
    d = clustered_difference(diffs)
    assert d["n"] == 3 and d["runs"] == 6
    assert d["mean_diff"] == pytest.approx((0.08 + 0.07 + 0.06) / 3)
    as_runs = paired_difference([x for v in diffs.values() for x in v], [0.0] * 6)
    width = d["ci95"][1] - d["ci95"][0]
    assert width > as_runs["ci95"][1] - as_runs["ci95"][0]  # counting runs as units understated the width


def test_the_bootstrap_carries_test_image_variance_and_is_reproducible():
    import numpy as np

    from near_ray.eval.metrics import cluster_accuracy
    from near_ray.eval.stats import bootstrap_difference

    rng = np.random.default_rng(0)

    def unit(n_images: int, runs: int = 2):
        truth = rng.integers(0, 4, n_images)
        out = []
        for _ in range(runs):
            a = np.where(rng.random(n_images) < 0.7, truth, rng.integers(0, 4, n_images))  # ~0.78 right
            b = np.where(rng.random(n_images) < 0.6, truth, rng.integers(0, 4, n_images))  # ~0.70 right
            out.append((truth, a, b))
        return out

    small = [unit(40) for _ in range(4)]
    large = [unit(400) for _ in range(4)]
    s = bootstrap_difference(small, cluster_accuracy, n_boot=200, seed=1)
    big = bootstrap_difference(large, cluster_accuracy, n_boot=200, seed=1)
    assert s["n"] == 4 and s["runs"] == 8
    assert s == bootstrap_difference(small, cluster_accuracy, n_boot=200, seed=1)
    assert s["ci95"][0] < s["mean_diff"] < s["ci95"][1]
    # fewer test images, a wider interval: the images' own variance is in it
    assert s["ci95"][1] - s["ci95"][0] > big["ci95"][1] - big["ci95"][0]
    assert big["ci95"][0] > 0  # 0.1 apart on 1,600 images: the interval excludes zero
