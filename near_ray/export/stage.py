"""``near-ray export``: check the output, read the rows, write the format, record what was written."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from near_ray.export.labelstudio import write_labelstudio
from near_ray.export.rows import SOURCES, ExportError, export_rows
from near_ray.export.trees import write_tree
from near_ray.storage import Storage, is_s3, join, storage_for

if TYPE_CHECKING:
    from near_ray.config import RunConfig

FORMATS = ("imagefolder", "labelstudio", "fiftyone")


def run_export(cfg: RunConfig, fmt: str, out: str, source: str = "predictions", domains: list[str] | None = None,
               copy: bool = False, local_root: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Write ``fmt`` for the rows of ``source`` under ``out``; the summary is also ``<out>/export.json``."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if source not in SOURCES:
        raise ExportError(f"--source {source!r}: expected one of {', '.join(SOURCES)}")
    st = storage_for(cfg)
    _check_out(out, st)
    rows = export_rows(cfg, source, domains, st)
    if fmt == "labelstudio":
        # the CLIP's rankings are the bundle's names: choices; the labels table's runners-up are raw answers
        written = write_labelstudio(rows, out, st, local_root, rankings=source == "predictions")
    else:
        written = write_tree(rows, out, st, copy, fiftyone=fmt == "fiftyone")
    summary = {"format": fmt, "source": source, "out": out, **written}
    st.write_json(join(out, "export.json"), summary)
    return summary


def _check_out(out: str, st: Storage) -> None:
    """Refuse an output that holds anything: files of an older export would sit beside the new ones."""
    if is_s3(out):
        if st.exists(out):
            raise ExportError(f"--out {out}: not empty (choose a new prefix, or delete it first)")
    elif Path(out).exists() and (Path(out).is_file() or any(Path(out).iterdir())):
        raise ExportError(f"--out {out}: not empty (choose a new folder, or delete it first)")
