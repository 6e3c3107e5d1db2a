"""The label stage end to end: a real Ray cluster, moto S3, the simulated annotator over HTTP.

Kept small (2 domains x 6 images x S=2); every run's requests are counted by the annotator itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from near_ray.config import load_config
from near_ray.data.collections import EmptyDomainError
from near_ray.label.backends.openai import ChatClient
from near_ray.label.parse import parse_answer
from near_ray.label.stage import run_label
from near_ray.label.table import copy_identical, labels_table, read_labels, read_labels_table, resume_rule
from near_ray.parts import ResumeLedger
from near_ray.sim.annotator import AnnotatorServer
from near_ray.storage import Storage, join

SAMPLES = 2
# An annotator that always names the right species, wrapped in format noise half of the time.
PERFECT = {
    "name": "perfect",
    "model": "simulated-perfect",
    "outcomes": {"exact": 1.0, "synonym": 0, "coarse": 0, "sibling": 0, "unrelated": 0, "hallucinated": 0, "refusal": 0},
    "hard_fraction": 0.0,
    "format_noise": 0.5,
    "format_styles": {"sentence": 0.3, "list": 0.2, "markdown": 0.2, "period": 0.1, "lowercase": 0.1, "article": 0.1},
    "coarse_forms": {"genus_common": 1.0},
    "synonym_forms": {"synonym": 1.0},
}


@pytest.fixture(scope="module")
def bench(synth_bench) -> str:
    """A tiny synthetic benchmark on moto S3: birds and flowers, 3 species x 2 images each."""
    return synth_bench(images_per_species=2, s3=True, own=True)  # tests add files below it


@pytest.fixture(scope="module")
def perfect_profile(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("profile") / "perfect.yaml"
    path.write_text(yaml.safe_dump(PERFECT))
    return str(path)


def _cfg(workdir: str, base_url: str, domains: list[dict], *extra: str):
    return load_config(None, [
        f"storage.workdir={workdir}",
        f"label.backend.base_url={base_url}",
        f"label.samples={SAMPLES}",
        "label.backend.backoff_base_s=0.05",
        "label.backend.backoff_max_s=0.5",
        f"data.domains={json.dumps(domains)}",
        *extra,
    ])  # fmt: skip


def _domains(bench: str) -> list[dict]:
    return [
        {"name": "birds", "uri": f"{bench}/images/birds", "meta_class": "bird"},
        {"name": "flowers", "uri": f"{bench}/images/flowers"},
    ]


def _truth(bench: str) -> dict[str, str]:
    t = Storage().read_parquet(f"{bench}/truth.parquet").to_pylist()
    return {join(bench, r["path"]): r["species"] for r in t}


# ------------------------------------------------------------------------------------------ end to end
def test_labels_are_the_annotators_answers_and_a_rerun_asks_nothing(ray_cluster, bench, bucket, perfect_profile):
    truth = _truth(bench)
    with AnnotatorServer(bench, profile=perfect_profile, seed=0) as ann:
        cfg = _cfg(f"{bucket}/run", ann.base_url, _domains(bench))
        summary = run_label(cfg)
        first = ann.stats()["requests"]
        df = read_labels(cfg)

        assert first == len(truth) * SAMPLES == summary["mllm_calls"]
        assert set(df["uri"]) == set(truth) and len(df) == len(truth) * SAMPLES
        assert set(df["status"]) == {"ok"}
        # The label is the parse of the verbatim answer, and the perfect annotator's answer is the species.
        assert (df["label"] == df["raw_answer"].map(parse_answer)).all()
        assert (df["label"] == df["uri"].map(truth).map(parse_answer)).all(), df[["uri", "raw_answer", "label"]]
        assert df.groupby("uri")["seed"].nunique().eq(SAMPLES).all()
        assert (df["input_tokens"] > 0).all() and (df["prompt_version"] == "v1").all()
        assert set(df["domain"]) == {"birds", "flowers"}
        assert summary["by_domain"]["birds"] == {"ok": 6 * SAMPLES}
        assert summary["estimated_cost_usd"] > 0
        assert Storage().read_json(cfg.artifact("labels/_summary.json"))["mllm_calls"] == first
        parts = [o.uri for o in Storage().list(cfg.artifact("labels"), suffixes=[".parquet"])]
        assert parts and all("/domain=birds/" in p or "/domain=flowers/" in p for p in parts)

        again = run_label(cfg)
        assert ann.stats()["requests"] == first, "a re-run must not ask the annotator anything"
        assert again["mllm_calls"] == 0 and again["images_skipped"] == len(truth)
        assert read_labels(cfg).equals(df)


def test_faults_end_as_retried_answers_or_mllm_error_rows(ray_cluster, bench, tmp_path):
    # 70% of attempts fail; with one retry about half of the rows end as mllm_error, the rest are retried successes.
    faults = {"rate_429": 0.25, "retry_after_s": 0.1, "rate_500": 0.25, "rate_malformed": 0.1, "rate_hang": 0.1,
              "hang_s": 3.0}  # fmt: skip
    domains = _domains(bench)[:1]
    with AnnotatorServer(bench, profile="strong", seed=1, faults=faults) as ann:
        cfg = _cfg(str(tmp_path / "run"), ann.base_url, domains, "label.backend.timeout_s=1.0",
                   "label.backend.max_retries=1")  # fmt: skip
        summary = run_label(cfg)
        df = read_labels(cfg)
        stats = ann.stats()
        assert len(df) == 6 * SAMPLES and set(df["status"]) <= {"ok", "unparsable", "mllm_error"}
        assert stats["requests"] > summary["mllm_calls"], "faults were retried"
        assert sum(stats["outcomes"][k] for k in ("http_429", "http_500", "malformed", "hang")) > 0
        errors = df[df["status"] == "mllm_error"]
        assert 0 < len(errors) < len(df)
        assert all(r.uri in r.error for r in errors.itertuples()), "an error names its image"
        answered = df[df["status"] != "mllm_error"]
        assert answered["raw_answer"].notna().all()

        # A re-run asks again only for the mllm_error rows; answered rows stay as they were.
        before = stats["requests"]
        again = run_label(cfg)
        assert again["mllm_calls"] == len(errors)
        assert (ann.stats()["requests"] > before) == (len(errors) > 0)
        df2 = read_labels(cfg).set_index(["uri", "sample"])
        kept = answered.set_index(["uri", "sample"])
        assert df2.loc[kept.index, "raw_answer"].equals(kept["raw_answer"])
        assert (df2["status"] == "mllm_error").sum() <= len(errors)


def test_bad_files_become_bad_image_rows_and_identical_bytes_are_asked_once(ray_cluster, bench, bucket):
    import io

    storage = Storage()
    birds = [o.uri for o in storage.list(f"{bench}/images/birds")][:3]
    prefix = f"{bucket}/mixed"
    good = {f"{prefix}/good{i}.png": storage.read_bytes(u) for i, u in enumerate(birds)}
    twin = f"{prefix}/sub/twin_of_good0.png"
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")  # 81 Mpx claimed (> max_pixels 64 M), a few kB on disk
    bad = {
        f"{prefix}/empty.png": b"",
        f"{prefix}/truncated.png": good[f"{prefix}/good1.png"][:120],
        f"{prefix}/notes.jpg": b"not an image at all",
        f"{prefix}/huge.png": bomb.getvalue(),
    }
    for uri, data in {**good, twin: good[f"{prefix}/good0.png"], **bad}.items():
        storage.write_bytes(uri, data)

    with AnnotatorServer(bench, profile="strong", seed=0) as ann:
        cfg = _cfg(f"{bucket}/run", ann.base_url, [{"name": "birds", "uri": prefix, "meta_class": "bird"}])
        summary = run_label(cfg)
        assert ann.stats()["requests"] == len(good) * SAMPLES, "the twin must not be asked about"
    df = read_labels(cfg)
    assert set(df["uri"]) == set(good) | {twin} | set(bad) and len(df) == (len(good) + 1 + len(bad)) * SAMPLES

    rows = df.set_index(["uri", "sample"])
    for s in range(SAMPLES):
        a, b = rows.loc[(f"{prefix}/good0.png", s)], rows.loc[(twin, s)]
        assert (a["image_id"], a["raw_answer"], a["label"], a["status"]) == (b["image_id"], b["raw_answer"], b["label"], b["status"])
    problems = {"empty.png": "empty file", "truncated.png": "truncated or corrupt", "notes.jpg": "not an image",
                "huge.png": "too large"}  # fmt: skip
    for name, problem in problems.items():
        r = df[df["uri"] == f"{prefix}/{name}"]
        assert set(r["status"]) == {"bad_image"}, r
        assert r["error"].str.contains(f"{prefix}/{name}", regex=False).all() and r["error"].str.contains(problem).all()
    assert set(df[df["uri"].isin(good)]["status"]) <= {"ok", "unparsable"}
    assert summary["bad_images"] == len(bad) and summary["samples_copied"] == SAMPLES


def test_empty_prefix_is_a_clear_error(bucket, tmp_path):
    cfg = _cfg(f"{bucket}/run", "http://127.0.0.1:9/v1", [{"name": "cars", "uri": f"{bucket}/nothing-here"}])
    with pytest.raises(EmptyDomainError, match=f"cars.*{bucket}/nothing-here"):
        run_label(cfg)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no images")
    cfg = _cfg(str(tmp_path / "run"), "http://127.0.0.1:9/v1", [{"name": "docs", "uri": str(tmp_path / "docs")}])
    with pytest.raises(EmptyDomainError, match="docs"):
        run_label(cfg)


@pytest.mark.slow
def test_a_killed_run_resumes_paying_only_for_the_rest(ray_cluster, bench, tmp_path, repo_root):
    import ray

    truth = _truth(bench)
    total = len(truth) * SAMPLES
    workdir = tmp_path / "run"
    with AnnotatorServer(bench, profile="strong", seed=0, faults={"latency_s": 0.4}) as ann:
        overrides = ["label.backend.concurrency=1", "label.batch_size=2", "label.part_rows=2", "label.flush_interval_s=1"]
        cfg = _cfg(str(workdir), ann.base_url, _domains(bench), *overrides)
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        cmd = [sys.executable, "-m", "near_ray.cli", "label"]
        for o in [f"storage.workdir={workdir}", f"label.backend.base_url={ann.base_url}", f"label.samples={SAMPLES}",
                  f"data.domains={json.dumps(_domains(bench))}", *overrides]:  # fmt: skip
            cmd += ["--set", o]
        proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                done = read_labels_table(cfg.artifact("labels"), Storage())
                if done is not None and done.num_rows >= 4:
                    break
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        kept = read_labels_table(cfg.artifact("labels"), Storage())
        assert kept is not None and 0 < kept.num_rows < total, "the run was killed half-way with some parts written"

        # The killed driver's labeler actors die with it, but asynchronously: wait until the endpoint is quiet.
        before, quiet_since = ann.stats()["requests"], time.monotonic()
        while time.monotonic() - quiet_since < 2.0:
            time.sleep(0.25)
            now = ann.stats()["requests"]
            if now != before:
                before, quiet_since = now, time.monotonic()
        kept = read_labels_table(cfg.artifact("labels"), Storage())
        cfg.label.backend.concurrency = 8
        summary = run_label(cfg)
        assert ann.stats()["requests"] - before == total - kept.num_rows == summary["mllm_calls"]
    df = read_labels(cfg)
    assert set(df["uri"]) == set(truth) and len(df) == total


# ------------------------------------------------------------------------------------------ pieces
def LabelLedger(uri: str, storage: Storage, prompt_version: str, model: str) -> ResumeLedger:  # noqa: N802
    """The label stage's ledger, in-process: two partitions, so that routing by image is exercised too."""
    return ResumeLedger.open(labels_table(uri, storage), resume_rule(prompt_version, model), partitions=2, local=True)


