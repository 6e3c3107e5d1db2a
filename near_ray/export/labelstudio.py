"""Label Studio: tasks with the answers as pre-annotations, the labeling config, and a review read back.

One project per domain (each domain has its own names). A task is Label Studio's basic JSON format::

    {"data": {"image": <url>, "image_id": …, "uri": …, "domain": …, "source": …},
     "predictions": [{"model_version": <bundle hash>, "score": <score>,
                      "result": [{"id": …, "from_name": "choice", "to_name": "image", "type": "choices",
                                  "value": {"choices": [<name>]}}]}]}

An image without a name is a task without predictions. ``from_name``/``to_name`` are the names of the
config's ``<Choices>`` and ``<Image>`` tags; a ``<TextArea name="other">`` takes a name that is not in the
list. Image URLs: ``s3://…`` as it is (a project with an S3 source storage on the bucket signs it), a
local file as ``/data/local-files/?d=<path below the document root>`` (Label Studio's local-files
serving: LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true, LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<root>).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from near_ray.export.rows import ExportError, counts
from near_ray.storage import Storage, is_s3, join

IMAGE, CHOICE, OTHER = "image", "choice", "other"  # the config's tag names, which every result refers to


def labeling_config(names: list[str]) -> str:
    """The labeling config XML: the image, one choice per name, a text box for a name not in the list."""
    choices = "\n".join(f"    <Choice value={quoteattr(n)}/>" for n in names)
    return (
        "<View>\n"
        f'  <Image name="{IMAGE}" value="$image"/>\n'
        f'  <Choices name="{CHOICE}" toName="{IMAGE}" choice="single" showInLine="false">\n{choices}\n  </Choices>\n'
        f'  <Header value="A name not in the list"/>\n'
        f'  <TextArea name="{OTHER}" toName="{IMAGE}" maxSubmissions="1" editable="true"/>\n'
        "</View>\n"
    )


def document_root(uris: list[str]) -> str | None:
    """The deepest folder holding every local image: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT for these tasks
    (the narrowest root: Label Studio serves everything below it)."""
    folders = {os.path.dirname(os.path.abspath(u)) for u in uris if not is_s3(u)}
    return os.path.commonpath(sorted(folders)) if folders else None


def image_url(uri: str, root: str | None) -> str:
    """``s3://…`` as it is; a local file as Label Studio's local-files URL, relative to ``root``."""
    if is_s3(uri):
        return uri
    path = os.path.abspath(uri)
    base = os.path.join(os.path.abspath(root), "") if root else None
    if base is None or not path.startswith(base):
        raise ExportError(f"{uri}: not below the Label Studio document root {root} (--local-root)")
    return "/data/local-files/?d=" + quote(path[len(base):].replace(os.sep, "/"), safe="/")


def domain_names(rows: list[dict[str, Any]], rankings: bool) -> list[str]:
    """The choices of one domain's project: every answer, and with ``rankings`` every name the CLIP ranked."""
    return sorted({r["name"] for r in rows if r["name"]} | ({n for r in rows for n in r["top_k_names"]} if rankings else set()))


def tasks(rows: list[dict[str, Any]], root: str | None) -> list[dict[str, Any]]:
    """One task per readable image, its answer (when it has one) as a prediction."""
    out = []
    for i, r in enumerate(rows):
        if r["status"] == "bad_image":
            continue
        data = {IMAGE: image_url(r["uri"], root), **{k: r[k] for k in ("image_id", "uri", "domain", "source")}}
        task: dict[str, Any] = {"data": data, "predictions": []}
        if r["name"] is not None:
            prediction: dict[str, Any] = {"model_version": r["model_version"] or "near_ray"}
            if r["score"] is not None:
                prediction["score"] = r["score"]
            prediction["result"] = [{"id": f"r{i}", "from_name": CHOICE, "to_name": IMAGE, "type": "choices",
                                     "value": {"choices": [r["name"]]}}]  # fmt: skip
            task["predictions"].append(prediction)
        out.append(task)
    return out


