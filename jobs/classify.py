"""`ray job submit -- python jobs/classify.py --config run.yaml [--set section.key=value ...]`

The classify stage as a Ray job: the same flags as `near-ray classify`; the job joins the cluster it
was submitted to (RAY_ADDRESS), names every image of the classify domains with the bundle, runs the
cascade when configured and writes the predictions table and its summary under `storage.workdir`.
"""

from __future__ import annotations

import sys

from near_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["classify", *sys.argv[1:]], job=True))