def test_ledger_skips_final_rows_and_copies_identical_images(tmp_path):
    uri, storage = str(tmp_path / "labels"), Storage()
    writer = labels_table(uri, storage, part_rows=100, flush_interval_s=60)
    base = {"domain": "d", "model": "m", "prompt_version": "v1", "input_tokens": 0, "output_tokens": 0, "latency_s": 0.0}
    writer.add([
        {**base, "uri": "a.png", "image_id": "A", "sample": 0, "status": "ok", "label": "X"},
        {**base, "uri": "a.png", "image_id": "A", "sample": 1, "status": "mllm_error", "error": "a.png: HTTP 500"},
        {**base, "uri": "z.png", "image_id": "Z", "sample": 0, "status": "ok", "label": "Y"},
    ])  # fmt: skip
    writer.flush()
    ledger = LabelLedger(uri, storage, "v1", "m")
    plans = ledger.plan([("a.png", "d", "A"), ("b.png", "d", "A"), ("c.png", "d", "C")], samples=2)
    assert plans == [[1], [], [0, 1]]  # a: only the failed sample; b: same bytes as a; c: new
    assert [(x["uri"], x["sample"]) for b in ledger.aliases() for x in b] == [("b.png", 0), ("b.png", 1)]
    assert LabelLedger(uri, storage, "v2", "m").plan([("a.png", "d", "A")], 2) == [[0, 1]], "new prompt version"

    # A later ok row for a.png/1 supersedes the error in what downstream stages read.
    writer.add([{**base, "uri": "a.png", "image_id": "A", "sample": 1, "status": "ok", "label": "X2"}])
    writer.flush()
    df = read_labels(uri, storage)
    assert len(df) == 3 and df.set_index(["uri", "sample"]).loc[("a.png", 1), "label"] == "X2"