def write_labelstudio(rows: list[dict[str, Any]], out: str, st: Storage, local_root: str | None,
                      rankings: bool = True) -> dict[str, Any]:  # fmt: skip
    """``<out>/<domain>/tasks.json`` and ``labeling_config.xml`` per domain."""
    root = local_root or document_root([r["uri"] for r in rows if r["status"] != "bad_image"])
    by_domain: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_domain[r["domain"]].append(r)
    # every task is built before anything is written: an image outside the document root fails the export whole
    built = {d: (tasks(drows, root), domain_names(drows, rankings)) for d, drows in sorted(by_domain.items())}
    projects = {}
    for domain, (domain_tasks, names) in built.items():
        # compact: the indenting encoder is pure Python, ten times slower on a large project
        st.write_text(join(out, domain, "tasks.json"), json.dumps(domain_tasks))
        st.write_text(join(out, domain, "labeling_config.xml"), labeling_config(names))
        projects[domain] = {"tasks": join(out, domain, "tasks.json"), "config": join(out, domain, "labeling_config.xml"),
                            "choices": len(names)}  # fmt: skip
    return {"domains": counts(rows), "projects": projects, "local_files_document_root": root}


# ------------------------------------------------------------------------------------------ reading a review back
def _reviewed(task: dict[str, Any]) -> str | None:
    """The name a reviewer gave a task: the text box when filled, else the choice; None if not reviewed.

    The newest annotation that was not cancelled counts (Label Studio lists them in creation order)."""
    for annotation in reversed(task.get("annotations") or []):
        if annotation.get("was_cancelled"):
            continue
        chosen = typed = None
        for item in annotation.get("result") or []:
            value = item.get("value") or {}
            if item.get("from_name") == CHOICE and value.get("choices"):
                chosen = str(value["choices"][0])
            elif item.get("from_name") == OTHER and value.get("text"):
                typed = " ".join(str(t) for t in value["text"]).strip() or None
        if typed or chosen:
            return typed or chosen
    return None


def _predicted(task: dict[str, Any]) -> str | None:
    for prediction in task.get("predictions") or []:
        for item in prediction.get("result") or []:
            if item.get("from_name") == CHOICE and (item.get("value") or {}).get("choices"):
                return str(item["value"]["choices"][0])
    return None


def reviewed_names(exported: list[dict[str, Any]]) -> dict[str, str]:
    """A reviewed project's JSON export (Export > JSON) -> {image URI: the name the reviewer gave it}.

    Keyed by the ``uri`` this export put in each task's data (else the task's image URL); tasks nobody
    reviewed are left out."""
    out = {}
    for task in exported:
        name = _reviewed(task)
        if name is not None:
            data = task.get("data") or {}
            out[str(data.get("uri") or data.get(IMAGE))] = name
    return out


def edits_from_label_studio(exported: list[dict[str, Any]], min_images: int = 3,
                            min_share: float = 0.8) -> list[dict[str, Any]]:  # fmt: skip
    """Vocabulary edits a review suggests, in the edits file's form: where reviewers changed one predicted
    name to the same other name on at least ``min_images`` images and ``min_share`` of its reviewed images.

    The other name already a predicted name of the domain: ``{merge: [old, new], into: new}``; a name the
    reviewers typed or chose that nothing was predicted as: ``{rename: old, to: new}``. A person reads
    them before they go into the edits file: a review of a few images is evidence, not a decision."""
    predicted: dict[str, set[str]] = defaultdict(set)
    changes: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for task in exported:
        domain = str((task.get("data") or {}).get("domain") or "")
        before, after = _predicted(task), _reviewed(task)
        if before is None:
            continue
        predicted[domain].add(before)
        if after is not None:
            changes[(domain, before)][after] += 1
    edits = []
    for (domain, before), c in sorted(changes.items()):
        after, n = c.most_common(1)[0]
        reviewed = sum(c.values())
        if after == before or n < min_images or n / reviewed < min_share:
            continue
        note = f"Label Studio review: {n} of {reviewed} reviewed images predicted '{before}' were named '{after}'"
        edit: dict[str, Any] = (
            {"merge": [before, after], "into": after} if after in predicted[domain] else {"rename": before, "to": after}
        )
        edits.append({**edit, **({"domain": domain} if domain else {}), "note": note})
    return edits
