"""The CLIP -> MLLM cascade: the least confident images of the predictions table go to the MLLM.

Which images: ``classify.route_below`` (calibrated confidence below a threshold) or
``classify.route_fraction`` (the least confident fraction of each domain), least confident first.
They go through the real label stage (its own labels table under ``{workdir}/classify/mllm``, a
manifest per domain), whose ledger asks only what it has never asked: nothing is paid twice, a
killed cascade resumes. The caps count the whole table (this bundle version): ``max_mllm_images``
routed images and ``mllm_budget_usd`` spent. Spend is bounded in rounds: each round asks as many
images as the budget left pays for at the highest per-image cost seen so far (from earlier answers,
else from the discovery labels' summary; with neither, one image a round until an answer says the
price, and 1, 2, 4, … images a round once answers came back free). What the caps leave keeps the
CLIP's answer and is counted in the summary.

The MLLM's answer per image is the majority over its samples after mapping each sample onto the
bundle's vocabulary with the vocabulary's synonym lookup (``Vocabulary.canonical``); a name outside
it is kept as the MLLM said it and flagged ``new_name``. Rows are updated by rewriting their parts.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from near_ray.classify.table import as_table, predictions_table
from near_ray.config import DomainConfig, RunConfig
from near_ray.names import majority_label
from near_ray.refine.vocabulary import Vocabulary
from near_ray.storage import Storage
from near_ray.uri import is_s3

if TYPE_CHECKING:
    import pandas as pd

    from near_ray.classify.tower import Target
    from near_ray.parts import PartTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    confidence: float
    domain: str
    uri: str
    part: str  # the part file holding its row
    part_id: str
    routed: bool  # routed before, no name: asked again only when a request failed (the ledger retries those)
    cost: float  # what its MLLM requests cost so far


@dataclass(frozen=True)
class Answer:
    name: str | None
    share: float  # samples naming it / samples with a name
    new: bool
    cost_usd: float
    statuses: dict[str, int]


def routing_enabled(cfg: RunConfig) -> bool:
    return cfg.classify.route_below is not None or cfg.classify.route_fraction is not None


# ------------------------------------------------------------------------------------------ answers
def vocabulary_mapper(vocabulary: list[dict[str, Any]], inner: str | None) -> tuple[Vocabulary, list[str], dict]:
    vocab = Vocabulary.from_json([dict(v, domain=v.get("domain") or "", synonyms=v.get("synonyms") or [],
                                       support=v.get("support") or 0) for v in vocabulary])  # fmt: skip
    domains = [inner] if inner is not None else sorted({e.domain for e in vocab.entries})
    support = {e.name: e.support for e in vocab.entries if e.domain in domains}
    return vocab, domains, support


def mllm_answers(labels: pd.DataFrame, vocabulary: list[dict[str, Any]], inner: str | None,
                 prices: Any, current: tuple[str, str] | None = None) -> dict[str, Answer]:  # fmt: skip
    """Per URI of ``labels`` (every label-table row ever written for it): the vocabulary name the majority
    of its samples give, and the cost of every request made for it. With ``current`` (prompt version,
    model) only that MLLM's answers vote: after a change of model the old one's answers are history."""
    from near_ray.label.table import latest_rows

    vocab, domains, support = vocabulary_mapper(vocabulary, inner)
    out: dict[str, Answer] = {}
    if labels.empty:
        return out
    asked = (labels["input_tokens"].fillna(0) > 0) | (labels["output_tokens"].fillna(0) > 0) | (
        labels["latency_s"].fillna(0) > 0)
    cost = labels.assign(asked=asked).groupby("uri").agg(i=("input_tokens", "sum"), o=("output_tokens", "sum"),
                                                         n=("asked", "sum"))  # fmt: skip
    final = latest_rows(labels)
    if current is not None:
        final = final[(final["prompt_version"] == current[0]) & (final["model"] == current[1])]
    for uri, rows in final.groupby("uri"):
        names = []
        for label in rows.loc[(rows["status"] == "ok") & rows["label"].notna(), "label"]:
            mapped = next((n for d in domains if (n := vocab.canonical(d, label)) is not None), None)
            names.append(mapped or str(label))
        winner = majority_label(names, support)
        c = cost.loc[uri]
        out[str(uri)] = Answer(
            name=winner,
            share=names.count(winner) / len(names) if winner else 0.0,
            new=winner is not None and winner not in support,
            cost_usd=float(prices.mllm_usd(float(c["i"]), float(c["o"]), float(c["n"]))),
            statuses={str(k): int(v) for k, v in rows["status"].value_counts().items()},
        )
    return out


# ------------------------------------------------------------------------------------------ selection
def candidates(cfg: RunConfig, targets: dict[str, Target], pred_uri: str, st: Storage
               ) -> tuple[list[Candidate], dict[str, Any]]:  # fmt: skip
    """The images the routing rule picks, least confident first, and the table's cascade state so far."""
    cc = cfg.classify
    cols = ["uri", "domain", "confidence", "status", "source", "model_version", "mllm_cost_usd"]
    per_domain: dict[str, list[Candidate]] = defaultdict(list)
    state = {"routed": 0, "spent_usd": 0.0, "max_image_cost_usd": 0.0}
    answered: set[tuple[str, str]] = set()  # the MLLM named them: never asked again
    for domain, pid, f, table in predictions_table(pred_uri, st).iter_parts(cols, set(targets)):
        for r in table.to_pylist():
            if r["model_version"] != targets[domain].model_version or r["status"] == "bad_image":
                continue
            if r["source"] == "mllm":
                answered.add((domain, r["uri"]))
            cost = float(r["mllm_cost_usd"] or 0.0)
            state["routed"] += r["status"] == "routed"
            state["spent_usd"] += cost
            state["max_image_cost_usd"] = max(state["max_image_cost_usd"], cost)
            if r["confidence"] is None or (cc.route_below is not None and r["confidence"] >= cc.route_below):
                continue  # kept only what can be picked: a threshold needs no sort of the whole table
            per_domain[domain].append(Candidate(float(r["confidence"]), domain, r["uri"], f, pid,
                                                r["status"] == "routed", cost))  # fmt: skip
    picked: list[Candidate] = []
    for rows in per_domain.values():
        rows.sort(key=lambda c: (c.confidence, c.uri))
        picked.extend(rows if cc.route_below is not None else rows[: math.floor(cc.route_fraction * len(rows) + 0.5)])
    retry = _failed_requests(cfg, st) if any(c.routed for c in picked) else set()
    todo = sorted((c for c in picked if (c.domain, c.uri) not in answered and (not c.routed or c.uri in retry)),
                  key=lambda c: (c.confidence, c.domain, c.uri))  # fmt: skip
    state["picked"] = len(picked)
    state["already_answered"] = len(picked) - len(todo)
    return todo, state