def test_ledger_keeps_domains_apart(tmp_path):
    """One image listed by two domains (overlapping prefixes) is asked under each domain's prompt, a
    re-run skips both, and identical bytes are copied only within a domain."""
    uri, storage = str(tmp_path / "labels"), Storage()
    ledger = LabelLedger(uri, storage, "v1", "m")
    assert ledger.plan([("a.png", "birds", "A"), ("a.png", "warblers", "A"), ("b.png", "warblers", "A")], 1) == [
        [0], [0], []]  # fmt: skip
    aliases = [x for b in ledger.aliases() for x in b]
    assert [(x["domain"], x["uri"]) for x in aliases] == [("warblers", "b.png")]
    writer = labels_table(uri, storage, part_rows=100, flush_interval_s=60)
    base = {"model": "m", "prompt_version": "v1", "input_tokens": 1, "output_tokens": 1, "latency_s": 0.1,
            "uri": "a.png", "image_id": "A", "sample": 0, "status": "ok"}  # fmt: skip
    writer.add([{**base, "domain": "birds", "label": "Warbler"}, {**base, "domain": "warblers", "label": "Tennessee"}])
    writer.flush()
    copied = copy_identical(aliases, writer, "v1", "m")
    assert [(r["uri"], r["domain"], r["label"]) for r in copied] == [("b.png", "warblers", "Tennessee")]
    again = LabelLedger(uri, storage, "v1", "m")
    assert again.plan([("a.png", "birds", "A"), ("a.png", "warblers", "A")], 1) == [[], []]
    labels = read_labels(uri, storage)
    assert sorted(zip(labels["domain"], labels["label"], strict=True)) == [("birds", "Warbler"), ("warblers", "Tennessee")]


