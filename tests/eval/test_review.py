"""The review page on a constructed run: the synthetic benchmark's images, a labels table with planted
answers, refine's outputs made by its own functions (vocabulary, candidate sets) over a kNN graph that
follows the true species, and a bundle whose metrics prune one name. No Ray, no training.

Planted in the birds domain: a plural spelling merged into its name, a one-off name refine prunes, a
name training prunes, a refusal, and one image whose three samples all name another species while its
neighbours are its own: the suspect.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from near_ray.classify.table import predictions_table, predictions_uri
from near_ray.cli import main
from near_ray.config import RunConfig
from near_ray.eval.review import ReviewError, review_uri, write_review
from near_ray.label.backends import model_name
from near_ray.label.table import labels_table, labels_uri, read_labels
from near_ray.refine.candidates import candidate_sets
from near_ray.refine.stage import own_labels
from near_ray.refine.vocabulary import build_vocabulary
from near_ray.sim.synth import generate
from near_ray.storage import Storage, join

ONE_OFF = "Purple Unicorn Finch"  # one image says it once: refine.min_support 2 prunes it
TRAIN_PRUNED = "Sooty Grosbeak"  # two images say it: refine keeps it, the bundle's training pruned it
REFUSAL = "I cannot tell which bird this is, sorry."


# ------------------------------------------------------------------------------------------ the run
class Run:
    def __init__(self, root: str, workdir: str, st: Storage, truth: bool, classified: bool = False) -> None:
        self.st = st
        generate(out=root, domains=["birds", "flowers"], species=4, images_per_species=5, image_size=48, seed=0,
                 test_fraction=0.2, storage=st)  # fmt: skip
        table = st.read_parquet(join(root, "truth.parquet")).to_pandas()
        self.train = table[table["split"] == "train"].sort_values("path").reset_index(drop=True)
        self.cfg = RunConfig.model_validate({
            "storage": {"workdir": workdir},
            "data": {"domains": [{"name": d, "uri": join(root, f"images/{d}/train"), "meta_class": d.rstrip("s"),
                                  "truth": join(root, "truth.parquet") if truth else None}
                                 for d in ("birds", "flowers")]},
            "label": {"samples": 3},
            "refine": {"merge_encoder": "none", "min_support": 2},
            "train": {"min_label_support": 1},
        })  # fmt: skip
        self.root = root
        self.species = {d: sorted(rows["species"].unique()) for d, rows in self.train.groupby("domain")}
        self.uri = {p: join(root, p) for p in self.train["path"]}
        self._labels()
        self._refine()
        self._bundle()
        if classified:
            self._predictions()

    def answers(self, path: str, domain: str, species: str) -> list[tuple[str, str | None]]:
        """(raw answer, parsed label) per sample."""
        s0, s1, s2, s3 = self.species[domain]
        rows = self.train[(self.train["domain"] == domain) & (self.train["species"] == species)]["path"].tolist()
        k = rows.index(path)
        plain = [(f"This appears to be a {species}.", species)] * 3
        if domain != "birds":
            return plain
        if species == s0 and k < 3:  # a plural spelling: merged into s0 by refine
            return [plain[0], (f"{species}s", f"{species}s"), plain[2]]
        if species == s1 and k == 0:
            return [plain[0], (REFUSAL, None), (ONE_OFF, ONE_OFF)]
        if species == s2 and k < 2:
            return [(TRAIN_PRUNED, TRAIN_PRUNED), plain[1], plain[2]]
        if species == s3 and k == 0:  # the suspect: every sample names s0, its neighbours are s3
            self.suspect = self.uri[path]
            return [(s0, s0)] * 3
        return plain

    def _labels(self) -> None:
        lc = self.cfg.label
        writer = labels_table(labels_uri(self.cfg), self.st, part_rows=10_000, flush_interval_s=1e9)
        rows = []
        for r in self.train.itertuples():
            for sample, (raw, label) in enumerate(self.answers(r.path, r.domain, r.species)):
                rows.append({"image_id": hashlib.sha256(self.uri[r.path].encode()).hexdigest()[:20],
                             "uri": self.uri[r.path], "domain": r.domain, "sample": sample, "seed": sample,
                             "raw_answer": raw, "label": label, "status": "ok" if label else "unparsable",
                             "error": None, "model": model_name(lc), "prompt_version": lc.prompt_version,
                             "input_tokens": 100, "output_tokens": 10, "latency_s": 0.2})  # fmt: skip
        writer.add(rows)
        writer.flush()
        self.st.write_json(self.cfg.artifact("labels/_summary.json"), {"simulated": True})

    def _refine(self) -> None:
        labels = read_labels(self.cfg, self.st)
        vocab = build_vocabulary(labels, None, 0.92, min_support=2, lexical_guard=True, min_shared=0.5)
        self.vocabulary = vocab.to_json()
        self.st.write_json(self.cfg.artifact("refine/vocabulary.json"), self.vocabulary)
        self.st.write_json(self.cfg.artifact("refine/merges.json"), vocab.merges)
        own = own_labels(labels, vocab)
        cand: dict[str, list] = defaultdict(list)
        nbrs: dict[str, list] = defaultdict(list)
        for domain, rows in self.train.groupby("domain"):
            ids = [hashlib.sha256(self.uri[p].encode()).hexdigest()[:20] for p in rows["path"]]
            truth = rows["species"].tolist()
            # a CLIP that sees species perfectly: each image's neighbours are the others of its species
            graph = np.full((len(ids), 3), -1)
            for i, t in enumerate(truth):
                same = [j for j, u in enumerate(truth) if u == t and j != i][:3]
                graph[i, : len(same)] = same
            sims = np.where(graph >= 0, 0.9, -np.inf).astype(np.float32)
            sets = candidate_sets([own.get(i, []) for i in ids], graph, sims, 0.5, 1.0)
            for i, (image_id, path, cs) in enumerate(zip(ids, rows["path"], sets, strict=True)):
                cand["image_id"].append(image_id)
                cand["uri"].append(self.uri[path])
                cand["domain"].append(domain)
                cand["own_labels"].append(own.get(image_id, []))
                cand["majority_label"].append(cs.candidates[0])
                cand["candidates"].append(cs.candidates)
                cand["confidences"].append(cs.confidences)
                nbrs["image_id"].append(image_id)
                nbrs["domain"].append(domain)
                nbrs["neighbors"].append([ids[j] for j in graph[i] if j >= 0])
                nbrs["similarities"].append([0.9 for j in graph[i] if j >= 0])
        self.st.write_parquet(self.cfg.artifact("refine/candidates.parquet"), pa.table(cand))
        self.st.write_parquet(self.cfg.artifact("refine/neighbors.parquet"), pa.table(nbrs))
        self.candidates = cand

    def _bundle(self) -> None:
        uri = self.cfg.artifact(f"bundles/{self.cfg.train.method}")  # the served bundle
        kept = [dict(v, train_support=v["support"]) for v in self.vocabulary if v["name"] != TRAIN_PRUNED]
        self.st.write_json(join(uri, "config.json"), {"format_version": 1})
        self.st.write_json(join(uri, "vocabulary.json"), kept)
        self.st.write_json(join(uri, "metrics.json"),
                           {"pruned_names": [{"name": TRAIN_PRUNED, "domain": "birds", "train_support": 0}]})
        self.bundle_names = {v["name"] for v in kept}

    def _predictions(self) -> None:
        """classify over the discovery images: the CLIP follows the candidates; one image went to the MLLM."""
        writer = predictions_table(predictions_uri(self.cfg), self.st, part_rows=10_000, flush_interval_s=1e9)
        rows = []
        for uri, domain, names, confs in zip(self.candidates["uri"], self.candidates["domain"],
                                             self.candidates["candidates"], self.candidates["confidences"],
                                             strict=True):  # fmt: skip
            top = [(n, c) for n, c in zip(names, confs, strict=True) if n in self.bundle_names]
            routed = uri == self.routed
            rows.append({"image_id": uri[-20:], "uri": uri, "domain": domain, "name": top[0][0],
                         "score": 1.0 if routed else top[0][1], "confidence": top[0][1],
                         "top_k_names": [n for n, _ in top], "top_k_scores": [c for _, c in top],
                         "abstained": False, "new_name": False, "source": "mllm" if routed else "clip",
                         "model_version": "v1", "status": "ok", "error": None,
                         "mllm_cost_usd": 0.0125 if routed else 0.0})  # fmt: skip
        writer.add(rows)
        writer.flush()

    @property
    def routed(self) -> str:
        return self.uri[self.train[self.train["domain"] == "flowers"]["path"].iloc[0]]


@pytest.fixture(scope="module")
def run_without_truth(tmp_path_factory):
    base = tmp_path_factory.mktemp("review")
    run = Run(str(base / "bench"), str(base / "work"), Storage(), truth=False)
    return run, write_review(run.cfg)


# ------------------------------------------------------------------------------------------ reading the page
class Page(HTMLParser):
    """Every element as (tag, attributes, text inside it), nested text included."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": "", "children": []}
        self.elements.append(el)
        if self._open:
            self._open[-1]["children"].append(el)
        if tag not in ("img", "meta", "br", "link"):
            self._open.append(el)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self._open:
            el["text"] += data

    def find(self, tag: str | None = None, cls: str | None = None, **attrs) -> list[dict]:
        return [e for e in self.elements if (tag is None or e["tag"] == tag)
                and (cls is None or cls in e["attrs"].get("class", "").split())
                and all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())]  # fmt: skip


