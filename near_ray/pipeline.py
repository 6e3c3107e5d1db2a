"""The whole pipeline from one config: label → refine → train → evaluate (with truth) → classify → review
page (→ serve).

What it trains and names depends on what the user has. With a truth table (``data.domains[].truth``)
it is a benchmark run: ``train.method`` and the baselines and ablations ``eval.methods`` names, then
the evaluation. Without one (a user's own images) it does the user's job only: ``train.method``, then
``classify`` names the whole collection (``eval.baselines`` and ``classify.enabled`` override both).
With ``train.select`` it first chooses which of those candidate methods to train, without labels
(``near_ray.train.select``), and the rest of the run uses the chosen one. It ends with a closing summary a person reads (``closing_summary``), and writes the JSON one to
``{workdir}/run_summary.json``.

Each stage reads the previous stage's artifact from storage and skips work already done there, so a
second run of the same config only does what is missing; after vocabulary edits (``refine.edits``)
that is refine's vocabulary and candidates, the training and the names, with no new MLLM call.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from near_ray.config import RunConfig
from near_ray.console import stage
from near_ray.ray_session import ensure_ray
from near_ray.storage import Storage, storage_for
from near_ray.train.methods import TRAINED

log = logging.getLogger(__name__)


def _timed(name: str, fn, *args: Any, wall: dict[str, float] | None = None, **kwargs: Any) -> Any:
    """Run one stage between its console lines; its wall time (s) goes into ``wall[name]``."""
    t0 = time.monotonic()
    with stage(name):
        out = fn(*args, **kwargs)
    if wall is not None:
        wall[name] = round(time.monotonic() - t0, 2)
    return out


def has_truth(cfg: RunConfig) -> bool:
    return any(d.has_truth for d in cfg.data.domains)


def runs_baselines(cfg: RunConfig) -> bool:
    """``eval.baselines``: auto trains and exports them only when there is truth to evaluate them on."""
    return cfg.eval.baselines == "always" or (cfg.eval.baselines == "auto" and has_truth(cfg))


def runs_classify(cfg: RunConfig) -> bool:
    """``classify.enabled``: auto names the collection when there is no truth (then it is the run's deliverable)."""
    enabled = cfg.classify.enabled
    return enabled is True or bool(cfg.classify.domains) or (enabled == "auto" and not has_truth(cfg))


def methods_to_train(cfg: RunConfig) -> list[str]:
    """``train.method`` (majority labels with NeaR's classifier by default) always; the baselines and
    ablations the evaluation asks for when ``runs_baselines``."""
    if not runs_baselines(cfg):
        return [cfg.train.method]
    return [cfg.train.method] + [m for m in cfg.eval.methods if m in TRAINED and m != cfg.train.method]


def _bundle_current(cfg: RunConfig, st: Storage, method: str, refined: str | None) -> bool:
    """A bundle on storage trained on these refine outputs (after vocabulary edits, it is not)."""
    uri = cfg.paths.bundle(method)
    if not st.exists(f"{uri}/config.json") or not st.exists(f"{uri}/metrics.json"):
        return False
    return st.read_json(f"{uri}/metrics.json").get("refine_fingerprint") == refined


def run_pipeline(cfg: RunConfig, serve: bool = False) -> dict[str, Any]:
    from near_ray.label.stage import run_label
    from near_ray.refine.stage import check_edits, run_refine
    from near_ray.train.stage import export_zero_shot, run_train

    check_edits(cfg)  # a bad edits file fails here, before Ray, the MLLM or any training
    ensure_ray()
    st = storage_for(cfg)
    t0 = time.monotonic()
    wall: dict[str, float] = {}  # seconds per stage, in order
    summary: dict[str, Any] = {"workdir": cfg.storage.workdir, "wall_s": wall, "truth": has_truth(cfg)}
    summary["label"] = _timed("label", run_label, cfg, wall=wall)
    summary["refine"] = _timed("refine", run_refine, cfg, wall=wall)
    if cfg.train.select:  # the classifier chosen without labels; then trained on the whole discovery set
        from near_ray.train.select import run_select

        summary["select"] = _timed("select", run_select, cfg, wall=wall)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"method": summary["select"]["chosen"]})})
    summary["train"] = {}
    for method in methods_to_train(cfg):
        if _bundle_current(cfg, st, method, summary["refine"].get("fingerprint")):
            log.info("train %s: bundle already on storage, skipped", method)
            summary["train"][method] = {"skipped": True, "bundle": cfg.paths.bundle(method)}
            continue
        method_cfg = cfg.model_copy(deep=True)
        method_cfg.train.method = method  # type: ignore[assignment]
        summary["train"][method] = _timed(f"train {method}", run_train, method_cfg, wall=wall)
    if "zero_shot" in cfg.eval.methods and runs_baselines(cfg):
        summary["train"]["zero_shot"] = {"bundle": _timed("zero-shot bundle", export_zero_shot, cfg, wall=wall)}
    if has_truth(cfg):
        from near_ray.eval.stage import run_evaluate

        summary["evaluate"] = _timed("evaluate", run_evaluate, cfg, None, wall=wall)
    else:
        log.info("evaluate: no ground truth configured (data.domains[].truth), skipped")
    if runs_classify(cfg):  # last: names the whole collection with the bundle
        from near_ray.classify.stage import run_classify

        summary["classify"] = _timed("classify", run_classify, cfg, wall=wall)
    from near_ray.eval.review import write_review

    # the page a person reads before trusting the names (docs/review.md): seconds, no model loaded
    summary["review"] = _timed("review", write_review, cfg, wall=wall)
    wall["total"] = round(time.monotonic() - t0, 2)
    summary["outputs"] = run_outputs(cfg, summary)
    st.write_json(cfg.paths.run_summary, summary)
    if serve:
        from near_ray.serve.app import run_serve

        run_serve(cfg, write_config=None, block=True)
    return summary