def test_a_stopping_ledger_plans_no_new_requests(tmp_path):
    ledger = LabelLedger(str(tmp_path / "labels"), Storage(), "v1", "m")
    assert ledger.plan([("a.png", "d", "A")], samples=2) == [[0, 1]]
    ledger.stop_asking()  # `ray job stop`: what was planned is still answered, nothing more is asked
    assert ledger.plan([("b.png", "d", "B"), ("c.png", "d", "C")], samples=2) == [[], []]
    assert ledger.counts()["samples_asked"] == 2


def test_chat_client_retries_then_reports_the_uri(bench, tmp_path):
    import asyncio

    from near_ray.config import OpenAIBackendConfig

    img = Storage().read_bytes(next(iter(Storage().list(f"{bench}/images/birds"))).uri)
    row = {"uri": "s3://x/bird.png", "sample": 0, "image": img, "mime": "image/png", "system_prompt": "s",
           "user_prompt": "What bird?", "temperature": 0.7, "seed": 1, "json_schema": ""}  # fmt: skip

    async def ask(base_url: str, **kw) -> dict:
        client = ChatClient(OpenAIBackendConfig(base_url=base_url, backoff_base_s=0.01, **kw))
        try:
            return await client.label(row)
        finally:
            await client.close()

    with AnnotatorServer(bench, profile="strong", seed=0, faults={"rate_500": 1.0}) as ann:
        out = asyncio.run(ask(ann.base_url, max_retries=2))
        assert out["status"] == "mllm_error" and "s3://x/bird.png" in out["error"] and "HTTP 500" in out["error"]
        assert ann.stats()["requests"] == 3
    with AnnotatorServer(bench, profile="strong", seed=0, faults={"rate_429": 0.5, "retry_after_s": 0.05}) as ann:
        out = asyncio.run(ask(ann.base_url, max_retries=8))
        assert out["status"] == "ok" and out["raw_answer"] and out["output_tokens"] > 0