def images_in(el: dict) -> list[dict]:
    out = []
    for c in el["children"]:
        out += ([c] if c["tag"] == "img" else []) + images_in(c)
    return out


def domain_section(page: Page, domain: str) -> Page:
    sections = page.find("section", "domain", data_domain=domain)
    assert len(sections) == 1
    return sections[0]


# ------------------------------------------------------------------------------------------ content
def test_names_merges_prunings_and_the_suspect_appear_where_they_belong(run_without_truth):
    run, uri = run_without_truth
    assert uri == review_uri(run.cfg) and uri.endswith("review/index.html")
    text = Path(uri).read_text()
    page = Page(text)
    s0, s1, s2, s3 = run.species["birds"]

    # every kept name has a row with its count and thumbnails; the pruned ones have none
    names = {e["attrs"]["data-name"]: e for e in page.find("tr", "name")}
    assert {s0, s1, s2, s3} <= set(names)
    assert TRAIN_PRUNED not in names and ONE_OFF not in names
    for name in (s1, s2):
        count = next(c for c in names[name]["children"] if "count" in c["attrs"].get("class", ""))
        assert count["text"] == "4"  # 4 discovery images each, all named so
    thumbs = images_in(names[s1])
    assert len(thumbs) == 4 and all(t["attrs"]["src"].startswith("data:image/jpeg;base64,") for t in thumbs)

    # the plural answer is merged into its name: in the name's answers and in the merges table
    assert f"{s0}s" in names[s0]["text"]
    merges = page.find("tr", "merge", data_name=f"{s0}s")
    assert len(merges) == 1 and merges[0]["attrs"]["data-into"] == s0 and "spelling" in merges[0]["text"]
    assert f"{s0} 3" in merges[0]["text"]  # its 3 images went to s0

    # both prunings, with their reasons and where their images went
    one_off = page.find("tr", "pruned", data_name=ONE_OFF)
    assert len(one_off) == 1 and "refine.min_support = 2" in one_off[0]["text"] and f"{s1} 1" in one_off[0]["text"]
    trained = page.find("tr", "pruned", data_name=TRAIN_PRUNED)
    assert len(trained) == 1 and "train.min_label_support" in trained[0]["text"] and f"{s2} 2" in trained[0]["text"]
    birds = domain_section(page, "birds")
    check = [e for e in page.find("div", "check") if e["attrs"]["id"] == birds["attrs"]["id"] + "-check"][0]
    assert TRAIN_PRUNED in check["text"] and ONE_OFF in check["text"]

    # the planted image is the first suspect, named s0 by its answers, the evidence preferring s3
    suspects = page.find("tr", "suspect")
    assert suspects and suspects[0]["attrs"]["data-uri"] == run.suspect
    assert suspects[0]["attrs"]["data-name"] == s0 and s3 in suspects[0]["text"]
    assert all(s["attrs"]["data-uri"] != run.suspect for s in suspects[1:])
    assert images_in(check)[0]["attrs"]["title"].startswith(run.suspect)  # first in the "check these" box

    # the label stage's facts: 16 birds images × 3 samples, one refusal, money at the default prices
    facts = domain_section(page, "birds")["text"]
    assert re.search(r"answers \(images × samples\)\s*48", facts) and re.search(r"of which refusals\s*1", facts)
    assert "$" in facts and "simulated annotator" in text

    # no truth: no accuracy anywhere; no classify: no cascade table; nothing from outside the page
    assert not page.find(cls="accuracy") and not page.find(cls="truth-accuracy") and not page.find(cls="cascade-facts")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert not page.find("script") and not page.find("link")


