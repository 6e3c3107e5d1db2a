"""The Python API's readers that take a run config or a URI (``near_ray.read_predictions``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from near_ray.config import RunConfig
from near_ray.storage import storage_for

if TYPE_CHECKING:
    import pandas as pd

    from near_ray.storage import Storage


def read_predictions(
    cfg_or_uri: RunConfig | str, storage: Storage | None = None, columns: list[str] | None = None
) -> pd.DataFrame:
    """The classify stage's predictions table: one row per image (its newest row), sorted by domain and URI.

    Given a RunConfig, the table of its workdir; given a URI, the table there.
    """
    from near_ray.classify.table import predictions_uri
    from near_ray.classify.table import read_predictions as read_table
    from near_ray.storage import Storage

    if isinstance(cfg_or_uri, str):
        return read_table(cfg_or_uri, storage or Storage(), columns)
    return read_table(predictions_uri(cfg_or_uri), storage or storage_for(cfg_or_uri), columns)
