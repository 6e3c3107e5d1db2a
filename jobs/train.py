"""`ray job submit -- python jobs/train.py --config run.yaml [--method near] [--pretrain-captions URI]`

NeaR fine-tuning with Ray Train (checkpoints under {workdir}/train/<method>, resumable) and the model
bundle at {workdir}/bundles/<method>. With --pretrain-captions, first the contrastive pretraining of
the initial CLIP (weights at {workdir}/pretrained/model.safetensors, then used as model.pretrained).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from near_ray.config import load_config
from near_ray.errors import NearRayError
from near_ray.runtime import ensure_ray, prefer_loopback


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", help="run config (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    parser.add_argument("--method", action="append", default=[], help="near, naive, near_no_knn, near_no_gmm, zero_shot")
    parser.add_argument("--pretrain-captions", default=None, help="captions.parquet to pretrain the initial CLIP on")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prefer_loopback()  # before the stage imports ray
    try:
        cfg = load_config(args.config, args.set)
        from near_ray.train.stage import export_zero_shot, run_pretrain, run_train

        ensure_ray()
        out: dict = {}
        if args.pretrain_captions:
            out["pretrain"] = run_pretrain(cfg, args.pretrain_captions, None)
            cfg.model.pretrained = out["pretrain"]["weights"]
        for method in args.method or [cfg.train.method]:
            if method == "zero_shot":
                out[method] = {"bundle": export_zero_shot(cfg)}
                continue
            method_cfg = cfg.model_copy(deep=True)
            method_cfg.train.method = method
            out[method] = run_train(method_cfg)
        print(json.dumps(out, indent=2, default=str))
    except NearRayError as e:
        print(f"near-ray train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