def test_with_truth_adds_accuracy_per_name_and_the_cascade(tmp_path):
    run = Run(str(tmp_path / "bench"), str(tmp_path / "work"), Storage(), truth=True, classified=True)
    page = Page(Path(write_review(run.cfg, out=str(tmp_path / "page.html"))).read_text())
    s0, s1, s2, s3 = run.species["birds"]
    names = {e["attrs"]["data-name"]: e for e in page.find("tr", "name")}
    accuracy = {n: next(c for c in e["children"] if "accuracy" in c["attrs"].get("class", ""))["text"]
                for n, e in names.items()}  # fmt: skip
    assert accuracy[s1].startswith("100%") and "of 4" in accuracy[s1] and s1 in accuracy[s1]
    assert accuracy[s0].startswith("80%") and "of 5" in accuracy[s0]  # the suspect (an s3) is named s0
    assert "of 3" in accuracy[s3]
    suspect = page.find("tr", "suspect", data_uri=run.suspect)
    assert len(suspect) == 1 and s3 in suspect[0]["text"]  # the true class column
    assert "accuracy" in domain_section(page, "birds")["text"]
    cascade = page.find("table", "cascade-facts")
    assert len(cascade) == 2 and "$0.0125" in cascade[1]["text"] and "mllm 1" in cascade[1]["text"]


