"""`ray job submit -- python jobs/train.py --config run.yaml [--method near ...] [--pretrain-captions URI]`

The train stage as a Ray job: the same flags as `near-ray train`. NeaR fine-tuning with Ray Train
(checkpoints under {workdir}/train/<method>, resumable) and the model bundle at
{workdir}/bundles/<method>; `--method` repeats to train several methods (baselines, ablations,
`zero_shot`). With --pretrain-captions, first the contrastive pretraining of the initial CLIP
(weights at {workdir}/pretrained/model.safetensors, then used as model.pretrained).
"""

from __future__ import annotations

import sys

from near_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], job=True))