def _failed_requests(cfg: RunConfig, st: Storage) -> set[str]:
    """URIs the cascade's label table holds an ``mllm_error`` for (the label stage asks those again)."""
    from near_ray.label.table import latest_rows, read_labels_table

    table = read_labels_table(cfg.paths.cascade_labels, st)
    if table is None:
        return set()
    final = latest_rows(table.select(["uri", "sample", "prompt_version", "model", "status", "domain"]).to_pandas())
    return set(final.loc[final["status"] == "mllm_error", "uri"])


# ------------------------------------------------------------------------------------------ the cascade
def run_cascade(cfg: RunConfig, targets: dict[str, Target], vocabularies: dict[str, list[dict[str, Any]]],
                domains: dict[str, DomainConfig], pred_uri: str, writer: PartTable, st: Storage
                ) -> dict[str, Any]:  # fmt: skip
    """Route what the rule and the caps allow; returns the cascade's part of the run summary."""
    cc = cfg.classify
    todo, state = candidates(cfg, targets, pred_uri, st)
    over_image_cap = 0
    if cc.max_mllm_images is not None:
        allowed, kept = max(0, cc.max_mllm_images - state["routed"]), []
        for c in todo:
            if c.routed or allowed > 0:
                allowed -= not c.routed
                kept.append(c)
            else:
                over_image_cap += 1
        todo = kept
    estimate = state["max_image_cost_usd"] or _discovery_cost_per_image(cfg, st)
    spent, calls, run_spend, rounds, routed_now, named, new_names = state["spent_usd"], 0, 0.0, 0, 0, 0, 0
    free = 0  # rounds whose answers came back and cost nothing (a self-hosted MLLM, no usage reported)
    files: dict[tuple[str, str], str] = {}
    while todo:
        if cc.mllm_budget_usd is None:
            n = len(todo)
        else:  # price unknown: one image a round (failed requests say nothing of it); free answers: 1, 2, 4, …
            left = cc.mllm_budget_usd - spent
            n = 0 if left <= 0 else (int(left / estimate + 1e-9) if estimate else 2**free)  # 1e-9: float rounding
        if n <= 0:
            break
        batch, todo = todo[:n], todo[n:]
        summary, answers = ask_mllm(cfg, batch, domains, targets, vocabularies, rounds, st)
        rounds += 1
        calls += int(summary.get("mllm_calls", 0))
        run_spend += float(summary.get("estimated_cost_usd", 0.0))
        got = [(c, answers[(c.domain, c.uri)]) for c in batch if (c.domain, c.uri) in answers]
        spent += sum(a.cost_usd - c.cost for c, a in got)
        estimate = max([estimate or 0.0, *(a.cost_usd for _, a in got)]) or estimate
        free += not estimate and any(a.statuses.get("ok", 0) + a.statuses.get("unparsable", 0) for _, a in got)
        routed_now += sum(not c.routed for c in batch)
        named += sum(1 for _, a in got if a.name)
        new_names += sum(1 for _, a in got if a.new)
        apply_answers(batch, answers, writer, st, files)
    return {
        "rule": {"route_below": cc.route_below} if cc.route_below is not None else {"route_fraction": cc.route_fraction},
        "picked": state["picked"],
        "already_answered": state["already_answered"],
        "routed_this_run": routed_now,
        "answered_by_mllm_this_run": named,
        "new_names_this_run": new_names,
        "not_routed_over_budget": len(todo) + over_image_cap,
        "mllm_calls": calls,
        "mllm_spend_usd": round(run_spend, 6),
        "table_spend_usd": round(spent, 6),
        "rounds": rounds,
        "budget": {"mllm_budget_usd": cc.mllm_budget_usd, "max_mllm_images": cc.max_mllm_images},
        "labels": cfg.paths.cascade_labels,
    }