def test_on_s3(bucket):
    st = Storage()
    run = Run(f"{bucket}/bench", f"{bucket}/work", st, truth=False)
    uri = write_review(run.cfg)
    assert uri == f"{bucket}/work/review/index.html"
    page = Page(st.read_text(uri))
    assert page.find("tr", "suspect", data_uri=run.suspect)
    assert len([i for i in page.find("img") if i["attrs"]["src"].startswith("data:image/jpeg")]) >= 8


def test_cli_writes_the_page_and_refuses_a_run_without_refine(run_without_truth, tmp_path, capsys):
    run, _ = run_without_truth
    config = tmp_path / "run.yaml"
    config.write_text(f"storage: {{workdir: {run.cfg.storage.workdir}}}\nlabel: {{samples: 3}}\n"
                      f"data: {{domains: [{{name: birds, uri: {run.root}/images/birds/train}}]}}\n")  # fmt: skip
    out = tmp_path / "out" / "review.html"
    assert main(["review", "-c", str(config), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = Page(out.read_text())
    assert [e["attrs"]["data-domain"] for e in page.find("section", "domain")] == ["birds", "flowers"]

    empty = tmp_path / "empty.yaml"
    empty.write_text(f"storage: {{workdir: {tmp_path / 'nothing'}}}\n")
    assert main(["review", "-c", str(empty)]) == 2
    assert "run `near-ray label` first" in capsys.readouterr().err
    shutil.copytree(Path(run.cfg.storage.workdir) / "labels", tmp_path / "nothing" / "labels")
    with pytest.raises(ReviewError, match=r"refine/vocabulary.json.*run `near-ray refine` first"):
        write_review(RunConfig.model_validate({"storage": {"workdir": str(tmp_path / "nothing")},
                                               "label": {"samples": 3}}))  # fmt: skip


# ------------------------------------------------------------------------------------------ in a browser
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium on the PATH: run scripts/setup_browser.sh")
def test_page_in_headless_chromium(run_without_truth, tmp_path):
    from PIL import Image

    _, uri = run_without_truth
    url = Path(uri).resolve().as_uri()
    shot = tmp_path / "review.png"
    common = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"]  # fmt: skip
    env = {**os.environ, "HOME": str(tmp_path)}
    shown = subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120, env=env)
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, env=env)
    for result in (shown, dom):
        assert result.returncode == 0, result.stderr[-2000:]
        # the page has no script: any console message is an error (a bad resource, a parse problem)
        console = [ln for ln in result.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
        assert console == [], console
    rendered = Page(dom.stdout)
    data_images = [i for i in rendered.find("img") if i["attrs"].get("src", "").startswith("data:image/jpeg;base64,")]
    assert len(data_images) >= 16
    assert rendered.find("tr", "suspect") and rendered.find("div", "check")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1000, 1400) and pixels.std() > 20  # text, tables and thumbnails, not a blank page
    keep = os.environ.get("NEAR_RAY_REVIEW_SCREENSHOT")  # where to copy the screenshot for a person to look at
    if keep:
        shutil.copy(shot, keep)


