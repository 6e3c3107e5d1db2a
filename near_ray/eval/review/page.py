"""The review page as one HTML string: inline CSS, thumbnails as data URIs, no script, no external URL.

Per domain, top to bottom: a "check these" box (pruned names, the most suspect images, thin names),
the names with counts and example images, the merges and prunings, the suspect images ranked, and
the label stage's (and the cascade's) facts. Element ids and classes are stable (``name``,
``merge``, ``pruned``, ``suspect``; ``data-name`` / ``data-uri`` attributes) for anyone who scripts
against the page.
"""

from __future__ import annotations

import html
import time
from collections import Counter
from typing import Any

from near_ray.eval.review.evidence import NO_NAME, SUSPECT_BELOW, Change, DomainReview, NameSummary
from near_ray.eval.review.gather import ImageView

EXAMPLES = 10  # thumbnails per name: the most and the least agreeing halves
CHECK_THUMBS = 6
CHECK_PRUNED = 8  # pruned names the "check these" box lists by name
LOST_CLASS_IMAGES = 2  # ... when they were the main answer for at least this many images

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 1.5rem 3rem;color:#1d1d1f;background:#fff}
h1{font-size:1.5rem;margin:1rem 0 .2rem}h2{font-size:1.3rem;margin:2rem 0 .3rem;border-bottom:2px solid #333}
h3{font-size:1.05rem;margin:1.4rem 0 .4rem}small,.muted{color:#666}
nav a{margin-right:1rem}
.banner{background:#fff4ce;border:1px solid #e0c060;padding:.4rem .8rem;margin:.6rem 0}
.check{background:#fdf0ef;border:1px solid #d9a09a;border-radius:6px;padding:.5rem 1rem;margin:.6rem 0;max-width:75rem}
.check h3{margin:.2rem 0 .4rem}.check ul{margin:.2rem 0;padding-left:1.2rem}.check li{margin:.25rem 0}
table{border-collapse:collapse;margin:.3rem 0}td,th{border-bottom:1px solid #ddd;padding:.3rem .5rem;
vertical-align:top;text-align:left}th{background:#f3f3f3;font-weight:600}td.num{text-align:right;white-space:nowrap}
td.nm{font-weight:600;min-width:10rem}table.names{width:100%}td.accuracy{white-space:normal;max-width:11rem}
td.confused{min-width:11rem}
.strip{white-space:nowrap}.strip.least{border-top:1px dashed #bbb;margin-top:2px;padding-top:2px}
.thumb{width:56px;height:56px;object-fit:cover;border:1px solid #bbb;margin:1px;vertical-align:middle}
.thumb.missing{display:inline-block;font-size:10px;color:#999;text-align:center;line-height:56px}
td.answers{min-width:14rem}.raw{color:#555;font-style:italic;font-size:12px}
.answers ul,.dest{margin:0;padding-left:1rem}.bad{color:#b3261e;font-weight:600}.good{color:#1e6b2e}
.uri{font:11px monospace;color:#555;word-break:break-all;max-width:22rem}
.new{background:#eef;border-radius:3px;padding:0 3px;font-size:11px}
footer{margin-top:3rem;color:#555;max-width:60rem}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _thumb(view: ImageView, thumbs: dict[str, str | None], caption: str = "") -> str:
    title = esc(f"{view.uri}{' · ' + caption if caption else ''}")
    src = thumbs.get(view.uri)
    if src is None:
        return f'<span class="thumb missing" title="{title}">unreadable</span>'
    return f'<img class="thumb" src="{src}" alt="{esc(view.name or NO_NAME)}" title="{title}">'


def _agree(view: ImageView) -> str:
    return "–" if view.agreement is None else f"{view.agreement:.2f}"


def _n(count: int, noun: str) -> str:
    """"1 image", "3 images"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _pct(num: int, den: int) -> str:
    return f"{100 * num / den:.0f}%" if den else "–"


def _counter(c: Counter, limit: int = 4) -> str:
    items = [f"{esc(n)} <span class=muted>{k}</span>" for n, k in c.most_common(limit)]
    rest = sum(c.values()) - sum(k for _, k in c.most_common(limit))
    return ", ".join(items) + (f", <span class=muted>others {rest}</span>" if rest > 0 else "")


def examples(s: NameSummary, n: int = EXAMPLES) -> tuple[list[ImageView], list[ImageView]]:
    """The most agreeing and the least agreeing images of a name (all of them, in two rows, when there are few)."""
    if len(s.images) <= n:
        return s.images[: n // 2], s.images[n // 2 :]
    return s.images[: n // 2], s.images[-(n - n // 2) :]


# ------------------------------------------------------------------------------------------ parts
def _pruned_first(r: DomainReview) -> list[Change]:
    """Pruned names, those the most images mostly got first: a lost class before a stray answer."""
    pruned = [c for c in r.changes if c.kind == "pruned"]
    return sorted(pruned, key=lambda c: (-c.majority, -sum(c.destinations.values()), c.name))


def _check_box(r: DomainReview, did: str, thumbs: dict[str, str | None]) -> str:
    items = []
    if r.collapse:
        from near_ray.eval.collapse import collapse_message

        items.append(f'<li class="check-collapse"><b>One name for most images.</b> '
                     f"{esc(collapse_message(r.data.name, r.collapse))}</li>")
    pruned = _pruned_first(r)
    lost = [c for c in pruned if c.majority >= LOST_CLASS_IMAGES][:CHECK_PRUNED]
    for c in lost:
        went = _counter(c.destinations) if c.destinations else "no image had it"
        items.append(f'<li class="check-pruned" data-name="{esc(c.name)}"><b>{esc(c.name)}</b> was pruned '
                     f"({c.stage}) though it was the main answer for {_n(c.majority, 'image')}: they now read "
                     f"{went}</li>")  # fmt: skip
    if rest := len(pruned) - len(lost):
        names = ", ".join(c.name for c in pruned if c not in lost)
        items.append(f'<li class="check-pruned-rest">{_n(rest, "other pruned name")}, each the main answer for '
                     f'at most one image (stray answers): <span class="muted">{esc(names[:300])}'
                     f'{" …" if len(names) > 300 else ""}</span> (<a href="#{did}-changes">where their images went</a>)'
                     "</li>")  # fmt: skip
    if r.suspects:
        strip = "".join(_thumb(v, thumbs, f"named {v.name}, agreement {_agree(v)}") for v in r.suspects[:CHECK_THUMBS])
        items.append(f'<li class="check-suspects">{_n(r.suspect_count, "image")} whose views name something else '
                     f'for a third or more of the evidence: <a href="#{did}-suspects">ranked below</a><br>{strip}</li>')
    thin = [s.name for s in r.names if s.in_vocabulary and len(s.images) <= 1]
    if thin:
        items.append(f"<li>{len(thin)} name(s) with at most one image: {esc(', '.join(thin[:12]))}"
                     f"{' …' if len(thin) > 12 else ''}</li>")  # fmt: skip
    new = [s.name for s in r.names if not s.in_vocabulary]
    if new:
        items.append(f"<li>{len(new)} name(s) only the cascade's MLLM gave: {esc(', '.join(new[:12]))}</li>")
    if r.unnamed:
        items.append(f"<li>{r.unnamed} image(s) got no name (no parsable answer, abstained or unreadable)</li>")
    if not items:
        items.append("<li>nothing stands out: no pruned name, no suspect image</li>")
    return f'<div class="check" id="{did}-check"><h3>Check these</h3><ul>{"".join(items)}</ul></div>'


def _names_table(r: DomainReview, did: str, thumbs: dict[str, str | None]) -> str:
    truth = r.accuracy is not None
    head = ("<tr><th>name</th><th>images</th><th>MLLM support</th>" + ("<th>accuracy</th>" if truth else "")
            + "<th>examples: most → least confident</th><th>MLLM answers merged into it</th><th>confused with</th></tr>")
    rows = []
    for j, s in enumerate(r.names):
        top, bottom = examples(s)
        strip = '<div class="strip">' + "".join(_thumb(v, thumbs, f"agreement {_agree(v)}") for v in top) + "</div>"
        if bottom:
            strip += '<div class="strip least">' + "".join(_thumb(v, thumbs, f"agreement {_agree(v)}")
                                                           for v in bottom) + "</div>"  # fmt: skip
        answers = "".join(f"<li>{esc(a)} <span class=muted>× {k}</span></li>" for a, k in s.surfaces.most_common(8))
        # structured answers ({"name": …}) say nothing the surface forms do not: only free text is shown
        free = [a for a in s.raw_examples if not a.lstrip().startswith(("{", "[", "```"))]
        raw = "".join(f'<div class="raw">“{esc(a[:120])}”</div>' for a in free[:2])
        confused = "<br>".join(f"{esc(n)} <span class=muted>≈{w:g} image(s)</span>" for n, w in s.confused) or "–"
        acc = ""
        if truth and s.truth_images:
            cls = f"as {esc(s.truth_class)}" if s.truth_class else "matched to no class"
            mark = "good" if s.truth_correct == s.truth_images else "bad"
            acc = (f'<td class="num accuracy"><span class="{mark}">{_pct(s.truth_correct, s.truth_images)}</span> '
                   f"<span class=muted>of {s.truth_images}<br>{cls}</span></td>")  # fmt: skip
        elif truth:
            acc = '<td class="num accuracy">–</td>'
        tag = "" if s.in_vocabulary else ' <span class="new">MLLM only</span>'
        train = f"<br><span class=muted>{s.train_support} after training</span>" if s.train_support is not None else ""
        rows.append(f'<tr class="name" id="{did}-n{j}" data-name="{esc(s.name)}"><td class="nm">{esc(s.name)}{tag}</td>'
                    f'<td class="num count">{len(s.images)}</td><td class="num">{s.support}{train}</td>{acc}'
                    f'<td class="thumbs">{strip or "–"}</td><td class="answers"><ul>{answers}</ul>{raw}</td>'
                    f'<td class="confused">{confused}</td></tr>')  # fmt: skip
    return f'<table class="names">{head}{"".join(rows)}</table>'


def _change_row(c: Change) -> str:
    if c.kind == "merge":
        what = f"{esc(c.name)} → <b>{esc(c.into)}</b>"
    else:
        what = f"<b>{esc(c.name)}</b><br><span class=muted>main answer for {_n(c.majority, 'image')}</span>"
    went = _counter(c.destinations, 6) if c.destinations else "no image had it"
    into = f' data-into="{esc(c.into)}"' if c.into else ""
    return (f'<tr class="{c.kind}" data-name="{esc(c.name)}"{into}><td>{c.kind}</td><td>{what}</td><td>{c.stage}</td>'
            f"<td>{esc(c.reason)}</td><td>{went}</td></tr>")  # fmt: skip


def _changes_table(r: DomainReview) -> str:
    if not r.changes:
        return "<p class=muted>No name was merged or pruned.</p>"
    changes = _pruned_first(r) + sorted((c for c in r.changes if c.kind == "merge"), key=lambda c: (c.into, c.name))
    return ('<table class="changes"><tr><th>change</th><th>name</th><th>stage</th><th>why</th>'
            f'<th>its images went to (images)</th></tr>{"".join(_change_row(c) for c in changes)}</table>')


def _evidence(view: ImageView) -> str:
    parts = []
    for source, dist in view.evidence.items():
        best = max(dist, key=lambda n: (dist[n], n))
        parts.append(f"{source}: {esc(best)} {dist[best]:.2f}"
                     + (f" <span class=muted>({esc(view.name)} {dist.get(view.name or '', 0.0):.2f})</span>"
                        if best != view.name else ""))  # fmt: skip
    return "<br>".join(parts)


def _suspects_table(r: DomainReview, did: str, thumbs: dict[str, str | None]) -> str:
    if not r.suspects:
        return f"<p class=muted>No image whose evidence agrees with its name less than {SUSPECT_BELOW:.2f}.</p>"
    truth = r.accuracy is not None
    shown = f"the {len(r.suspects)} lowest of {r.suspect_count}" if r.suspect_count > len(r.suspects) else "all"
    note = f"<p class=muted>Agreement under {SUSPECT_BELOW:.2f}: {shown}, lowest first."
    if truth and r.accuracy:
        note += f" With truth, {r.accuracy['suspects_wrong']} of them are indeed named wrong."
    head = ("<tr><th>#</th><th>image</th><th>named</th><th>agreement</th><th>what each view says</th>"
            "<th>evidence prefers</th>" + ("<th>true class</th>" if truth else "") + "<th>uri</th></tr>")
    rows = []
    for k, v in enumerate(r.suspects, 1):
        true = f"<td>{esc(v.truth or '–')}</td>" if truth else ""
        rows.append(f'<tr class="suspect" data-uri="{esc(v.uri)}" data-name="{esc(v.name)}"><td class="num">{k}</td>'
                    f"<td>{_thumb(v, thumbs)}</td><td>{esc(v.name)}</td><td class=num>{_agree(v)}</td>"
                    f"<td>{_evidence(v)}</td><td>{esc(v.suggestion or '–')}</td>{true}"
                    f'<td class="uri">{esc(v.uri)}</td></tr>')  # fmt: skip
    return f'{note}</p><table class="suspects" id="{did}-suspects">{head}{"".join(rows)}</table>'


def _facts(r: DomainReview) -> str:
    f = r.data.label_facts
    rows = [("images asked about", f["images"]), ("answers (images × samples)", f["answers"]),
            ("answers with a name", f["named"]), ("unparsable answers", f["unparsable"]),
            ("of which refusals", f["refusals"]), ("failed requests", f["mllm_errors"]),
            ("unreadable images", f["bad_images"]), ("requests paid", f["requests"]),
            ("tokens in / out", f"{f['input_tokens']:,} / {f['output_tokens']:,}"),
            ("spent (label.prices)", f"${f['cost_usd']:.4f}"), ("MLLM", f["model"] or "–")]  # fmt: skip
    out = '<table class="facts label-facts">' + "".join(f"<tr><th>{esc(k)}</th><td class=num>{esc(v)}</td></tr>"
                                                       for k, v in rows) + "</table>"  # fmt: skip
    c = r.data.cascade
    if c:
        rows = [("images in the predictions table", c["images"]),
                ("by source", ", ".join(f"{k} {v}" for k, v in sorted(c["by_source"].items()))),
                ("routed to the MLLM", c["routed"]), ("named by the MLLM", c["named_by_mllm"]),
                ("cascade spend", f"${c['spend_usd']:.4f}")]  # fmt: skip
        out += '<h3>Classify and its cascade</h3><table class="facts cascade-facts">' + "".join(
            f"<tr><th>{esc(k)}</th><td class=num>{esc(v)}</td></tr>" for k, v in rows) + "</table>"
    return out


def _domain(r: DomainReview, i: int, thumbs: dict[str, str | None]) -> str:
    d, did = r.data, f"d{i}"
    line = [_n(len(d.images), "image"), _n(sum(s.in_vocabulary for s in r.names), "name"),
            _n(sum(c.kind == "merge" for c in r.changes), "merged answer"),
            _n(sum(c.kind == "pruned" for c in r.changes), "pruned name"), _n(r.suspect_count, "suspect image")]
    if r.accuracy and r.accuracy["images"]:
        a = r.accuracy
        line.append(f'<span class="truth-accuracy">accuracy {_pct(a["correct"], a["images"])} of {a["images"]} images '
                    "with truth (names matched to classes one to one)</span>")  # fmt: skip
    names_from = f"the bundle {esc(d.bundle)}" if d.bundle else "refine's vocabulary (no bundle yet)"
    return (f'<section class="domain" id="{did}" data-domain="{esc(d.name)}">'
            f'<h2>{esc(d.name)}{f" <small>({esc(d.meta_class)})</small>" if d.meta_class else ""}</h2>'
            f'<p>{" · ".join(line)}</p>{_check_box(r, did, thumbs)}'
            f"<h3>Names</h3><p class=muted>Names from {names_from}; images counted by the name the run gives "
            f"them. Hover a thumbnail for its URI.</p>{_names_table(r, did, thumbs)}"
            f'<h3 id="{did}-changes">Merges and prunings</h3>{_changes_table(r)}'
            f"<h3>Images most likely mislabelled</h3>{_suspects_table(r, did, thumbs)}"
            f"<h3>Labelling</h3>{_facts(r)}</section>")  # fmt: skip


FOOTER = f"""<footer><h3>How to read this page</h3>
<p><b>Agreement</b> of an image with its name is the mean, over the views of it the run has, of the share each
view gives that name: its own MLLM samples (or the cascade's answer), the names of its nearest discovery
images (cosine-weighted), and the classifier's top-k probabilities. Images with at least two views and an
agreement under {SUSPECT_BELOW:.2f} are listed as suspects, lowest first; "evidence prefers" is the other name
with the most evidence. "Confused with" adds that evidence up over a name's images.</p>
<p>A name's <b>images</b> are those the run names so (the predictions table where classify ran, else the
most confident candidate among the kept names); <b>MLLM support</b> counts the images whose MLLM samples gave
the name at least once.</p></footer>"""


def render(reviews: list[DomainReview], run: dict[str, Any], thumbs: dict[str, str | None]) -> str:
    label = run.get("label_summary") or {}
    banner = ('<p class="banner">These names come from the <b>simulated annotator</b>: the page shows the pipeline, '
              "not a real MLLM.</p>") if label.get("simulated") else ""  # fmt: skip
    nav = "".join(f'<a href="#d{i}">{esc(r.data.name)} ({sum(s.in_vocabulary for s in r.names)} names)</a>'
                  for i, r in enumerate(reviews))  # fmt: skip
    body = "".join(_domain(r, i, thumbs) for i, r in enumerate(reviews))
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>near_ray review: {esc(run['workdir'])}</title><style>{CSS}</style></head><body>"
            f"<h1>Review of the discovered names</h1><p class=muted>Run {esc(run['workdir'])} · written {created}</p>"
            f"{banner}<nav>{nav}</nav>{body}{FOOTER}</body></html>\n")  # fmt: skip
