"""Truth tables: a domain's known classes (``data.domains[].truth``), read one way for everyone who
uses them: the evaluation (its test split), the review page (every split) and the benchmarks.

A truth table is parquet or CSV with a class column (``species`` or ``class_name``) and an image column
(``uri`` or ``path``; a relative path is relative to the table's own folder), and optionally ``domain``
(rows of other domains are ignored) and ``split``.
"""

from __future__ import annotations

import io
import posixpath
from pathlib import Path

import pandas as pd

from near_ray.config import DomainConfig
from near_ray.errors import NearRayError
from near_ray.storage import Storage, is_s3, join


class TruthError(NearRayError):
    """A truth table that cannot be read or lacks the columns it needs."""


def uri_key(uri: str) -> str:
    """One spelling per image: the label stage joins relative manifest paths, a truth table may not."""
    return uri if is_s3(uri) else str(Path(uri).resolve())


def read_table(uri: str, storage: Storage) -> pd.DataFrame:
    """A parquet or CSV table (by its extension) as a DataFrame."""
    if uri.lower().endswith(".csv"):
        try:
            return pd.read_csv(io.BytesIO(storage.read_bytes(uri)))
        except NearRayError:
            raise
        except Exception as e:  # a CSV pandas cannot parse
            raise TruthError(f"{uri}: not a readable CSV table ({e})") from e
    return storage.read_parquet(uri).to_pandas()


def truth_table(domain: DomainConfig, storage: Storage, split: str | None = None) -> pd.DataFrame:
    """The domain's truth rows (those of ``split`` only, when given and the table has splits): columns
    uri (resolved against the table's folder), domain, species. Without a table, a dataset layout's class
    names are the truth (every split of it, whatever split the domain names)."""
    if not domain.truth:
        return _layout_truth(domain, storage, split)
    where = f"data.domains[{domain.name}].truth {domain.truth}"
    try:
        truth = read_table(domain.truth, storage)
    except TruthError:
        raise
    except NearRayError as e:
        raise TruthError(f"{where}: {e}") from e
    species_col = next((c for c in ("species", "class_name") if c in truth.columns), None)
    path_col = next((c for c in ("uri", "path") if c in truth.columns), None)
    if species_col is None or path_col is None:
        raise TruthError(f"{where}: needs columns species (or class_name) and path (or uri); has {list(truth.columns)}")
    if "domain" in truth.columns:
        truth = truth[truth["domain"] == domain.name]
    if split is not None and "split" in truth.columns:
        truth = truth[truth["split"] == split]
    base = posixpath.dirname(domain.truth) if is_s3(domain.truth) else str(Path(domain.truth).parent)
    return pd.DataFrame({
        "uri": [p if is_s3(p) or p.startswith("/") else join(base, p) for p in truth[path_col].astype(str)],
        "domain": domain.name,
        "species": truth[species_col].astype(str).to_numpy(),
    })


def _layout_truth(domain: DomainConfig, storage: Storage, split: str | None) -> pd.DataFrame:
    from near_ray.data.readers import DatasetError, read_dataset

    try:
        rows = read_dataset(domain.layout or "unlabeled", domain.uri, storage, domain=domain.name)
    except DatasetError as e:
        raise TruthError(f"data.domains[{domain.name}].layout {domain.layout}: {e}") from e
    if split is not None and (rows["split"] != "").any():
        rows = rows[rows["split"] == split]
    rows = rows[rows["class_name"].notna()]
    if rows.empty and not split:
        raise TruthError(f"data.domains[{domain.name}].layout {domain.layout}: the dataset at {domain.uri} names no "
                         "classes (an unlabeled layout): set truth to a table, or leave evaluation out")
    return pd.DataFrame({"uri": rows["uri"].tolist(), "domain": domain.name,
                         "species": rows["class_name"].astype(str).to_numpy()})