def _named(domain_names: list[str], counts: dict[str, int]):
    from collections import Counter

    from near_ray.eval.review.gather import DomainData, ImageView

    images = {}
    for name, n in counts.items():
        for i in range(n):
            uri = f"/c/{name}-{i}.png"
            images[uri] = ImageView(uri, said=[name, name], name=name, named_by="classify", clip={name: 0.9})
    return DomainData("parts", "part", domain_names, [{"name": n, "domain": "parts", "support": 1} for n in domain_names],
                      {}, [], "/b", images, {n: Counter() for n in domain_names}, {}, {}, None, False)


def test_a_collapsed_classifier_is_called_out_with_its_likely_cause_and_the_fix():
    """One name for most of the collection, no truth needed: the review's "Check these" box says so (the
    run's closing summary prints the same message); a spread of names does not trip it."""
    import html

    from near_ray.eval.collapse import collapse, collapse_message
    from near_ray.eval.review.evidence import review_domain
    from near_ray.eval.review.page import _check_box

    names = ["Bent Bolt", "Cracked Washer", "Rusty Nut", "Worn Gear"]
    r = review_domain(_named(names, {"Rusty Nut": 34, "Bent Bolt": 4, "Worn Gear": 2}), {"refine": 1, "train": 1}, 5)
    assert r.collapse == {"name": "Rusty Nut", "share": 0.85, "images": 40, "names_used": 3, "vocabulary": 4}
    box = html.unescape(_check_box(r, "d0", {}))
    assert "One name for most images." in box and "'Rusty Nut' names 85% of 40 images (3 of 4 names in use)" in box
    assert "model.arch / model.pretrained" in box
    spread = review_domain(_named(names, {"Rusty Nut": 14, "Bent Bolt": 12, "Worn Gear": 14}), {"refine": 1, "train": 1}, 5)
    assert spread.collapse is None and "One name for most images" not in _check_box(spread, "d0", {})
    assert collapse([("A", 8), ("B", 1)], 5) is None  # too few images to tell
    assert collapse([("A", 90), ("B", 10)], 2) is None  # a two-name vocabulary is left alone
    held = {"chosen": "near", "held_out": 20, "candidates": {"near": {"agreement": 0.31}}}
    assert "agreed with the MLLM on 31% of 20 held-out discovery images" in collapse_message(
        "parts", collapse([("A", 90), ("B", 10)], 5), held)
