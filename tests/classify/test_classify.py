"""The classify stage end to end: a real Ray cluster, moto S3, bundles of the near-tiny CLIP, the
simulated annotator over HTTP for the cascade; and the calibration on constructed cases.

The bundles are nearest-centroid classifiers over a randomly initialized CLIP: each name's text
embedding is the mean image embedding of a few of its species' images (answers near chance, but real
forward passes, rankings and confidences that spread out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import species_prototypes

from near_ray.classify.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    temperature_scale,
)
from near_ray.classify.cascade import mllm_answers
from near_ray.classify.stage import run_classify
from near_ray.classify.table import predictions_table, read_predictions
from near_ray.config import LabelConfig, RunConfig, load_config
from near_ray.images import decode_image, image_id
from near_ray.model.bundle import load_bundle
from near_ray.sim.annotator import AnnotatorServer
from near_ray.storage import Storage, join

DOMAINS = {"birds": "bird", "flowers": "flower"}
SPECIES, PER_SPECIES = 5, 30  # 2 domains x 5 species x 30 images = 300 images
SAMPLES = 2
# The MLLM names the species exactly or by a synonym, never anything else: routed answers are checkable.
NAMER = {
    "name": "namer",
    "model": "simulated-namer",
    "outcomes": {"exact": 0.6, "synonym": 0.4, "coarse": 0, "sibling": 0, "unrelated": 0, "hallucinated": 0,
                 "refusal": 0},
    "hard_fraction": 0.0,
    "format_noise": 0.3,
    "format_styles": {"sentence": 0.5, "period": 0.5},
    "coarse_forms": {"genus_common": 1.0},
    "synonym_forms": {"synonym": 1.0},
}  # fmt: skip


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bench(synth_bench, write_bundle) -> dict:
    """A synthetic benchmark on moto S3, some corrupt files and a twin in the birds prefix, and a
    nearest-centroid bundle per domain and one for both."""
    st = Storage()
    root = synth_bench(list(DOMAINS), SPECIES, PER_SPECIES, s3=True, own=True)  # its own: files are added to it
    name = root.split("/")[2]
    truth = st.read_parquet(join(root, "truth.parquet")).to_pandas()
    truth["uri"] = [join(root, p) for p in truth["path"]]
    taxonomy = st.read_json(join(root, "taxonomy.json"))
    first = truth["uri"].iloc[0]
    corrupt = {
        join(root, "images/birds/test/zz_empty.png"): b"",
        join(root, "images/birds/test/zz_truncated.png"): st.read_bytes(first)[:100],
        join(root, "images/birds/test/zz_notes.jpg"): b"not an image at all",
    }
    twin = join(root, "images/birds/test/zz_twin.png")
    for uri, data in {**corrupt, twin: st.read_bytes(first)}.items():
        st.write_bytes(uri, data)
    bundles = {d: make_bundle(write_bundle, f"s3://{name}/bundles/{d}", truth, taxonomy, [d], seed=1) for d in DOMAINS}
    bundles["both"] = make_bundle(write_bundle, f"s3://{name}/bundles/both", truth, taxonomy, list(DOMAINS), seed=2)
    return {"root": root, "bucket": f"s3://{name}", "truth": truth, "corrupt": corrupt, "twin": twin,
            "twin_of": first, "bundles": bundles, "taxonomy": taxonomy}  # fmt: skip


def make_bundle(write_bundle, uri: str, truth: pd.DataFrame, taxonomy: dict, domains: list[str], seed: int) -> str:
    """A prototype classifier: each species' mean embedding of (up to) four of its train images."""
    entries, images = species_prototypes(truth, taxonomy, domains)
    return write_bundle(uri, entries, "images", images=images, seed=seed, logit_scale=60.0)


def config(workdir: str, bench: dict, *extra: str, domains: list[str] | None = None) -> RunConfig:
    doms = [{"name": d, "uri": f"{bench['root']}/images/{d}", "meta_class": DOMAINS[d]} for d in domains or DOMAINS]
    return load_config(None, [
        f"storage.workdir={workdir}",
        f"data.domains={json.dumps(doms)}",
        f"label.samples={SAMPLES}",
        "label.backend.api_key_env=null",
        "classify.batch_size=16",
        "classify.part_rows=64",
        *extra,
    ])  # fmt: skip


