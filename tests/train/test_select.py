"""Choosing the classifier without labels (train.select): the held-out slice, the agreement rule, and a
whole run that chooses, trains the chosen one on everything and names the collection with it, with no
truth file anywhere."""

from __future__ import annotations

import os

import pytest
import yaml

from near_ray.cli import main
from near_ray.config import load_config
from near_ray.sim.annotator import AnnotatorServer
from near_ray.storage import Storage
from near_ray.train.select import agreement, choose, consistency, holdout_split


def _rows(groups: dict[tuple[str, str], int], answers: list[str] | None = None) -> list[dict]:
    rows = []
    for (domain, name), n in groups.items():
        rows += [{"image_id": f"{domain}-{name}-{i}", "domain": domain, "majority_label": name,
                  "own_labels": answers or [name, name]} for i in range(n)]
    return rows


def test_holdout_is_stratified_by_majority_name_seeded_and_never_takes_a_names_last_image():
    rows = _rows({("birds", "A"): 10, ("birds", "B"): 5, ("birds", "C"): 1, ("moths", "A"): 20})
    rows.append({"image_id": "mute", "domain": "birds", "majority_label": None, "own_labels": []})
    held = holdout_split(rows, 0.2, seed=0)
    by_group = {g: sum(i.startswith(g) for i in held) for g in ("birds-A", "birds-B", "birds-C", "moths-A")}
    assert by_group == {"birds-A": 2, "birds-B": 1, "birds-C": 0, "moths-A": 4}
    assert "mute" not in held  # no answer to agree with: it trains
    assert holdout_split(rows, 0.2, seed=0) == held and holdout_split(rows, 0.2, seed=1) != held
    assert len(holdout_split(_rows({("birds", "A"): 2}), 0.9, seed=0)) == 1  # one image of a name always trains


def test_agreement_weighs_each_image_by_the_mllms_consistency_and_the_better_candidate_is_chosen():
    own = {"sure": ["A", "A", "A"], "torn": ["B", "C", "D"], "mostly": ["A", "A", "E"]}
    assert consistency(own["sure"]) == 1 and consistency(own["torn"]) == pytest.approx(1 / 3)
    good = agreement({"sure": "A", "torn": "C", "mostly": "A"}, own)
    # (1·1 + 1/3·1/3 + 2/3·2/3) / (1 + 1/3 + 2/3)
    assert good["agreement"] == pytest.approx((1 + 1 / 9 + 4 / 9) / 2, abs=1e-6)
    assert good["majority_match"] == pytest.approx(2 / 3) and good["images"] == 3
    # right on the image the MLLM cannot decide, wrong where it is sure: scores low although one answer matches
    lucky = agreement({"sure": "B", "torn": "B", "mostly": "E"}, own)
    assert lucky["agreement"] < good["agreement"] / 2
    none = agreement({"sure": None, "torn": None, "mostly": None}, own)
    assert none["agreement"] == 0
    scores = {"lucky": lucky, "good": good, "none": none}
    assert choose(scores, ["lucky", "none", "good"]) == "good"
    assert choose({"x": good, "y": dict(good)}, ["y", "x"]) == "y"  # a tie: the first listed


def test_the_grouping_rule_scores_how_predictions_group_the_images_whatever_their_names():
    from near_ray.train.select import grouping_agreement

    own = {"a1": ["A", "A"], "a2": ["A", "A"], "b1": ["B", "B"], "b2": ["B", "C"]}
    domain = dict.fromkeys(own, "birds")
    renamed = {"a1": "X", "a2": "X", "b1": "Y", "b2": "Y"}  # the MLLM's grouping under other names
    assert agreement(renamed, own)["agreement"] == 0
    assert grouping_agreement(renamed, own, domain) == 1
    merged = {"a1": "X", "a2": "X", "b1": "X", "b2": "X"}  # one name for all: only one group can match
    assert grouping_agreement(merged, own, domain) == pytest.approx(2 / 3.5)
    scores = {"renamed": {"agreement": 0.0, "grouping": 1.0}, "merged": {"agreement": 0.5, "grouping": 0.57}}
    assert choose(scores, ["merged", "renamed"], "grouping") == "renamed"
    assert choose(scores, ["merged", "renamed"], "names") == "merged"


def test_select_is_checked_when_the_config_loads(tmp_path):
    with pytest.raises(Exception, match="unknown training method.*'nearr'"):
        load_config(None, ["storage.workdir=.", "train.select=[near,nearr]"])


def _rotate_names(st: Storage, bundle: str) -> None:
    """Each of the bundle's names given to the next name of its domain: a classifier that names every image
    wrongly, whatever its features say."""
    vocab = st.read_json(f"{bundle}/vocabulary.json")
    by_domain: dict[str, list[int]] = {}
    for i, v in enumerate(vocab):
        by_domain.setdefault(v.get("domain") or "", []).append(i)
    names = [v["name"] for v in vocab]
    for idx in by_domain.values():
        for a, b in zip(idx, idx[1:] + idx[:1], strict=True):
            vocab[a] = {**vocab[a], "name": names[b]}
    st.write_json(f"{bundle}/vocabulary.json", vocab)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two whole runs and four trainings: minutes alone, more beside other work
