"""`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/pipeline.py -c s3://bucket/run.yaml`

The whole run as one Ray job, the same as `near-ray run`: label → refine → train (NeaR, and the
baselines the evaluation asks for) → evaluate when ground truth is configured (data.domains[].truth)
→ the later stages the pipeline runs when they are configured. Every stage skips what
`storage.workdir` already holds, so a job resubmitted with the same config after `ray job stop` or
a lost driver continues where it stopped and pays no MLLM answer twice. `--config` is a local path
or an s3:// URI; `--set section.key=value` overrides any field. The job logs its config and workdir
first and one summary line last; a bad config or an unreachable bucket fails it with one line.
"""

from __future__ import annotations

import sys

from near_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]], job=True))
