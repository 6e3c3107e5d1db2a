"""FineR's benchmark protocol (ICLR 2024, used by NeaR) on a fine-grained dataset in its native layout
(cub200, stanford_cars, stanford_dogs, flowers102, oxford_pets, folder): the discovery set, sampled
``eval.discovery_per_class`` unlabeled images per class from the train split (seed ``label.seed``) and
written as a manifest of URIs, the only images the MLLM sees; the test split's truth table in the
evaluation's format. ``near-ray benchmark`` then runs label -> refine -> train -> evaluate on them.

Everything goes below ``storage.workdir``: ``benchmark/<domain>/discovery.parquet`` (uri) and
``benchmark/<domain>/truth.parquet`` (path, uri, domain, species, split).
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from near_ray.config import DomainConfig, RunConfig
from near_ray.data.readers import LAYOUTS, canonical_layout, discovery_set, read_dataset
from near_ray.errors import NearRayError
from near_ray.storage import storage_for

log = logging.getLogger("near_ray.benchmark")


def prepare_benchmark(cfg: RunConfig, dataset: str, root: str, domain: str | None = None) -> dict[str, Any]:
    """Steps 1-3: discovery manifest and test truth table on storage; points ``cfg.data.domains`` at them."""
    st = storage_for(cfg)
    layout = canonical_layout(dataset)
    table = read_dataset(layout, root, st, domain=domain)
    layout = table.attrs["layout"]
    name = str(table["domain"].iat[0])
    discovery = discovery_set(table, per_class=cfg.eval.discovery_per_class, seed=cfg.label.seed)
    test = table[(table["split"] == "test") & table["class_name"].notna()]
    if test.empty:
        raise NearRayError(f"{root}: the {layout} dataset has no labeled test split to evaluate on")
    manifest = cfg.paths.benchmark_manifest(name)
    truth = cfg.paths.benchmark_truth(name)
    # The manifest carries URIs only: the labeler must never see a class name.
    st.write_parquet(manifest, pa.table({"uri": discovery["uri"].tolist()}))
    st.write_parquet(
        truth,
        pa.table(
            {
                "path": test["uri"].tolist(),  # absolute: the evaluation resolves relative paths only
                "uri": test["uri"].tolist(),
                "domain": [name] * len(test),
                "species": test["class_name"].tolist(),
                "split": ["test"] * len(test),
            }
        ),
    )
    if cfg.data.domains:
        log.info("data.domains of the config replaced by the %s dataset at %s", layout, root)
    meta_class = next((d.meta_class for d in cfg.data.domains if d.name == name), None) or LAYOUTS[layout].meta_class
    cfg.data.domains = [DomainConfig(name=name, uri=root, meta_class=meta_class, truth=truth, manifest=manifest)]
    cfg.eval.dataset = cfg.eval.dataset or layout
    return {
        "dataset": layout,
        "root": root,
        "domain": name,
        "classes": int(table["class_name"].nunique()),
        "images": int(len(table)),
        "discovery_images": int(len(discovery)),
        "discovery_per_class": cfg.eval.discovery_per_class,
        "test_images": int(len(test)),
        "manifest": manifest,
        "truth": truth,
    }
