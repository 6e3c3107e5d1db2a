"""The discovery set (label.select): which images a capped run (data.max_images) asks the MLLM about.

The compute is checked on constructed embeddings without Ray; one run of the real label stage (Ray, the
simulated annotator over HTTP, the near-tiny model's embeddings) checks the budget is what is paid for,
and that a rerun chooses the same images without embedding or asking anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from near_ray.config import load_config
from near_ray.data.collections import listing_chunks
from near_ray.label.select import (
    BottomK,
    choose_diverse,
    fingerprint,
    k_center,
    selected_chunks,
    split_budget,
)
from near_ray.storage import Storage

ROOT = Path(__file__).resolve().parents[2]
SELECTION = "labels/_selection.json"  # below the workdir: the on-disk layout, pinned (RunPaths.label_selection)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cluster_and_outliers(seed: int = 0) -> tuple[np.ndarray, set[int]]:
    """50 unit vectors tight around e0, then 5 outliers along e1..e5 (far from it and from each other)."""
    rng = np.random.default_rng(seed)
    dense = np.zeros((50, 8))
    dense[:, 0] = 1.0
    dense += 0.02 * rng.normal(size=dense.shape)
    sparse = np.eye(8)[1:6] + 0.01 * rng.normal(size=(5, 8))
    return _unit(np.concatenate([dense, sparse])).astype(np.float32), set(range(50, 55))


# ------------------------------------------------------------------------------------------ numpy only
def test_k_center_picks_every_outlier_and_one_cluster_point():
    x, outliers = _cluster_and_outliers()
    picks, dists = k_center(x, 6)
    assert len(picks) == 6 == len(set(picks.tolist()))
    assert outliers <= set(picks.tolist()) and len(set(picks.tolist()) - outliers) == 1
    mean = x.mean(axis=0)
    assert picks[0] == np.argmin(np.linalg.norm(x - mean, axis=1)) and picks[0] < 50, "starts nearest the mean"
    assert np.all(dists[1:] > 1.0), "each outlier picked at its distance from the cluster"
    again = k_center(x[::-1].copy()[::-1], 6)  # same rows, another buffer: same answer
    assert np.array_equal(again[0], picks) and np.allclose(again[1], dists)
    assert k_center(x, 0)[0].size == 0 and len(k_center(x, 100)[0]) == 55  # never more than the rows
    twins = np.repeat(x[:2], 3, axis=0)
    assert sorted(k_center(twins, 6)[0].tolist()) == list(range(6)), "duplicates: each row picked once"


def test_budgets_add_up_exactly_and_never_exceed_a_domain():
    sizes = {"a": 7, "b": 13, "c": 29}
    for budget in range(0, 60):
        shares = split_budget(sizes, budget)
        assert sum(shares.values()) == min(budget, 49), budget
        for d, n in sizes.items():
            assert 0 <= shares[d] <= n
            assert abs(shares[d] - min(budget, 49) * n / 49) < 1, (budget, shares)
    assert split_budget(sizes, 10) == {"a": 1, "b": 3, "c": 6}  # 1.43, 2.65, 5.92: remainders to c, then b
    assert split_budget({"x": 4, "y": 4}, 3) == {"x": 2, "y": 1}, "a tie goes to the earlier domain"
    assert split_budget(sizes, None) == sizes

    rng = np.random.default_rng(1)
    vectors = {d: _unit(rng.normal(size=(n, 8))) for d, n in sizes.items()}
    chosen = choose_diverse(vectors, split_budget(sizes, 10))
    assert {d: len(p) for d, (p, _) in chosen.items()} == {"a": 1, "b": 3, "c": 6}
    assert all(len(set(p.tolist())) == len(p) for p, _ in chosen.values())
    repeat = choose_diverse(vectors, split_budget(sizes, 10))
    assert all(np.array_equal(chosen[d][0], repeat[d][0]) for d in sizes), "deterministic"


def test_the_random_sample_is_seeded_nested_and_order_free():
    uris = [f"s3://b/img/{i:05d}.jpg" for i in range(5000)]

    def sample(k: int, seed: int, order: list[str]) -> list[str]:
        s = BottomK(k, seed)
        for i in range(0, len(order), 700):
            s.add(order[i : i + 700])
        assert s.count == len(order)
        return s.result()

    first = sample(50, 0, uris)
    assert len(first) == len(set(first)) == 50
    assert sample(50, 0, uris[::-1]) == first, "independent of listing order"
    assert sample(500, 0, uris)[:50] == first, "nested: diversity's candidates contain the random sample"
    assert len(set(sample(50, 1, uris)) & set(first)) < 10, "another seed, another sample"
    assert np.mean([int(u[-9:-4]) for u in sample(1000, 0, uris)]) == pytest.approx(2500, rel=0.1)


def test_selection_imports_without_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import near_ray.label.select as s\n"
            "print(s.k_center(__import__('numpy').eye(3), 2)[0].tolist())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().startswith("["), out.stdout + out.stderr[-2000:]


def test_first_and_uncapped_runs_stream_the_listing(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(5):
            (tmp_path / d / f"{i}.png").write_bytes(b"x")
    domains = [{"name": d, "uri": str(tmp_path / d)} for d in ("a", "b")]

    def cfg(*extra: str):
        return load_config(None, [f"storage.workdir={tmp_path / 'run'}", f"data.domains={json.dumps(domains)}",
                                  "label.listing_chunk=3", *extra])  # fmt: skip

    rows = lambda c: [(r["domain"], Path(r["uri"]).name) for ch in selected_chunks(c, Storage()) for r in ch]  # noqa: E731
    first = cfg("label.select=first", "data.max_images=3")
    assert rows(first) == [(r["domain"], Path(r["uri"]).name) for ch in listing_chunks(first, Storage()) for r in ch]
    assert [d for d, _ in rows(first)] == ["a"] * 3, "the listing's first images, as before label.select"
    assert len(rows(cfg())) == 10 and not (tmp_path / "run" / SELECTION).exists(), "no cap: every image, streamed"
    chosen = rows(cfg("data.max_images=4"))  # random, the default: 2 per domain, recorded
    assert sorted(d for d, _ in chosen) == ["a", "a", "b", "b"]
    record = json.loads((tmp_path / "run" / SELECTION).read_text())
    assert record["fingerprint"] == fingerprint(cfg("data.max_images=4")) and len(record["images"]) == 4
    assert record["domains"] == {d: {"listed": 5, "budget": 2, "candidates": 4, "chosen": 2} for d in ("a", "b")}
    assert rows(cfg("data.max_images=4")) == chosen
    assert fingerprint(cfg("data.max_images=4", "label.select_seed=1")) != record["fingerprint"]
    with pytest.raises(Exception, match="label.select"):
        cfg("label.select=best")


def test_a_workdir_labeled_under_a_cap_before_label_select_keeps_its_images(tmp_path):
    """Upgrading never pays for a new sample: a capped workdir with a label summary and no selection record
    keeps asking about the listing's first images while label.select is left at its default."""
    for i in range(6):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_bytes(b"x")
    base = [f"storage.workdir={tmp_path / 'run'}", f"data.domains={json.dumps([{'name': 'a', 'uri': str(tmp_path / 'a')}])}",
            "data.max_images=3"]  # fmt: skip
    (tmp_path / "run" / "labels").mkdir(parents=True)
    (tmp_path / "run" / "labels" / "_summary.json").write_text("{}")  # an older version's label run
    names = lambda *extra: [Path(r["uri"]).name for ch in selected_chunks(load_config(None, [*base, *extra]), Storage())  # noqa: E731
                            for r in ch]  # fmt: skip
    listed = [Path(r["uri"]).name for ch in listing_chunks(load_config(None, base), Storage()) for r in ch]
    assert names() == listed and not (tmp_path / "run" / SELECTION).exists()
    assert len(names("label.select=random")) == 3 and (tmp_path / "run" / SELECTION).exists()  # asked for: anew


