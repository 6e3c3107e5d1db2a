"""A run's collections: which images each domain (``data.domains``) holds, from the listing of its
prefix or from its manifest, streamed in chunks so that no process holds a 100 M-image listing.

Every stage that walks a collection reads it here: label (what to ask the MLLM), classify (what to
name), preflight and the cost estimate (whether there are images, how many). Listing rules
(extensions, hidden names, links) are Storage.list's; a manifest's paths are held to its domain's
folder the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from near_ray.config import DomainConfig, RunConfig
from near_ray.errors import NearRayError
from near_ray.parts.keys import KeySet, digests
from near_ray.storage import Storage, inside, is_s3, join

log = logging.getLogger(__name__)


class EmptyDomainError(NearRayError):
    """A domain whose prefix (or manifest) holds no images."""


class ManifestError(NearRayError):
    """A domain manifest that cannot be read."""



def check_domains(cfg: RunConfig, storage: Storage) -> None:
    """Fail before any work when a domain has no images (one listing page, or its manifest, each)."""
    if not cfg.data.domains:
        raise EmptyDomainError("data.domains: no domains configured (name, uri, meta_class)")
    for d in cfg.data.domains:
        if next(iter(domain_uris(d, cfg, storage)), None) is None:
            where = (
                f"manifest {d.manifest}" if d.manifest
                else f"the {d.layout} dataset at {d.uri}" + (f" (split {d.split})" if d.split else "") if d.layout
                else f"{d.uri} (extensions {', '.join(cfg.data.image_extensions)})"
            )
            raise EmptyDomainError(f"data.domains[{d.name}]: no images in {where}")


def domain_uris(d: DomainConfig, cfg: RunConfig, storage: Storage) -> Iterator[str]:
    """A domain's image URIs: its manifest's ``uri`` column when it has one (each URI once, in the order
    of its first row: a repeated row would be asked and paid for twice), the dataset's own list when it has a
    layout (its split's only, when it names one), else the listing of its prefix."""
    if d.layout:
        yield from layout_rows(d, storage)["uri"]
        return
    if not d.manifest:
        for obj in storage.list(d.uri, suffixes=cfg.data.image_extensions):
            yield obj.uri
        return
    seen = KeySet()  # 16 bytes a URI, not a Python string: a manifest of 100M rows fits one driver
    outside = 0
    for batch in manifest_batches(d.manifest, storage):
        full = []
        for uri in batch:
            uri = uri if is_s3(uri) or uri.startswith("/") else join(d.uri, uri)
            if not is_s3(uri) and not is_s3(d.uri) and not inside(uri, d.uri):
                outside += 1  # the listing's rule: a local path (links resolved) outside the domain's folder is not read
                continue
            full.append(uri)
        keys = digests(full)
        known, new = seen.get(keys)[0], {}
        for uri, key, old in zip(full, map(tuple, keys.tolist()), known, strict=True):
            if not old and key not in new:
                new[key] = uri
                yield uri
        seen.add(np.array(list(new), dtype=np.uint64).reshape(-1, 2))
    if outside:
        log.warning("data.domains[%s]: skipped %d path%s of manifest %s outside the domain's folder %s (links "
                    "resolved)", d.name, outside, "" if outside == 1 else "s", d.manifest, d.uri)


def layout_rows(d: DomainConfig, storage: Storage, split: str | None = None):  # -> pd.DataFrame
    """The rows (uri, class_name, split, domain) of a domain's dataset layout, those of ``split`` (default: the
    domain's own ``split``) only. A native layout's index is read whole: datasets of that kind are benchmark-sized."""
    from near_ray.data.readers import read_dataset

    table = read_dataset(d.layout or "unlabeled", d.uri, storage, domain=d.name)
    split = split or d.split
    return table[table["split"] == split] if split else table


def manifest_batches(manifest: str, storage: Storage) -> Iterator[list[str]]:
    """The ``uri`` column of a parquet or CSV manifest, in order, in batches, streamed from storage: a
    parquet manifest a row group at a time, a CSV one a block at a time, so a manifest of 100 M rows is
    never held whole (in bytes or decoded) by the process that walks it."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not storage.exists(manifest):
        storage.read_bytes(manifest)  # the storage's own "no such file" error, naming the manifest
    fs, path = storage.resolve(manifest)
    csv = manifest.lower().endswith(".csv")
    try:
        with fs.open_input_stream(path) if csv else fs.open_input_file(path) as f:  # closed however the walk ends
            if csv:
                batches = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=4 << 20),
                                         convert_options=pacsv.ConvertOptions(include_columns=["uri"]))
            else:
                file = pq.ParquetFile(f)
                if "uri" not in file.schema_arrow.names:
                    raise KeyError(f"columns {file.schema_arrow.names}")
                batches = file.iter_batches(batch_size=10_000, columns=["uri"])
            for batch in batches:
                yield [u for u in batch.column(0).to_pylist() if u]
    except (pa.ArrowInvalid, KeyError) as e:
        raise ManifestError(f"{manifest}: not a parquet/CSV table with a 'uri' column: {e}") from None
    except OSError as e:
        raise ManifestError(f"{manifest}: cannot be read: {e}") from None


def listing_size(cfg: RunConfig, storage: Storage) -> int:
    """Rows of the domains' parquet manifests, read from their footers (0 for a listed prefix: unknown until
    listed). Sizes a first run's resume ledger."""
    import pyarrow.parquet as pq

    total = 0
    for d in cfg.data.domains:
        if d.manifest and not d.manifest.lower().endswith(".csv"):
            fs, path = storage.resolve(d.manifest)
            try:
                with fs.open_input_file(path) as f:
                    total += pq.ParquetFile(f).metadata.num_rows
            except (OSError, pa.ArrowInvalid):
                continue  # the listing itself says what is wrong with the manifest
    return min(total, cfg.data.max_images or total)


def listing_chunks(cfg: RunConfig, storage: Storage) -> Iterator[list[dict[str, str]]]:
    """Every domain's image URIs, in chunks of ``label.listing_chunk``, capped at ``data.max_images``."""
    chunk: list[dict[str, str]] = []
    left = cfg.data.max_images if cfg.data.max_images is not None else math.inf
    for d in cfg.data.domains:
        for uri in domain_uris(d, cfg, storage):
            if left <= 0:
                break
            left -= 1
            chunk.append({"uri": uri, "domain": d.name})
            if len(chunk) >= cfg.label.listing_chunk:
                yield chunk
                chunk = []
    if chunk:
        yield chunk
