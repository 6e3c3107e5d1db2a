"""FineR's benchmark protocol on a fine-grained dataset in its native layout, end to end.

    ray job submit -- python jobs/benchmark_fgvr.py --dataset cub200 --root s3://bucket/CUB_200_2011 \\
        -c configs/cub200.yaml --set storage.workdir=s3://bucket/near_ray/cub200

The protocol of FineR (ICLR 2024, used by NeaR), on a benchmark in its native layout
(cub200, stanford_cars, stanford_dogs, flowers102, oxford_pets, folder):

1. read the dataset with near_ray's readers;
2. sample the discovery set: ``eval.discovery_per_class`` unlabeled images per class from the train
   split (seed ``label.seed``), written as a manifest of URIs (the only images the MLLM sees);
3. write the ground truth of the test split in the evaluation's format;
4. label → refine → train (NeaR, baselines, ablations) → evaluate, and write the report.

Everything goes below ``storage.workdir``: ``benchmark/<domain>/discovery.parquet`` (uri),
``benchmark/<domain>/truth.parquet`` (path, uri, domain, species, split), then the stages' artifacts
and ``report/``. ``--prepare-only`` stops after step 3 (e.g. to inspect the discovery set).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import pyarrow as pa

from near_ray.config import DomainConfig, RunConfig, load_config
from near_ray.data.readers import DATASETS, canonical_layout, discovery_set, read_dataset
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
    manifest = cfg.artifact(f"benchmark/{name}/discovery.parquet")
    truth = cfg.artifact(f"benchmark/{name}/truth.parquet")
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
    meta_class = next((d.meta_class for d in cfg.data.domains if d.name == name), None) or DATASETS[layout].meta_class
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", required=True, help="cub200, stanford_cars, stanford_dogs, flowers102, oxford_pets, folder, auto"
    )
    parser.add_argument(
        "--root", required=True, help="the dataset's root folder (s3://… or local), in its native layout"
    )
    parser.add_argument("--domain", default=None, help="domain name (default: birds, cars, dogs, flowers, pets)")
    parser.add_argument("--config", "-c", help="run config (YAML), e.g. configs/cub200.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    parser.add_argument("--prepare-only", action="store_true", help="write the discovery manifest and truth, then stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.set)
        summary: dict[str, Any] = {"benchmark": prepare_benchmark(cfg, args.dataset, args.root, args.domain)}
        if not args.prepare_only:
            from near_ray.pipeline import run_pipeline

            summary["pipeline"] = run_pipeline(cfg)
    except NearRayError as e:
        print(f"benchmark_fgvr: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