def test_listing_streams_in_chunks_honours_manifests_and_max_images(tmp_path):
    import pyarrow as pa

    from near_ray.data.collections import listing_chunks, listing_size

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(5):
            (tmp_path / d / f"{i}.png").write_bytes(b"x")
        (tmp_path / d / "_hidden.png").write_bytes(b"x")
        (tmp_path / d / "notes.txt").write_text("x")
    manifest = tmp_path / "b.parquet"
    # 1.png twice (once relative, once absolute): one image, asked (and paid for) once
    rows = ["1.png", str(tmp_path / "b" / "3.png"), str(tmp_path / "b" / "1.png"), "3.png"]
    Storage().write_parquet(str(manifest), pa.table({"uri": rows}))
    domains = [{"name": "a", "uri": str(tmp_path / "a")}, {"name": "b", "uri": str(tmp_path / "b"), "manifest": str(manifest)}]
    cfg = _cfg(str(tmp_path / "run"), "http://127.0.0.1:9/v1", domains, "label.listing_chunk=3")
    chunks = list(listing_chunks(cfg, Storage()))
    assert [len(c) for c in chunks] == [3, 3, 1]
    uris = [(r["domain"], Path(r["uri"]).name) for c in chunks for r in c]
    assert sorted(uris[:5]) == [("a", f"{i}.png") for i in range(5)]  # no hidden names, no other extensions
    assert uris[5:] == [("b", "1.png"), ("b", "3.png")]  # the manifest's images, relative paths under the prefix
    assert listing_size(cfg, Storage()) == 4, "the manifest's rows, from its footer; a listed prefix is unknown"
    cfg.data.max_images = 4
    assert sum(len(c) for c in listing_chunks(cfg, Storage())) == 4
    cfg.data.max_images = 3
    assert listing_size(cfg, Storage()) == 3


