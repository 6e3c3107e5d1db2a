"""The evaluation report: ``report.json`` (the numbers) and ``report.md`` (the same numbers as tables)."""

from __future__ import annotations

import math
from typing import Any

from near_ray.eval.cascade import render_cascade
from near_ray.eval.metrics import View, registered
from near_ray.storage import Storage, join
from near_ray.train.methods import EVALUATED, TITLES


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * float(value):.1f}"


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(float(value), fmt)


def ordered_methods(methods: dict[str, Any]) -> list[str]:
    known = [m for m in EVALUATED if m in methods]
    return known + sorted(m for m in methods if m not in EVALUATED)


def render_markdown(report: dict[str, Any]) -> str:
    methods, served = report["methods"], report.get("served") or "–"
    shown, brief = registered(View.TABLE), registered(View.BRIEF)
    lines = [f"# Evaluation: {report['dataset']}", ""]
    if report.get("simulated_annotator"):
        lines += [
            "> The MLLM labels come from the **simulated annotator**: numbers measure the pipeline, not a real MLLM.",
            "",
        ]
    lines += [
        f"Test images: {report['test_images']} in {len(report['domains'])} domain(s). "
        f"sACC encoder: `{report['sacc_model']}`. Accuracies in percent; cost in USD per 1,000 images.",
        "",
        "| method | " + "".join(f"{s.title} | " for s in shown) + "cost / 1k images | latency (ms / image) |",
        "|---|" + "---:|" * (len(shown) + 2),
    ]
    for m in ordered_methods(methods):
        r = methods[m]
        lines.append(
            f"| {TITLES.get(m, m)}{' (served)' if m == served else ''} | "
            + "".join(f"{s.text(r.get(s.name), percent=True)} | " for s in shown)
            + f"{_num(r.get('cost_per_1k'), '.4f')} | {_num(r.get('latency_ms'), '.1f')} |"
        )
    if sel := report.get("selection"):
        scores = ", ".join(f"`{m}` {_pct(c['agreement'])}%" for m, c in sel.get("candidates", {}).items())
        lines += ["", f"Chosen without labels (`train.select`): **`{sel['chosen']}`** ({TITLES.get(sel['chosen'], '')})"
                  + (f", by agreement with the MLLM on {sel['held_out']} held-out discovery images: {scores}."
                     if scores else ".")]
    lines += _spread_lines(report, methods)
    if len(report["domains"]) > 1:
        lines += [
            "",
            f"## Per domain ({' / '.join(s.title for s in brief)})",
            "",
            "| method | " + " | ".join(d["name"] for d in report["domains"]) + " |",
            "|---|" + "---:|" * len(report["domains"]),
        ]
        for m in ordered_methods(methods):
            per = methods[m].get("domains", {})
            cells = [" / ".join(s.text(per.get(d["name"], {}).get(s.name), percent=True) for s in brief)
                     for d in report["domains"]]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += render_cascade(report)
    lines += [
        "",
        "## Domains",
        "",
        f"| domain | meta-class | test images | true classes | vocabulary ({served}) |",
        "|---|---|---:|---:|---:|",
    ]
    for d in report["domains"]:
        vocab = report.get("vocabulary_sizes", {}).get(served, {}).get(d["name"], "–")
        lines.append(f"| {d['name']} | {d.get('meta_class') or '–'} | {d['test_images']} | {d['classes']} | {vocab} |")
    if report.get("skipped"):
        lines += ["", "## Not evaluated", ""] + [f"- {m}: {why}" for m, why in report["skipped"].items()]
    if report.get("bad_images"):
        lines += ["", f"## Unreadable test images ({len(report['bad_images'])}, counted as wrong)", ""]
        lines += [f"- {b['uri']}: {b['error']}" for b in report["bad_images"][:20]]
    plots = report.get("plots", {})
    if plots:
        lines += ["", "## Plots", ""]
        for name, where in plots.items():
            lines.append(
                f"- {name}: {where}" if where.startswith("skipped") else f"![{name}]({where.rsplit('/', 1)[-1]})"
            )
    return "\n".join(lines) + "\n"


def _spread_lines(report: dict[str, Any], methods: dict[str, Any]) -> list[str]:
    """Notes under the main table: latency conditions, the sACC caveat, and methods that collapsed."""
    cond = report.get("latency_conditions") or {}
    lines = [""]
    if cond:
        quiet = "" if cond.get("load_average_1m", 0) < 0.5 * (cond.get("cpus") or 1) else " (a busy machine)"
        lines.append(f"Latency: batch-1 wall time, measured with a load average of {cond.get('load_average_1m')} "
                     f"on {cond.get('cpus')} CPUs{quiet}.")
    lines.append("sACC rewards names that share words with the true names: a method that predicts one or two "
                 "names for most images can score a high sACC. The spread below shows how many names each method uses.")
    domains = [d["name"] for d in report["domains"]]
    lines += ["", "## Prediction spread (distinct names predicted / true classes, largest share of one name)", "",
              "| method | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    collapsed = []
    for m in ordered_methods(methods):
        spread = methods[m].get("spread", {})
        cells = []
        for d in domains:
            s = spread.get(d)
            if not s:
                cells.append("–")
                continue
            cells.append(f"{s['distinct_names']} / {s['classes']}, {100 * s['top_share']:.0f}%"
                         + (" ⚠" if s["collapsed"] else ""))
            if s["collapsed"]:
                collapsed.append(f"{TITLES.get(m, m)} on {d}: {s['distinct_names']} names for {s['classes']} "
                                 f"classes, '{s['top_name']}' for {100 * s['top_share']:.0f}% of the images")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if collapsed:
        lines += ["", "**Warning: collapse.** These methods name most test images with a few names:", ""]
        lines += [f"- {c}" for c in collapsed]
    return lines


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON has no NaN); numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(report: dict[str, Any], out: str, storage: Storage) -> dict[str, str]:
    """Write report.json and report.md below ``out``; returns their URIs."""
    files = {"json": join(out, "report.json"), "markdown": join(out, "report.md")}
    storage.write_json(files["json"], json_safe(report))
    storage.write_text(files["markdown"], render_markdown(report))
    return files