def run_outputs(cfg: RunConfig, summary: dict[str, Any]) -> dict[str, str]:
    """Where a person finds what the run made, in the order they would open it."""
    out = {"review page": summary["review"]} if "review" in summary else {}
    out["bundle"] = cfg.classify.bundle or cfg.paths.bundle(cfg.train.method)
    if "classify" in summary:
        out["predictions table"] = summary["classify"]["predictions"]
    if "evaluate" in summary:
        out["report"] = cfg.paths.report_md
    out["vocabulary"] = cfg.paths.vocabulary
    out["run summary"] = cfg.paths.run_summary
    return out


# ------------------------------------------------------------------------------------------ closing summary
def _names_per_domain(cfg: RunConfig, summary: dict[str, Any], st: Storage) -> dict[str, list[tuple[str, int]]]:
    """Per domain, (name, images) most frequent first: from the predictions table when the collection was
    named, else from the bundle's vocabulary (its training images per name)."""
    from collections import Counter

    if "classify" in summary:
        from near_ray.classify.table import read_predictions

        df = read_predictions(summary["classify"]["predictions"], st, ["domain", "name"])
        return {str(d): Counter(g["name"].dropna().astype(str)).most_common() for d, g in df.groupby("domain")}
    vocab_uri = f"{summary['outputs']['bundle']}/vocabulary.json"
    out: dict[str, list[tuple[str, int]]] = {}
    for v in st.read_json(vocab_uri) if st.exists(vocab_uri) else []:
        out.setdefault(v.get("domain") or "", []).append((v["name"], int(v.get("train_support", v.get("support", 0)))))
    return {d: sorted(names, key=lambda x: (-x[1], x[0])) for d, names in out.items()}


def closing_summary(cfg: RunConfig, summary: dict[str, Any], shown: int = 6) -> str:
    """The block a person reads at the end of ``near-ray run``: what was named, images, MLLM spend, outputs."""
    st = storage_for(cfg)
    total = summary.get("wall_s", {}).get("total", 0.0)
    lines = [f"near_ray run done in {total // 60:.0f} min {total % 60:.0f} s ({cfg.storage.workdir})"]
    names = _names_per_domain(cfg, summary, st)
    named = "named (predictions table)" if "classify" in summary else "names (the bundle's training images)"
    lines.append(f"\n{named}:")
    width = max((len(d) for d in names), default=0)
    for d, counts in sorted(names.items()):
        top = ", ".join(f"{n} {c}" for n, c in counts[:shown]) + (f", … {len(counts) - shown} more"
                                                                   if len(counts) > shown else "")
        lines.append(f"  {d:<{width}}  {len(counts)} names over {sum(c for _, c in counts)} images: {top}")
    from near_ray.eval.collapse import collapse, collapse_message

    vocab_uri = f"{(summary.get('outputs') or {}).get('bundle')}/vocabulary.json"
    vocab = st.read_json(vocab_uri) if "classify" in summary and st.exists(vocab_uri) else []
    warnings = [collapse_message(d, c, summary.get("select")) for d, counts in sorted(names.items())
                if (c := collapse(counts, sum((v.get("domain") or "") == d for v in vocab)))]
    if warnings:
        lines.append("\nwarning: " + "\nwarning: ".join(warnings))
    label, refine = summary.get("label") or {}, summary.get("refine") or {}
    cascade = (summary.get("classify") or {}).get("mllm_spend_usd", 0.0)
    lines.append(f"\nimages labelled by the MLLM: {refine.get('images', '?')} (discovery set); MLLM this run: "
                 f"{label.get('mllm_calls', 0)} calls, ${label.get('estimated_cost_usd', 0.0) + cascade:.4f}"
                 + (" (simulated annotator)" if label.get("simulated") else ""))
    trained = {m: t for m, t in summary.get("train", {}).items() if isinstance(t, dict)}
    done = [m for m, t in trained.items() if not t.get("skipped") and m != "zero_shot"]
    kept = [m for m, t in trained.items() if t.get("skipped")]
    lines.append(f"trainings: {len(done)} ({', '.join(done) or 'none'})" + (f"; kept from storage: {', '.join(kept)}"
                                                                             if kept else ""))
    if select := summary.get("select"):
        scores = ", ".join(f"{m} {s['agreement']:.3f}" for m, s in select.get("candidates", {}).items())
        lines.append(f"classifier chosen without labels: {select['chosen']}" + (
            f" (agreement with the MLLM on {select['held_out']} held-out images: {scores})" if scores
            else f" ({select.get('why', '')})"))
    if edits := refine.get("edits"):
        lines.append(f"vocabulary edits applied: {len(edits.get('applied', []))} from {edits.get('file')}")
    if evaluate := summary.get("evaluate"):
        from near_ray.eval.metrics import View, registered

        evaluated = evaluate.get("methods") or {}
        for k in registered(View.SUMMARY):
            accs = {m: r[k.name] for m, r in evaluated.items() if isinstance(r.get(k.name), float)}
            lines.append(f"evaluated ({k.title}): " + ", ".join(f"{m} {k.text(a)}" for m, a in accs.items()))
    lines.append("\noutputs:")
    outputs = summary.get("outputs") or {}
    key_width = max((len(k) for k in outputs), default=0)
    lines += [f"  {k:<{key_width}}  {v}" for k, v in outputs.items()]
    return "\n".join(lines)