def test_a_manifest_on_s3_streams_row_group_by_row_group_in_order_with_its_errors_named(bucket, tmp_path):
    """A manifest is read a row group (CSV: a block) at a time from storage, never whole: 25,000 rows in
    3 row groups come back in order, each once; a CSV without a 'uri' column and a missing file say so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from near_ray.data.collections import ManifestError, manifest_batches
    from near_ray.errors import NearRayError

    st = Storage()
    uris = [f"{bucket}/img/{i:06d}.png" for i in range(25_000)]
    local = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": uris, "note": ["x"] * len(uris)}), local, row_group_size=10_000)
    st.write_bytes(f"{bucket}/m.parquet", local.read_bytes())
    batches = list(manifest_batches(f"{bucket}/m.parquet", st))
    assert [len(b) for b in batches] == [10_000, 10_000, 5_000] and [u for b in batches for u in b] == uris
    st.write_bytes(f"{bucket}/m.csv", ("uri,note\n" + "".join(f"{u},x\n" for u in uris)).encode())
    assert [u for b in manifest_batches(f"{bucket}/m.csv", st) for u in b] == uris
    st.write_bytes(f"{bucket}/bad.csv", b"path,note\na.png,x\n")
    with pytest.raises(ManifestError, match=r"bad.csv: not a parquet/CSV table with a 'uri' column"):
        list(manifest_batches(f"{bucket}/bad.csv", st))
    with pytest.raises(NearRayError, match=r"none.parquet"):
        list(manifest_batches(f"{bucket}/none.parquet", st))


def _labeler_actors() -> set[str]:
    """The ids of every labeler actor this cluster ever started (alive or gone), from the GCS."""
    import ray

    return {aid for aid, a in ray._private.state.actors().items() if "Labeler" in a.get("ActorClassName", "")}


def test_a_listing_of_many_chunks_starts_the_labeler_pool_once(ray_cluster, bench, tmp_path, perfect_profile):
    """The listing is read a chunk at a time (label.listing_chunk), but one labeler pipeline serves all of
    it: its actors (a vLLM engine each in production) start once, not once per chunk."""
    truth = _truth(bench)
    with AnnotatorServer(bench, profile=perfect_profile, seed=0) as ann:
        cfg = _cfg(str(tmp_path / "run"), ann.base_url, _domains(bench), "label.listing_chunk=4", "label.pool_size=1")
        before = _labeler_actors()
        summary = run_label(cfg)
        started = _labeler_actors() - before
        assert len(truth) > 2 * 4  # three chunks or more
        assert len(started) == 1, f"{len(started)} labeler actors for one pool of 1"
        assert summary["mllm_calls"] == len(truth) * SAMPLES == ann.stats()["requests"]
        assert set(read_labels(cfg)["uri"]) == set(truth)


def test_a_stop_pays_only_for_the_requests_in_flight(ray_cluster, bench, tmp_path, perfect_profile):
    """`ray job stop` while labeling: Ray Data has built every request of this small listing ahead of
    the labeler, yet the stop asks nothing more than the batches the labeler had already sent; every
    answer paid for is on storage, and a re-run asks exactly the rest."""
    import threading

    from near_ray.stopping import request_stop

    truth = _truth(bench)
    # 1.5 s an answer, 2 at a time: 18 s for the 24 requests without a stop.
    with AnnotatorServer(bench, profile=perfect_profile, seed=0, faults={"latency_s": 1.5}) as ann:
        cfg = _cfg(str(tmp_path / "run"), ann.base_url, _domains(bench), "label.pool_size=1", "label.batch_size=2",
                   "label.batches_per_actor=1", "label.backend.concurrency=2", "label.flush_interval_s=0.5")

        def stop_after_the_first_answers() -> None:
            deadline = time.monotonic() + 120
            while ann.stats()["requests"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            while not request_stop() and time.monotonic() < deadline:  # once the stage can wind down
                time.sleep(0.05)

        stopper = threading.Thread(target=stop_after_the_first_answers, daemon=True)
        stopper.start()
        with pytest.raises(KeyboardInterrupt, match="every answer received is on storage"):
            run_label(cfg)
        stopper.join()
        paid = ann.stats()["requests"]
        on_storage = len(read_labels(cfg))
        assert paid == on_storage, "an answer paid for was not written"
        assert paid <= 3 * SAMPLES, f"{paid} of {len(truth) * SAMPLES} requests paid after a stop in the first batch"
        summary = run_label(cfg)
        assert summary["mllm_calls"] == len(truth) * SAMPLES - paid == ann.stats()["requests"] - paid
        assert len(read_labels(cfg)) == len(truth) * SAMPLES