# ------------------------------------------------------------------------------------------ the stage
@pytest.fixture(scope="module")
def small_bench(synth_bench) -> str:
    """Two domains x 3 species x 4 images, 32 px, on a local disk."""
    return synth_bench(test_fraction=0.25)


@pytest.mark.slow
def test_diversity_asks_about_exactly_the_budget_and_a_rerun_asks_nothing(ray_cluster, small_bench, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    from near_ray.label.stage import read_labels, run_label
    from near_ray.sim.annotator import AnnotatorServer

    budget = 5
    domains = [{"name": "birds", "uri": f"{small_bench}/images/birds", "meta_class": "bird"},
               {"name": "flowers", "uri": f"{small_bench}/images/flowers"}]  # fmt: skip
    with AnnotatorServer(small_bench, profile="strong", seed=0) as ann:
        cfg = load_config(None, [
            f"storage.workdir={tmp_path / 'run'}", f"label.backend.base_url={ann.base_url}", "label.samples=1",
            f"data.domains={json.dumps(domains)}", f"data.max_images={budget}", "label.select=diversity",
            "model.arch=near-tiny", "model.pretrained=synthetic", "refine.embed_actors=1",
        ])  # fmt: skip
        summary = run_label(cfg)
        asked = ann.annotator.stats(by_image=True)
        assert asked["requests"] == budget == summary["mllm_calls"] == len(asked["by_image"])
        record = json.loads((tmp_path / "run" / SELECTION).read_text())
        chosen = {r["uri"] for r in record["images"]}
        assert len(chosen) == budget and set(read_labels(cfg)["uri"]) == chosen
        assert {d: v["chosen"] for d, v in record["domains"].items()} == {"birds": 3, "flowers": 2}
        assert [r["rank"] for r in record["images"] if r["domain"] == "birds"] == [0, 1, 2]
        assert all(isinstance(r["distance"], float) for r in record["images"]) and record["rule"] == "diversity"

        def no_embedding(*a, **k):
            raise AssertionError("a rerun with the same config must not embed again")

        monkeypatch.setattr("near_ray.refine.embed.embed_images", no_embedding)
        again = run_label(cfg)
        assert ann.stats()["requests"] == budget and again["mllm_calls"] == 0, "a rerun asks nothing"
        assert json.loads((tmp_path / "run" / SELECTION).read_text()) == record
