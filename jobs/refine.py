"""`ray job submit -- python jobs/refine.py --config run.yaml [--set section.key=value ...]`

Vocabulary, CLIP embeddings, FAISS kNN and candidate sets from the labels table of a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from near_ray.config import load_config
from near_ray.errors import NearRayError
from near_ray.refine.stage import run_refine
from near_ray.runtime import ensure_ray


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", help="run config (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.set)
        ensure_ray()
        print(json.dumps(run_refine(cfg), indent=2, default=str))
    except NearRayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