def _discovery_cost_per_image(cfg: RunConfig, st: Storage) -> float | None:
    """What one image cost the discovery labeling (same prompt and model): the first round's estimate."""
    uri = cfg.paths.label_summary
    s = st.read_json(uri) if st.exists(uri) else {}
    images, usd = s.get("images_labeled") or 0, s.get("estimated_cost_usd") or 0.0
    return 1.5 * usd / images if images and usd else None  # a margin: answers differ in length


def ask_mllm(cfg: RunConfig, batch: list[Candidate], domains: dict[str, DomainConfig], targets: dict[str, Target],
             vocabularies: dict[str, list[dict[str, Any]]], round_no: int, st: Storage
             ) -> tuple[dict[str, Any], dict[tuple[str, str], Answer]]:  # fmt: skip
    """One round: the batch's images through the label stage (a manifest per domain), and their answers."""
    import pyarrow.compute as pc

    from near_ray.label.backends import model_name
    from near_ray.label.stage import run_label
    from near_ray.label.table import read_labels_table

    label_cfg = cfg.model_copy(deep=True)
    label_cfg.storage.workdir = cfg.paths.cascade
    label_cfg.data.max_images = None
    by_domain: dict[str, list[str]] = defaultdict(list)
    for c in batch:
        by_domain[c.domain].append(c.uri)
    label_cfg.data.domains = []
    for d, uris in sorted(by_domain.items()):
        manifest = label_cfg.paths.manifest(f"{d}-{round_no:04d}")
        st.write_parquet(manifest, pa.table({"uri": [_manifest_entry(u, domains[d].uri) for u in uris]}))
        label_cfg.data.domains.append(DomainConfig(name=d, uri=domains[d].uri, meta_class=domains[d].meta_class,
                                                   manifest=manifest))  # fmt: skip
    log.info("cascade round %d: %d image(s) to the MLLM", round_no + 1, len(batch))
    summary = run_label(label_cfg)
    table = read_labels_table(label_cfg.paths.labels, st)
    answers: dict[tuple[str, str], Answer] = {}
    for d, uris in by_domain.items():
        mask = pc.and_(pc.equal(table["domain"], d), pc.is_in(table["uri"], value_set=pa.array(uris, pa.string())))
        vocabulary = vocabularies[targets[d].bundle]
        found = mllm_answers(table.filter(mask).to_pandas(), vocabulary, targets[d].inner, cfg.label.prices,
                             current=(cfg.label.prompt_version, model_name(cfg.label)))
        answers.update({(d, u): a for u, a in found.items()})
    return summary, answers


def _manifest_entry(uri: str, folder: str) -> str:
    """How a manifest names ``uri`` so that the label stage reads the same URI back: a local path that is
    not absolute was listed under the domain's folder, and a manifest's relative paths are joined onto it."""
    if is_s3(uri) or os.path.isabs(uri):
        return uri
    prefix = str(Path(folder)) + os.sep
    return uri[len(prefix):] if uri.startswith(prefix) else os.path.abspath(uri)


def apply_answers(batch: list[Candidate], answers: dict[tuple[str, str], Answer], writer: PartTable,
                  st: Storage, files: dict[tuple[str, str], str]) -> None:  # fmt: skip
    """Rewrite the parts holding the batch's rows with the MLLM's answers (same part id, newer file);
    ``files`` maps (domain, part id) to the part's current file and is kept up to date."""
    by_part: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for c in batch:
        by_part[(c.domain, c.part_id)].append(c)
    for (domain, pid), cands in by_part.items():
        part = files.setdefault((domain, pid), cands[0].part)
        uris = {c.uri for c in cands}
        rows = writer.read_part(part).to_pylist()
        for r in rows:
            if r["uri"] in uris and (domain, r["uri"]) in answers:
                r.update(_routed(r, answers[(domain, r["uri"])]))
        files[(domain, pid)] = writer.write(domain, as_table(rows), part_id=pid)
        st.delete(part)


def _routed(row: dict[str, Any], a: Answer) -> dict[str, Any]:
    if a.name is None:
        states = ", ".join(f"{k} {v}" for k, v in sorted(a.statuses.items()))
        return {"status": "routed", "mllm_cost_usd": a.cost_usd,
                "error": f"{row['uri']}: the MLLM gave no name ({states}); the CLIP's answer is kept"}  # fmt: skip
    return {"name": a.name, "score": round(a.share, 6), "source": "mllm", "status": "routed", "new_name": a.new,
            "abstained": False, "error": None, "mllm_cost_usd": a.cost_usd}  # fmt: skip

