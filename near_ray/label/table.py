"""The labels table: its row contract, the rule that says which rows a re-run skips, and its readers.

Layout: a part table (``near_ray.parts``), ``{workdir}/labels/domain=<name>/part-<time>-<id>.parquet``,
one row per image x sample. When a re-run adds a row for a key that already has one (a retried
``mllm_error``), readers keep the final, newest answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from near_ray.errors import NearRayError
from near_ray.parts import PartTable, ResumeRule, best_rows
from near_ray.storage import Storage, storage_for

if TYPE_CHECKING:
    import pandas as pd

    from near_ray.config import RunConfig

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("domain", pa.string()),
        ("sample", pa.int32()),
        ("seed", pa.int64()),
        ("raw_answer", pa.string()),
        ("label", pa.string()),
        ("status", pa.string()),  # ok | bad_image | mllm_error | unparsable
        ("error", pa.string()),
        ("model", pa.string()),
        ("prompt_version", pa.string()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("latency_s", pa.float64()),
    ]
)
COLUMNS = SCHEMA.names
FINAL_STATUSES = ("ok", "unparsable", "bad_image")  # never asked again; mllm_error is retried on a re-run
_STATUS_RANK = {"ok": 0, "unparsable": 0, "bad_image": 1, "mllm_error": 2}


class LabelsNotFoundError(NearRayError):
    """No labels table where one was expected."""


def labels_uri(cfg: RunConfig) -> str:
    return cfg.paths.labels


def labels_table(uri: str, storage: Storage, part_rows: int = 2000, flush_interval_s: float = 30.0) -> PartTable:
    return PartTable(uri, storage, SCHEMA, part_rows, flush_interval_s)


def resume_rule(prompt_version: str, model: str) -> ResumeRule:
    """A (domain, uri, image_id, sample) with a final row of this prompt version and model is never asked again."""
    return ResumeRule(equal={"prompt_version": prompt_version, "model": model}, final_statuses=FINAL_STATUSES,
                      sample_column="sample")  # fmt: skip


def read_labels_table(uri: str, storage: Storage) -> pa.Table | None:
    """Every row of every part below ``uri`` (None when there is no table yet)."""
    return labels_table(uri, storage).read()


def copy_identical(
    aliases: list[dict[str, Any]], table: PartTable, prompt_version: str, model: str
) -> list[dict[str, Any]]:
    """Rows for URIs whose bytes equal an image already asked about: its answers, copied at no cost."""
    if not aliases:
        return []
    source = best_rows(table, resume_rule(prompt_version, model), aliases)
    rows = []
    for a in aliases:
        src = source.get((a["domain"], a["image_id"], a["sample"]))
        if src is None:  # the original was never answered: a re-run asks again
            src = {"status": "mllm_error", "error": f"{a['uri']}: no answer for identical image {a['image_id']}"}
            src.update(raw_answer=None, label=None, seed=None, uri=a["uri"])
        error = src.get("error")
        rows.append(
            {
                **src,
                **a,
                "error": error.replace(src["uri"], a["uri"]) if isinstance(error, str) else error,
                "model": model,
                "prompt_version": prompt_version,
                "input_tokens": 0,
                "output_tokens": 0,
                "latency_s": 0.0,
            }
        )
    return rows


def read_labels(
    cfg_or_uri: RunConfig | str, storage: Storage | None = None, *, all_versions: bool = False
) -> pd.DataFrame:
    """The labels table as a DataFrame: one row per (uri, sample), the final and newest answer.

    Given a RunConfig, only rows of its prompt version and model are returned (unless
    ``all_versions``); given a URI, every version is returned (deduplicated per version and model).
    """
    from near_ray.label.backends import model_name

    if isinstance(cfg_or_uri, str):
        uri, storage = cfg_or_uri, storage or Storage()
        version = model = None
    else:
        uri, storage = labels_uri(cfg_or_uri), storage or storage_for(cfg_or_uri)
        version, model = cfg_or_uri.label.prompt_version, model_name(cfg_or_uri.label)
    table = read_labels_table(uri, storage)
    if table is None:
        raise LabelsNotFoundError(f"{uri}: no labels table (run `near-ray label` first)")
    df = table.to_pandas()
    if version is not None and not all_versions:
        df = df[(df["prompt_version"] == version) & (df["model"] == model)]
    return latest_rows(df)


def latest_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (domain, uri, sample, prompt_version, model): final statuses beat errors, newer beats older."""
    df = df.reset_index(drop=True)
    order = df.assign(_rank=df["status"].map(_STATUS_RANK).fillna(3), _pos=-df.index)
    order = order.sort_values(["_rank", "_pos"], kind="stable")
    keys = ["domain", "uri", "sample", "prompt_version", "model"]
    return order.drop_duplicates(keys).drop(columns=["_rank", "_pos"]).sort_values(["domain", "uri", "sample"])
