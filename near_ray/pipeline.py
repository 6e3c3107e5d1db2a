"""The whole pipeline from one config: label → refine → train (NeaR and baselines) → evaluate (→ classify,
when configured) (→ serve).

Each stage reads the previous stage's artifact from storage and skips work already done there, so a
second run of the same config only does what is missing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from near_ray.config import RunConfig
from near_ray.console import stage
from near_ray.runtime import ensure_ray
from near_ray.storage import storage_for
from near_ray.train.methods import TRAINED

log = logging.getLogger(__name__)



def _timed(name: str, fn, *args: Any, wall: dict[str, float] | None = None, **kwargs: Any) -> Any:
    """Run one stage between its console lines; its wall time (s) goes into ``wall[name]``."""
    t0 = time.monotonic()
    with stage(name):
        out = fn(*args, **kwargs)
    if wall is not None:
        wall[name] = round(time.monotonic() - t0, 2)
    return out


def methods_to_train(cfg: RunConfig) -> list[str]:
    """``train.method`` (NeaR by default) always; the baselines and ablations the evaluation asks for."""
    return [cfg.train.method] + [m for m in cfg.eval.methods if m in TRAINED and m != cfg.train.method]


def run_pipeline(cfg: RunConfig, serve: bool = False) -> dict[str, Any]:
    from near_ray.label.stage import run_label
    from near_ray.refine.stage import run_refine
    from near_ray.train.stage import export_zero_shot, run_train

    ensure_ray()
    st = storage_for(cfg)
    wall: dict[str, float] = {}  # seconds per stage, in order
    summary: dict[str, Any] = {"workdir": cfg.storage.workdir, "wall_s": wall}
    summary["label"] = _timed("label", run_label, cfg, wall=wall)
    summary["refine"] = _timed("refine", run_refine, cfg, wall=wall)
    summary["train"] = {}
    for method in methods_to_train(cfg):
        if st.exists(cfg.artifact(f"bundles/{method}/config.json")):
            log.info("train %s: bundle already on storage, skipped", method)
            summary["train"][method] = {"skipped": True, "bundle": cfg.artifact(f"bundles/{method}")}
            continue
        method_cfg = cfg.model_copy(deep=True)
        method_cfg.train.method = method  # type: ignore[assignment]
        summary["train"][method] = _timed(f"train {method}", run_train, method_cfg, wall=wall)
    if "zero_shot" in cfg.eval.methods:
        summary["train"]["zero_shot"] = {"bundle": _timed("zero-shot bundle", export_zero_shot, cfg, wall=wall)}
    if any(d.truth for d in cfg.data.domains):
        from near_ray.eval.stage import run_evaluate

        summary["evaluate"] = _timed("evaluate", run_evaluate, cfg, None, wall=wall)
    else:
        log.info("evaluate: no ground truth configured (data.domains[].truth), skipped")
    if cfg.classify.enabled or cfg.classify.domains:  # last: names the whole collection with the bundle
        from near_ray.classify.stage import run_classify

        summary["classify"] = _timed("classify", run_classify, cfg, wall=wall)
    if serve:
        from near_ray.serve.app import run_serve

        run_serve(cfg, write_config=None, block=True)
    return summary
