"""The predictions table: its row contract, the rule that says which rows a re-run skips, and its readers.

Layout: a part table (``near_ray.parts``), ``{workdir}/predictions/domain=<name>/part-<time>-<id>.parquet``,
one row per image. Each part holds the rows of one domain and one bundle version. The cascade changes
rows after they are written by rewriting their part under the same id (``PartTable.write``), so a part
id names one set of images for good.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from near_ray.parts import PartTable, ResumeRule, best_rows
from near_ray.storage import Storage

if TYPE_CHECKING:
    import pandas as pd

    from near_ray.config import RunConfig

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # content hash of the bytes (near_ray.images.image_id)
        ("uri", pa.string()),
        ("domain", pa.string()),
        ("name", pa.string()),  # the answer; null for bad images and abstentions
        ("score", pa.float64()),  # CLIP: the bundle's top probability; MLLM: the share of samples naming it
        ("confidence", pa.float64()),  # calibrated CLIP top probability: what routing compares
        ("top_k_names", pa.list_(pa.string())),  # the CLIP's ranking (Bundle.rank), kept when the MLLM answers
        ("top_k_scores", pa.list_(pa.float32())),
        ("abstained", pa.bool_()),
        ("new_name", pa.bool_()),  # an MLLM name outside the bundle's vocabulary
        ("source", pa.string()),  # clip | mllm | none
        ("model_version", pa.string()),  # the bundle's hash
        ("status", pa.string()),  # ok | bad_image | abstained | routed
        ("error", pa.string()),
        ("mllm_cost_usd", pa.float64()),  # every MLLM request made for this image (label.prices)
    ]
)
COLUMNS = SCHEMA.names


def predictions_uri(cfg: RunConfig) -> str:
    return cfg.paths.predictions


def predictions_table(uri: str, storage: Storage, part_rows: int = 5000, flush_interval_s: float = 30.0) -> PartTable:
    return PartTable(uri, storage, SCHEMA, part_rows, flush_interval_s)


def resume_rule(versions: dict[str, str]) -> ResumeRule:
    """A (domain, uri, image_id) with a row of the domain's current bundle version is never computed again;
    a new bundle version has no rows yet, so everything is computed again."""
    return ResumeRule(version_column="model_version", versions=versions)


def as_table(rows: list[dict[str, Any]] | pa.Table) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows.select(COLUMNS).cast(SCHEMA)
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)


def copy_identical(
    aliases: list[dict[str, Any]], table: PartTable, versions: dict[str, str]
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Rows for URIs whose bytes equal an image already classified (its row, with this URI), and the
    aliases whose original has no row yet (a failed run: the next run computes them)."""
    if not aliases:
        return as_table([]), []
    source = best_rows(table, resume_rule(versions), aliases)
    rows, missing = [], []
    for a in aliases:
        src = source.get((a["domain"], a["image_id"], 0))
        if src is None:
            missing.append(a)
            continue
        error = src.get("error")
        rows.append({**src, "uri": a["uri"], "error": error.replace(src["uri"], a["uri"]) if error else error,
                     "mllm_cost_usd": 0.0})  # fmt: skip
    return as_table(rows), missing


def read_predictions(uri: str, storage: Storage | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """The predictions table as a DataFrame: one row per image URI, from its newest part."""
    import pandas as pd

    storage = storage or Storage()
    cols = list(columns or COLUMNS)
    cols += [c for c in ("domain", "uri") if c not in cols]
    frames = [t.to_pandas() for _, _, _, t in predictions_table(uri, storage).iter_parts(cols)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    df = pd.concat(frames, ignore_index=True)
    # parts are oldest first: a URI in two parts (a bundle version being replaced) keeps its newest row
    return df.drop_duplicates(["domain", "uri"], keep="last").sort_values(["domain", "uri"]).reset_index(drop=True)
