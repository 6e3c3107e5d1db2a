"""The file trees: imagefolder (``<domain>/<name>/<file>``) and FiftyOne's image classification dataset
(``<domain>/data/<file>`` + ``<domain>/labels.json``). Local images are linked, unless ``copy``; images
on S3, or a tree on S3, are copied.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from near_ray.export.rows import counts
from near_ray.storage import Storage, StorageError, is_s3, join

log = logging.getLogger(__name__)

UNNAMED = "_abstained"  # imagefolder: images without a name, beside (never inside) the domains' class folders
_COPY_THREADS = 16  # copies are object-store round trips: overlap them


def folder_name(name: str) -> str:
    """A name as one folder: no path separators, not hidden (a listing would skip it), never empty."""
    s = name.replace("/", "-").replace("\\", "-").strip()
    return ("-" + s if s.startswith((".", "_")) else s) or "-"


def unique_files(rows: list[dict[str, Any]], folder_of: list[str], by_stem: bool = False) -> list[str]:
    """A file name per row, unique within its folder: the image's own, else ``<image_id>_<own>``.

    FiftyOne keys samples by the file name without its extension (``by_stem``): a.jpg and a.png clash.
    Identical bytes under one name (the same image_id) still clash: a counter separates those."""
    def key(f: str) -> str:
        return PurePosixPath(f).stem if by_stem else f

    base = [PurePosixPath(r["uri"]).name or "image" for r in rows]
    clash = Counter((folder, key(b)) for folder, b in zip(folder_of, base, strict=True))
    names, taken = [], set()
    for r, folder, b in zip(rows, folder_of, base, strict=True):
        name = b if clash[(folder, key(b))] == 1 else f"{(r['image_id'] or 'x')[:16]}_{b}"
        stem, suffix = PurePosixPath(name).stem, PurePosixPath(name).suffix
        n = 1
        while (folder, key(name)) in taken:
            n += 1
            name = f"{stem}-{n}{suffix}"
        taken.add((folder, key(name)))
        names.append(name)
    return names


def write_tree(rows: list[dict[str, Any]], out: str, st: Storage, copy: bool, fiftyone: bool) -> dict[str, Any]:
    """imagefolder: ``<domain>/<name>/<file>``; fiftyone: ``<domain>/data/<file>`` + ``<domain>/labels.json``."""
    keep = [r for r in rows if r["status"] != "bad_image"]  # unreadable: no viewer or loader can open them
    if fiftyone:
        folders = [join(out, r["domain"], "data") for r in keep]
    else:
        folders = [join(out, r["domain"], folder_name(r["name"])) if r["name"] is not None
                   else join(out, UNNAMED, r["domain"]) for r in keep]  # fmt: skip
    dests = [join(folder, f) for folder, f in zip(folders, unique_files(keep, folders, by_stem=fiftyone), strict=True)]
    missing = _place([r["uri"] for r in keep], dests, st, copy)
    linked = sum(1 for r, d in zip(keep, dests, strict=True) if _links(r["uri"], d, copy) and d not in missing)
    written: dict[str, Any] = {"domains": counts(rows), "linked": linked,
                               "copied": len(keep) - len(missing) - linked, "missing": len(missing)}  # fmt: skip
    if fiftyone:
        by_domain: dict[str, list[tuple[dict[str, Any], str]]] = defaultdict(list)
        for r, d in zip(keep, dests, strict=True):
            if d not in missing:
                by_domain[r["domain"]].append((r, PurePosixPath(d).name))
        for domain, items in by_domain.items():
            st.write_text(join(out, domain, "labels.json"), json.dumps(fiftyone_labels(items)))  # compact: fast
    else:
        written["unnamed_folder"] = join(out, UNNAMED)
    return written


def fiftyone_labels(items: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """FiftyOneImageClassificationDataset's labels.json: the classes, and per file stem the label's index,
    its confidence (the score) and attributes; null for an image without a name (a sample with no label)."""
    classes = sorted({r["name"] for r, _ in items if r["name"] is not None})
    index = {n: i for i, n in enumerate(classes)}
    labels: dict[str, Any] = {}
    for r, f in items:
        if r["name"] is None:
            labels[PurePosixPath(f).stem] = None
            continue
        attributes = {k: r[k] for k in ("image_id", "uri", "source", "model_version") if r[k] is not None}
        labels[PurePosixPath(f).stem] = {"label": index[r["name"]], "confidence": r["score"], "attributes": attributes}
    return {"classes": classes, "labels": labels}


def _links(src: str, dest: str, copy: bool) -> bool:
    """A local image into a local tree is linked (unless --copy); everything else is copied."""
    return not copy and not is_s3(src) and not is_s3(dest)


def _place(sources: list[str], dests: list[str], st: Storage, copy: bool) -> set[str]:
    """Link or copy each image to its destination; returns the destinations whose image is gone (counted
    and left out: a dangling link would fail a loader later, far from here)."""
    def one(src: str, dest: str) -> str | None:
        if not is_s3(src) and not os.path.exists(src):
            return dest
        if _links(src, dest, copy):
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.abspath(src), dest)
            return None
        try:
            data = st.read_bytes(src)
        except StorageError as e:
            if "no such" in str(e):  # deleted since it was classified: like a local image that is gone
                return dest
            raise
        st.write_bytes(dest, data)
        return None

    with ThreadPoolExecutor(max_workers=_COPY_THREADS) as pool:
        missing = {d for d in pool.map(one, sources, dests) if d is not None}
    if missing:
        log.warning("export: %d image(s) no longer exist and were left out", len(missing))
    return missing