def images_of(bench: dict, domains: list[str]) -> set[str]:
    t = bench["truth"]
    uris = set(t.loc[t["domain"].isin(domains), "uri"])
    return uris | ({*bench["corrupt"], bench["twin"]} if "birds" in domains else set())


# ------------------------------------------------------------------------------------------ the table
def test_every_image_once_equal_to_bundle_classify_and_a_rerun_computes_nothing(ray_cluster, bench, bucket,
                                                                                write_bundle):
    st = Storage()
    cfg = config(f"{bucket}/run", bench, f"classify.bundle={bench['bundles']['both']}", "classify.top_k=3")
    summary = run_classify(cfg)
    df = read_predictions(cfg.artifact("predictions"), st)

    expected = images_of(bench, list(DOMAINS))
    assert set(df["uri"]) == expected and len(df) == len(expected) == df["uri"].nunique()
    assert summary["images_seen"] == len(expected) and summary["images_copied"] == 1  # the twin
    bad = df[df["status"] == "bad_image"].set_index("uri")
    assert set(bad.index) == set(bench["corrupt"])
    for uri, problem in zip(sorted(bench["corrupt"]), ("empty file", "not an image", "truncated or corrupt"),
                            strict=True):  # fmt: skip
        assert uri in bad.loc[uri, "error"] and problem in bad.loc[uri, "error"], bad.loc[uri, "error"]
        assert bad.loc[uri, "source"] == "none" and pd.isna(bad.loc[uri, "name"])

    # The stage's answers are the bundle's answers in process, image by image.
    bundle = load_bundle(bench["bundles"]["both"], st)
    good = df[df["status"] != "bad_image"].set_index("uri")
    assert set(good["status"]) == {"ok"} and set(good["source"]) == {"clip"}
    assert (good["model_version"] == bundle.model_version).all()
    for domain in DOMAINS:
        rows = good[good["domain"] == domain]
        data = [st.read_bytes(u) for u in rows.index]
        preds = bundle.classify([decode_image(b) for b in data], top_k=5, domain=domain)
        assert [image_id(b) for b in data] == rows["image_id"].tolist()
        assert rows["name"].tolist() == [p.names[0] for p in preds]
        np.testing.assert_allclose(np.stack(rows["top_k_scores"].to_numpy()), [p.scores[:3] for p in preds], atol=1e-4)
        for p, names, scores in zip(preds, rows["top_k_names"], rows["top_k_scores"], strict=True):
            # the same names with the same scores; two names may trade places only where their scores tie
            theirs = dict(zip(p.names, p.scores, strict=True))
            assert all(n in theirs and abs(theirs[n] - s) < 1e-4 for n, s in zip(names, scores, strict=True))
        # no calibration set in this workdir: the routing confidence is the top probability itself
        np.testing.assert_allclose(rows["confidence"], rows["score"], atol=1e-6)
    assert good.loc[bench["twin"], "name"] == good.loc[bench["twin_of"], "name"]
    assert good.loc[bench["twin"], "image_id"] == good.loc[bench["twin_of"], "image_id"]
    on_disk = st.read_json(cfg.artifact("predictions/_summary.json"))
    assert on_disk["domains"]["birds"]["by_status"] == {"bad_image": 3, "ok": SPECIES * PER_SPECIES + 1}
    assert on_disk["domains"]["flowers"]["by_source"] == {"clip": SPECIES * PER_SPECIES}
    assert all("/domain=birds/" in f or "/domain=flowers/" in f for ps in predictions_table(cfg.artifact("predictions"), st).part_files().values()
               for _, f in ps)  # fmt: skip

    files = {f for ps in predictions_table(cfg.artifact("predictions"), st).part_files().values() for _, f in ps}
    again = run_classify(cfg)
    assert again["images_computed"] == 0 and again["rows_written"] == 0
    assert again["images_skipped"] == len(expected)
    assert {f for ps in predictions_table(cfg.artifact("predictions"), st).part_files().values() for _, f in ps} == files
    assert read_predictions(cfg.artifact("predictions"), st).equals(df)

    # A new bundle version at the same URI: everything is computed again, the old parts are dropped.
    cfg.classify.bundle = make_bundle(write_bundle, f"{bucket}/newer", bench["truth"], bench["taxonomy"], list(DOMAINS), seed=3)
    newer = run_classify(cfg)
    df2 = read_predictions(cfg.artifact("predictions"), st)
    assert newer["images_computed"] + newer["images_copied"] == len(expected) and newer["stale_parts_removed"] == len(files)
    assert len(df2) == len(expected) and df2["model_version"].nunique() == 1
    assert df2["model_version"].iloc[0] == load_bundle(cfg.classify.bundle, st).model_version != bundle.model_version


