"""`ray job submit -- python jobs/benchmark_fgvr.py --dataset cub200 --root s3://bucket/CUB_200_2011 -c configs/cub200.yaml --set storage.workdir=s3://bucket/near_ray/cub200`

FineR's benchmark protocol on a fine-grained dataset in its native layout, end to end, as a Ray job:
the same flags as `near-ray benchmark` (near_ray/data/benchmark.py). It samples the discovery set
(`eval.discovery_per_class` unlabeled images per class of the train split, a manifest of URIs: the
only images the MLLM sees), writes the test split's truth table, then runs label -> refine -> train
-> evaluate. `--prepare-only` stops after the manifest and the truth table.
"""

from __future__ import annotations

import sys

from near_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]], job=True))
