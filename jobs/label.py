"""`ray job submit -- python jobs/label.py --config run.yaml [--set section.key=value ...]`

The label stage as a Ray job: the same flags as `near-ray label`; the job joins the cluster it was
submitted to (RAY_ADDRESS) and writes the labels table and its summary under `storage.workdir`.
"""

from __future__ import annotations

import sys

from near_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]], job=True))
