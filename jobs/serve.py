"""`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/serve.py -c run.yaml`

Deploys the Serve application (`near-ray serve`: a model bundle behind FastAPI, batching,
autoscaling) onto the cluster the job runs on, waits until it answers /readyz, and exits, leaving
the application running: Serve's controller owns it, not this job. `--bundle URI` serves another
bundle than {workdir}/bundles/<train.method>; `--wait-s` bounds the wait. Stop it with
`serve shutdown` (or `serve delete <app>`); a second submission replaces it in place.
"""

from __future__ import annotations

import sys

from near_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--detach", *sys.argv[1:]], job=True))
