"""`ray job submit -- python jobs/refine.py --config run.yaml [--set section.key=value ...]`

The refine stage as a Ray job: the same flags as `near-ray refine` (vocabulary, CLIP embeddings,
FAISS kNN and candidate sets from the labels table of a run, under `storage.workdir`).
"""

from __future__ import annotations

import sys

from near_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["refine", *sys.argv[1:]], job=True))
