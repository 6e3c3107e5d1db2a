"""`ray job submit -- python jobs/evaluate.py --config run.yaml [--out URI] [--set section.key=value ...]`

The evaluate stage as a Ray job, the same flags as `near-ray evaluate`: cACC / sACC / NMI / ARI of
every configured method (eval.methods) on the domains' ground truth, with report.json, report.md
and plots under {workdir}/report (or --out). The bundles it compares must be on storage already
(jobs/train.py or jobs/pipeline.py).
"""

from __future__ import annotations

import sys

from near_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]], job=True))