def test_one_bundle_per_domain(ray_cluster, bench, tmp_path):
    st = Storage()
    b = bench["bundles"]
    cfg = config(str(tmp_path / "run"), bench, f"classify.bundles={json.dumps({'birds': b['birds'], 'flowers': b['flowers']})}")
    summary = run_classify(cfg)
    df = read_predictions(cfg.artifact("predictions"), st)
    assert len(df) == len(images_of(bench, list(DOMAINS)))
    for domain in DOMAINS:
        bundle = load_bundle(b[domain], st)
        rows = df[(df["domain"] == domain) & (df["status"] == "ok")]
        assert summary["domains"][domain]["model_version"] == bundle.model_version
        assert (rows["model_version"] == bundle.model_version).all()
        assert set(rows["name"]) <= set(bundle.names)
        sample = rows.iloc[:8]
        preds = bundle.classify([decode_image(st.read_bytes(u)) for u in sample["uri"]], top_k=5)
        assert sample["name"].tolist() == [p.names[0] for p in preds]

    # A domain the mapping does not name is refused before anything runs.
    cfg.classify.bundles = {"birds": b["birds"]}
    with pytest.raises(Exception, match="no bundle for domain 'flowers'"):
        run_classify(cfg)


@pytest.mark.slow
def test_a_killed_job_resumes_without_recomputing_what_it_wrote(ray_cluster, bench, tmp_path, repo_root):
    import ray

    st = Storage()
    workdir = tmp_path / "run"
    doms = [{"name": d, "uri": f"{bench['root']}/images/{d}", "meta_class": m} for d, m in DOMAINS.items()]
    overrides = [f"storage.workdir={workdir}", f"data.domains={json.dumps(doms)}",
                 f"classify.bundle={bench['bundles']['both']}", "classify.batch_size=8", "classify.part_rows=8",
                 "classify.flush_interval_s=1", "label.listing_chunk=40"]  # fmt: skip
    cfg = load_config(None, overrides)
    out = cfg.artifact("predictions")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "near_ray", "classify"] + [a for o in overrides for a in ("--set", o)]
    with open(tmp_path / "driver.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                if sum(len(p) for p in predictions_table(out, st).part_files().values()) >= 3:
                    break
                time.sleep(0.1)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    kept_files = {f: st.read_bytes(f) for ps in predictions_table(out, st).part_files().values() for _, f in ps}
    kept = read_predictions(out, st)
    total = len(images_of(bench, list(DOMAINS)))
    assert 0 < len(kept) < total, (len(kept), (tmp_path / "driver.log").read_text()[-2000:])

    summary = run_classify(cfg)
    df = read_predictions(out, st)
    assert set(df["uri"]) == images_of(bench, list(DOMAINS)) and len(df) == total == df["uri"].nunique()
    assert summary["images_skipped"] == len(kept)
    assert summary["images_computed"] + summary["images_copied"] == total - len(kept)
    for f, data in kept_files.items():  # what the killed job wrote is kept as it was
        assert st.read_bytes(f) == data


@pytest.fixture(scope="module")
def namer_profile(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("profile") / "namer.yaml"
    path.write_text(yaml.safe_dump(NAMER))
    return str(path)


def write_discovery_set(workdir: str, bench: dict) -> None:
    """refine's candidates.parquet for the train images, whose MLLM majority label is the true species."""
    import pyarrow as pa

    t = bench["truth"][bench["truth"]["split"] == "train"]
    Storage().write_parquet(join(workdir, "refine/candidates.parquet"), pa.table(
        {"uri": t["uri"].tolist(), "domain": t["domain"].tolist(), "majority_label": t["species"].tolist()}))


@pytest.mark.slow
def test_cascade_routes_below_the_threshold_pays_once_and_stops_at_the_caps(ray_cluster, bench, tmp_path,
                                                                           namer_profile):  # fmt: skip
    st = Storage()
    workdir = str(tmp_path / "run")
    write_discovery_set(workdir, bench)
    both = bench["bundles"]["both"]
    cfg = config(workdir, bench, f"classify.bundle={both}")
    first = run_classify(cfg)  # no routing configured: the CLIP answers everything, confidences calibrated
    cal = first["calibration"][both]
    assert cal["fitted"] and cal["images"] == 2 * SPECIES * PER_SPECIES // 2 and cal["temperature"] > 0
    assert cal["ece_after"] <= cal["ece_before"] + 1e-9
    assert st.exists(join(workdir, f"classify/calibration/{cal['model_version']}.json"))
    df = read_predictions(cfg.artifact("predictions"), st)
    good = df[df["status"] != "bad_image"]
    assert not np.allclose(good["confidence"], good["score"]), "the confidence is the calibrated probability"
    tau = float(np.quantile(good["confidence"], 0.12))
    below = set(good.loc[good["confidence"] < tau, "uri"])
    truth = bench["truth"].set_index("uri")["species"].to_dict()
    truth[bench["twin"]] = truth[bench["twin_of"]]
    ids = df.set_index("uri")["image_id"]

    with AnnotatorServer(bench["root"], profile=namer_profile, seed=0) as ann:
        cfg.label.backend.base_url = ann.base_url
        cfg.classify.route_below = tau
        s = run_classify(cfg)
        routed = read_predictions(cfg.artifact("predictions"), st).set_index("uri")
        routed = routed[routed["status"] == "routed"]
        assert set(routed.index) == below and s["cascade"]["routed_this_run"] == len(below)
        assert s["images_computed"] == 0, "the CLIP's answers are not computed again"
        assert ann.stats()["requests"] == ids[sorted(below)].nunique() * SAMPLES == s["mllm_calls"]
        assert set(routed["source"]) == {"mllm"} and not routed["new_name"].any()
        # exact names and synonyms, mapped onto the bundle's vocabulary
        assert (routed["name"] == routed.index.map(truth)).all(), routed[["name"]]
        assert (routed["mllm_cost_usd"] > 0).sum() >= ids[sorted(below)].nunique() - 1 and s["mllm_spend_usd"] > 0

        paid = ann.stats()["requests"]
        again = run_classify(cfg)
        assert ann.stats()["requests"] == paid and again["cascade"]["routed_this_run"] == 0 and again["mllm_calls"] == 0

        # An image cap over the whole table: 10 images more, the least confident not routed yet.
        cfg.classify.route_below, cfg.classify.route_fraction = None, 0.5
        cfg.classify.max_mllm_images = len(below) + 10
        capped = run_classify(cfg)
        table = read_predictions(cfg.artifact("predictions"), st)
        now = set(table.loc[table["status"] == "routed", "uri"])
        new = now - below
        rest = good[~good["uri"].isin(below)].sort_values(["confidence", "uri"])
        assert len(new) == 10 and new <= set(rest["uri"].iloc[:12])  # ties in confidence may reorder neighbours
        picked = sum(int(np.floor(0.5 * n + 0.5)) for n in good.groupby("domain").size())
        assert capped["cascade"]["not_routed_over_budget"] == picked - len(below) - 10
        assert capped["cascade"]["routed_this_run"] == 10
        unrouted = table[table["uri"].isin(rest["uri"]) & ~table["uri"].isin(now)]
        assert set(unrouted["source"]) == {"clip"} and set(unrouted["status"]) == {"ok"}

        # A spend cap: about three images' worth more, then it stops and counts the rest.
        cfg.classify.max_mllm_images = None
        per_image = float(table["mllm_cost_usd"].max())
        cfg.classify.mllm_budget_usd = capped["cascade"]["table_spend_usd"] + 3.5 * per_image
        before = ann.stats()["requests"]
        budget = run_classify(cfg)
        c = budget["cascade"]
        assert 1 <= c["routed_this_run"] <= 3 and c["table_spend_usd"] <= cfg.classify.mllm_budget_usd + 1e-9
        assert c["not_routed_over_budget"] == picked - len(below) - 10 - c["routed_this_run"]
        assert ann.stats()["requests"] - before == c["mllm_calls"] > 0


# ------------------------------------------------------------------------------------------ pieces
def test_mllm_answers_map_synonyms_onto_the_vocabulary_and_keep_new_names():
    vocabulary = [
        {"name": "Mountain Sooty Swallow", "domain": "birds", "synonyms": ["Mountain Black Swallow"], "support": 4},
        {"name": "Spot-tailed Swallow", "domain": "birds", "synonyms": [], "support": 2},
        {"name": "Mountain Sooty Swallow", "domain": "other", "synonyms": [], "support": 1},
    ]
    base = {"domain": "birds", "prompt_version": "v1", "model": "m", "input_tokens": 100, "output_tokens": 10,
            "latency_s": 0.1, "image_id": "x"}  # fmt: skip
    rows = [
        {"uri": "a", "sample": 0, "status": "ok", "label": "Mountain Black Swallow"},
        {"uri": "a", "sample": 1, "status": "ok", "label": "mountain sooty swallows"},
        {"uri": "b", "sample": 0, "status": "ok", "label": "Lesser Amber Siskin"},
        {"uri": "b", "sample": 1, "status": "ok", "label": "Spot-tailed Swallow"},
        {"uri": "b", "sample": 2, "status": "ok", "label": "Lesser Amber Siskin"},
        {"uri": "c", "sample": 0, "status": "unparsable", "label": None},
        {"uri": "c", "sample": 1, "status": "mllm_error", "label": None, "input_tokens": 0, "output_tokens": 0},
    ]
    answers = mllm_answers(pd.DataFrame([{**base, **r} for r in rows]), vocabulary, "birds", LabelConfig().prices)
    a, b, c = answers["a"], answers["b"], answers["c"]
    assert (a.name, a.share, a.new) == ("Mountain Sooty Swallow", 1.0, False)
    assert (b.name, b.new) == ("Lesser Amber Siskin", True) and b.share == pytest.approx(2 / 3)
    assert c.name is None and c.statuses == {"unparsable": 1, "mllm_error": 1}
    prices = LabelConfig().prices
    assert a.cost_usd == pytest.approx(prices.mllm_usd(200, 20, 2)) and c.cost_usd == pytest.approx(prices.mllm_usd(100, 10, 2))


def test_only_the_configured_mllm_votes():
    """After a change of model, the answers the old model gave are history: they cost, they do not vote."""
    vocabulary = [{"name": "Song Sparrow", "domain": "birds", "support": 3},
                  {"name": "Lincoln's Sparrow", "domain": "birds", "support": 3}]  # fmt: skip
    base = {"domain": "birds", "uri": "a", "prompt_version": "v1", "input_tokens": 100, "output_tokens": 10,
            "latency_s": 0.1, "image_id": "x", "status": "ok"}  # fmt: skip
    rows = [{**base, "model": "old", "sample": s, "label": "Song Sparrow"} for s in range(3)]
    rows += [{**base, "model": "new", "sample": s, "label": "Lincoln's Sparrow"} for s in range(2)]
    prices = LabelConfig().prices
    a = mllm_answers(pd.DataFrame(rows), vocabulary, "birds", prices, current=("v1", "new"))["a"]
    assert (a.name, a.share) == ("Lincoln's Sparrow", 1.0)
    assert a.cost_usd == pytest.approx(prices.mllm_usd(500, 50, 5)), "every request made for it is counted"


def test_an_unknown_cost_per_image_grows_the_rounds(monkeypatch, tmp_path):
    """With a budget and no cost known yet (free answers, or no discovery summary), the cascade asks
    1, 2, 4, … images a round: a handful of label-stage runs, not one per image."""
    import near_ray.classify.cascade as cascade

    todo = [cascade.Candidate(0.1 + i / 100, "birds", f"s3://b/{i:02d}.png", "part", "p", False, 0.0) for i in range(40)]
    rounds: list[int] = []
    monkeypatch.setattr(cascade, "candidates", lambda *a: (list(todo), {"picked": 40, "already_answered": 0,
                                                                         "routed": 0, "spent_usd": 0.0,
                                                                         "max_image_cost_usd": 0.0}))  # fmt: skip

    def ask(cfg, batch, *a):
        rounds.append(len(batch))
        free = cascade.Answer(name="Song Sparrow", share=1.0, new=False, cost_usd=0.0, statuses={"ok": 2})
        return {"mllm_calls": 2 * len(batch)}, {(c.domain, c.uri): free for c in batch}

    monkeypatch.setattr(cascade, "ask_mllm", ask)
    monkeypatch.setattr(cascade, "apply_answers", lambda *a: None)
    cfg = RunConfig.model_validate({"storage": {"workdir": str(tmp_path)},
                                    "classify": {"route_below": 0.9, "mllm_budget_usd": 5.0}})  # fmt: skip
    out = cascade.run_cascade(cfg, {}, {}, {}, str(tmp_path / "predictions"), None, Storage())
    assert rounds == [1, 2, 4, 8, 16, 9] and out["routed_this_run"] == 40 and out["rounds"] == 6

    # Failed requests say nothing of the price: one image a round until an answer does, then the budget.
    rounds.clear()

    def failing_then_priced(cfg, batch, *a):
        rounds.append(len(batch))
        if len(rounds) <= 3:
            answer = cascade.Answer(name=None, share=0.0, new=False, cost_usd=0.0, statuses={"mllm_error": 2})
        else:
            answer = cascade.Answer(name="Song Sparrow", share=1.0, new=False, cost_usd=0.01, statuses={"ok": 2})
        return {"mllm_calls": 2 * len(batch)}, {(c.domain, c.uri): answer for c in batch}

    monkeypatch.setattr(cascade, "ask_mllm", failing_then_priced)
    cfg.classify.mllm_budget_usd = 0.03
    out = cascade.run_cascade(cfg, {}, {}, {}, str(tmp_path / "predictions"), None, Storage())
    assert rounds == [1, 1, 1, 1, 2] and out["table_spend_usd"] <= 0.03 + 1e-9


def test_a_relative_domain_folder_gets_its_answers(monkeypatch, tmp_path):
    """The cascade's manifests name images the way the label stage reads them back: with a local domain
    folder given as a relative path, every answer lands on the row it was asked for."""
    import near_ray.classify.cascade as cascade
    import near_ray.data.collections as collections
    import near_ray.label.stage as label_stage
    from near_ray.classify.tower import Target
    from near_ray.config import DomainConfig
    from near_ray.label.backends import model_name
    from near_ray.label.table import labels_table

    monkeypatch.chdir(tmp_path)
    st = Storage()
    for i in range(3):
        st.write_bytes(f"data/birds/{i}.png", b"x")
    domain = DomainConfig(name="birds", uri="./data/birds/", meta_class="bird")
    cfg = RunConfig.model_validate({"storage": {"workdir": "run"}, "data": {"domains": [domain.model_dump()]}})
    listed = [o.uri for o in st.list(domain.uri)]
    assert sorted(listed) == [f"data/birds/{i}.png" for i in range(3)]  # relative, as the folder was given

    def label(label_cfg):  # the label stage, below the seam: the URIs it would read, each answered
        w = labels_table(label_cfg.artifact("labels"), st, part_rows=100, flush_interval_s=60)
        for d in label_cfg.data.domains:
            w.add([{"uri": u, "domain": d.name, "image_id": u, "sample": 0, "status": "ok", "label": "Song Sparrow",
                    "prompt_version": label_cfg.label.prompt_version, "model": model_name(label_cfg.label),
                    "input_tokens": 10, "output_tokens": 1, "latency_s": 0.1}
                   for u in collections.domain_uris(d, label_cfg, st)])  # fmt: skip
        w.flush()
        return {"mllm_calls": 3}

    monkeypatch.setattr(label_stage, "run_label", label)
    batch = [cascade.Candidate(0.1, "birds", u, "part", "p", False, 0.0) for u in listed]
    targets = {"birds": Target(bundle="b", inner="birds", model_version="v", spec={})}
    vocab = {"b": [{"name": "Song Sparrow", "domain": "birds", "support": 3}]}
    _, answers = cascade.ask_mllm(cfg, batch, {"birds": domain}, targets, vocab, 0, st)
    assert sorted(answers) == [("birds", u) for u in sorted(listed)]
    assert {a.name for a in answers.values()} == {"Song Sparrow"}


def test_a_storage_error_on_the_predictions_table_is_raised_not_read_as_empty(tmp_path):
    """A listing error (S3 throttling, an endpoint blip) must not look like "nothing classified yet":
    the run would classify, and the cascade pay for, every image again."""
    from near_ray.classify.table import resume_rule
    from near_ray.parts import ResumeLedger
    from near_ray.storage import StorageError

    def ClassifyLedger(uri, storage, versions):  # noqa: N802 - the classify stage's ledger, in-process
        return ResumeLedger.open(predictions_table(uri, storage), resume_rule(versions), local=True)

    uri = str(tmp_path / "predictions")
    writer = predictions_table(uri, Storage(), part_rows=10, flush_interval_s=60)
    writer.add([{"uri": "s3://b/a.jpg", "domain": "birds", "image_id": "A", "model_version": "v2", "status": "ok"}])
    writer.flush()
    ledger = ClassifyLedger(uri, Storage(), {"birds": "v2"})
    assert ledger.plan([("s3://b/a.jpg", "birds", "A")]) == [[]] and ledger.counts()["images_skipped"] == 1

    class Throttled(Storage):
        def list(self, *a, **k):
            raise StorageError(f"{uri}: SlowDown: please reduce your request rate")

    with pytest.raises(StorageError, match="SlowDown"):
        ClassifyLedger(uri, Throttled(), {"birds": "v2"})
    with pytest.raises(StorageError, match="SlowDown"):
        read_predictions(uri, Throttled())


def test_the_summary_counts_each_image_once_beside_an_older_versions_parts(tmp_path):
    """A capped run (classify.max_images) keeps the older bundle version's parts: the summary counts an
    image once, by its newest row, and the images only the older version named as other_versions."""
    from near_ray.classify.stage import _summary
    from near_ray.classify.tower import Target

    uri, st = str(tmp_path / "predictions"), Storage()
    writer = predictions_table(uri, st, part_rows=100, flush_interval_s=60)
    old = [{"uri": f"s3://b/{i}.jpg", "domain": "birds", "image_id": str(i), "model_version": "v1", "status": "ok",
            "source": "clip"} for i in range(4)]  # fmt: skip
    writer.add(old)
    writer.flush()
    writer.add([{**r, "model_version": "v2", "status": "abstained", "source": "none"} for r in old[:2]])
    writer.flush()
    targets = {"birds": Target(bundle="b", inner=None, model_version="v2", spec={})}
    s = _summary(uri, st, targets, {}, {}, None, {"classify_s": 1.0})["domains"]["birds"]
    assert s["images"] == 4 and s["other_versions"] == 2
    assert s["by_status"] == {"abstained": 2, "ok": 2} and s["by_source"] == {"clip": 2, "none": 2}
    assert read_predictions(uri, st)["model_version"].tolist() == ["v2", "v2", "v1", "v1"]


def test_a_failed_part_write_keeps_its_rows_for_the_next_flush(tmp_path):
    from near_ray.storage import StorageError

    class Flaky(Storage):
        failures = 1

        def write_parquet(self, uri, table):
            if self.failures:
                self.failures -= 1
                raise StorageError(f"{uri}: cannot reach the S3 endpoint")
            return super().write_parquet(uri, table)

    uri = str(tmp_path / "predictions")
    writer = predictions_table(uri, Flaky(), part_rows=10, flush_interval_s=60)
    writer.add([{"uri": f"s3://b/{i}.jpg", "domain": "birds", "image_id": str(i), "model_version": "v",
                 "status": "ok"} for i in range(3)])  # fmt: skip
    with pytest.raises(StorageError):
        writer.flush()
    writer.flush()  # the stage's final flush
    assert sorted(read_predictions(uri, Storage())["uri"]) == [f"s3://b/{i}.jpg" for i in range(3)]


def test_temperature_scaling_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    logits = 2.0 * rng.normal(size=(4000, 8))
    truth = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(8, p=p) for p in truth])
    over = np.exp(3 * logits) / np.exp(3 * logits).sum(axis=1, keepdims=True)  # 3x too sharp
    t = fit_temperature(over, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    report = calibration_report(over, labels, t)
    assert report["ece_before"] > 0.2 and report["ece_after"] < 0.04 and report["nll_after"] < report["nll_before"]
    assert fit_temperature(truth, labels) == pytest.approx(1.0, rel=0.1)  # already calibrated: T stays near 1
    scaled = temperature_scale(np.hstack([over, np.zeros((len(over), 2))]), t)  # entries outside the domain
    assert (scaled.argmax(axis=1) == over.argmax(axis=1)).all() and (scaled[:, 8:] == 0).all()
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0)


def test_expected_calibration_error_on_constructed_bins():
    conf = np.array([0.95] * 10 + [0.55] * 10)
    correct = np.array([1] * 9 + [0] + [1] * 3 + [0] * 7)  # 90% right at 0.95, 30% right at 0.55
    assert expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.05 + 0.5 * 0.25)
    assert expected_calibration_error(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.0)
