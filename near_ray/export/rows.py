"""The rows an export writes, read through the tables' own readers.

The rows come from the predictions table (``read_predictions``: one row per image, from its newest
part) or, with ``source="labels"``, from the labels table (``read_labels``: the configured MLLM's
final answers), where an image's name is the majority of its samples and its score the share of
samples that gave it. Either way one row per (domain, image URI), with the predictions table's columns.
"""

from __future__ import annotations

import difflib
from collections import Counter
from typing import TYPE_CHECKING, Any

from near_ray.errors import NearRayError
from near_ray.storage import Storage, storage_for

if TYPE_CHECKING:
    import pandas as pd

    from near_ray.config import RunConfig

SOURCES = ("predictions", "labels")
# what every writer reads: the predictions table's columns, less those only the cascade needs
COLUMNS = ["image_id", "uri", "domain", "name", "score", "top_k_names", "top_k_scores", "abstained", "source",
           "model_version", "status", "error"]  # fmt: skip


class ExportError(NearRayError):
    """An export that cannot start: no table, an unknown domain, an output that is not empty."""


# ------------------------------------------------------------------------------------------ rows
def export_rows(cfg: RunConfig, source: str = "predictions", domains: list[str] | None = None,
                storage: Storage | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One plain dict per image (the predictions table's columns), sorted by domain and URI."""
    st = storage or storage_for(cfg)
    if source == "predictions":
        from near_ray.classify.table import predictions_uri, read_predictions

        uri = predictions_uri(cfg)
        df = read_predictions(uri, st, COLUMNS)
        if df.empty:
            raise ExportError(f"{uri}: no predictions table (run `near-ray classify` first, or export --source labels)")
    elif source == "labels":
        from near_ray.label.table import labels_uri, read_labels

        uri = labels_uri(cfg)
        df = _from_labels(read_labels(cfg, st))  # raises LabelsNotFoundError naming the URI
        if df.empty:
            raise ExportError(f"{uri}: no answers of the configured MLLM (label.prompt_version and model)")
    else:
        raise ExportError(f"--source {source!r}: expected one of {', '.join(SOURCES)}")
    present = sorted(set(df["domain"]))
    for d in domains or []:
        if d not in present:
            close = difflib.get_close_matches(d, present, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ExportError(f"--domain {d!r}: not in the {source} table{hint}; its domains: {', '.join(present)}")
    if domains:
        df = df[df["domain"].isin(domains)]
    return [_record(r) for r in df.to_dict("records")]


def _from_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """Labels-table rows (image x sample) -> one row per image: the majority answer and its share."""
    import pandas as pd

    from near_ray.names import majority_label

    rows = []
    for (domain, uri), g in labels.groupby(["domain", "uri"], sort=True):
        answers = [str(x) for x in g.loc[(g["status"] == "ok") & g["label"].notna(), "label"]]
        name = majority_label(answers)
        ranked = Counter(answers).most_common()
        status = "ok" if name else ("bad_image" if (g["status"] == "bad_image").any() else "abstained")
        errors = [str(e) for e in g["error"].dropna()]
        rows.append({
            "image_id": g["image_id"].dropna().iloc[0] if g["image_id"].notna().any() else None,
            "uri": uri, "domain": domain, "name": name,
            "score": answers.count(name) / len(answers) if name else None,
            "top_k_names": [n for n, _ in ranked], "top_k_scores": [c / len(answers) for _, c in ranked],
            "abstained": name is None and status != "bad_image", "source": "mllm" if name else "none",
            "model_version": f"{g['model'].iloc[0]}@{g['prompt_version'].iloc[0]}", "status": status,
            "error": None if name else (errors[0] if errors else "no sample of the MLLM named it"),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


def _record(r: dict[str, Any]) -> dict[str, Any]:
    """pandas values -> plain Python (NaN -> None, arrays -> lists), so every writer sees JSON types."""
    def scalar(v: Any) -> Any:
        return None if v is None or (isinstance(v, float) and v != v) else v

    names, scores = r.get("top_k_names"), r.get("top_k_scores")
    return {
        "image_id": scalar(r.get("image_id")), "uri": str(r["uri"]), "domain": str(r["domain"]),
        "name": scalar(r.get("name")), "score": None if scalar(r.get("score")) is None else float(r["score"]),
        "top_k_names": [str(n) for n in names] if names is not None and not isinstance(names, float) else [],
        "top_k_scores": [float(s) for s in scores] if scores is not None and not isinstance(scores, float) else [],
        "abstained": bool(scalar(r.get("abstained")) or False), "source": scalar(r.get("source")),
        "model_version": scalar(r.get("model_version")), "status": scalar(r.get("status")),
        "error": scalar(r.get("error")),
    }  # fmt: skip


def counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per domain: images, images per name, unnamed (abstained, no answer) and bad images."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        c = out.setdefault(r["domain"], {"images": 0, "by_name": Counter(), "unnamed": 0, "bad_images": 0})
        c["images"] += 1
        if r["status"] == "bad_image":
            c["bad_images"] += 1
        elif r["name"] is None:
            c["unnamed"] += 1
        else:
            c["by_name"][r["name"]] += 1
    return {d: {**c, "by_name": dict(sorted(c["by_name"].items()))} for d, c in sorted(out.items())}