def test_run_chooses_without_truth_trains_the_choice_on_everything_and_follows_the_agreement(ray_cluster, tmp_path,
                                                                                             capsys, synth_bench):
    st = Storage()
    root = synth_bench(["birds"], 4, 10, image_size=64, seed=3, test_fraction=0.2)
    workdir = str(tmp_path / "run")
    candidates = ["naive_prototypes", "near"]
    with AnnotatorServer(root, profile="strong", seed=0) as annotator:  # the simulator has read the truth
        os.remove(f"{root}/truth.parquet")  # no code path of the run, the choice included, may need it
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({
            "storage": {"workdir": workdir},
            "data": {"domains": [{"name": "birds", "uri": f"{root}/images/birds/train", "meta_class": "bird"}]},
            "label": {"samples": 3, "backend": {"type": "openai", "base_url": annotator.base_url, "api_key_env": None}},
            "model": {"arch": "near-tiny", "pretrained": "synthetic"},
            "refine": {"k": 4, "merge_encoder": "none"},
            "train": {"num_workers": 1, "epochs": 2, "warmup_epochs": 1, "batch_size": 8, "select": candidates},
            "classify": {"batch_size": 16},
        }))
        assert main(["run", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        choice = st.read_json(f"{workdir}/select/choice.json")
        assert set(choice["candidates"]) == set(candidates) and choice["held_out"] >= 4
        best = max(candidates, key=lambda m: (choice["candidates"][m]["agreement"], -candidates.index(m)))
        assert choice["chosen"] == best
        assert f"classifier chosen without labels: {best} (agreement with the MLLM on {choice['held_out']}" in out
        summary = st.read_json(f"{workdir}/run_summary.json")
        assert list(summary["train"]) == [best] and summary["outputs"]["bundle"] == f"{workdir}/bundles/{best}"
        assert summary["classify"]["domains"]["birds"]["bundle"] == f"{workdir}/bundles/{best}"  # named by the choice

        # The held-out images are in no training target and no neighbour list of the fit slice.
        full = st.read_parquet(f"{workdir}/refine/candidates.parquet").to_pylist()
        fit = st.read_parquet(f"{workdir}/select/refine/candidates.parquet").to_pylist()
        held = {r["image_id"] for r in full} - {r["image_id"] for r in fit}
        assert len(held) == choice["held_out"]
        graph = st.read_parquet(f"{workdir}/select/refine/neighbors.parquet").to_pylist()
        assert not held & ({g["image_id"] for g in graph} | {n for g in graph for n in g["neighbors"]})
        trained = st.read_json(f"{workdir}/select/bundles/{best}/metrics.json")["train_images"]
        assert trained <= len(fit) < len(full)  # naive_prototypes leaves out images without a majority name

        # The chosen candidate made to name every held-out image wrongly: the next run chooses the other one,
        # without training either candidate again, and serves it.
        _rotate_names(st, f"{workdir}/select/bundles/{best}")
        assert main(["run", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        again = st.read_json(f"{workdir}/select/choice.json")
        other = next(m for m in candidates if m != best)
        assert again["chosen"] == other
        assert again["candidates"][best]["agreement"] < choice["candidates"][best]["agreement"] / 2
        assert again["candidates"][other] == choice["candidates"][other]  # the same bundle, the same answer
        assert st.read_json(f"{workdir}/run_summary.json")["outputs"]["bundle"] == f"{workdir}/bundles/{other}"
        assert f"trainings: 1 ({other})" in out
        assert st.read_json(f"{workdir}/run_summary.json")["classify"]["domains"]["birds"]["bundle"] == \
            f"{workdir}/bundles/{other}"


def test_the_report_says_what_was_chosen_and_the_agreement_behind_it():
    from near_ray.eval.report import render_markdown

    report = {"dataset": "birds", "test_images": 3, "sacc_model": "m",
              "domains": [{"name": "birds", "test_images": 3, "classes": 2}],
              "methods": {"near": {"cacc": 0.5, "sacc": 0.6, "nmi": 0.1, "ari": 0.1}},
              "selection": {"chosen": "near", "held_out": 6,
                            "candidates": {"near": {"agreement": 0.53}, "naive_prototypes": {"agreement": 0.41}}}}
    text = render_markdown(report)
    assert "Chosen without labels (`train.select`): **`near`**" in text
    assert "on 6 held-out discovery images: `near` 53.0%, `naive_prototypes` 41.0%." in text
    del report["selection"]
    assert "Chosen without labels" not in render_markdown(report)
