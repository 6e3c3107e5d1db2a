"""near_ray: vocabulary-free fine-grained visual recognition (NeaR) at cluster scale on Ray.

The Python API, one name per step of a run (each loads its stage on first use, so ``import near_ray``
stays light and works in the label stage's lean environment)::

    import near_ray
    cfg = near_ray.load_config("my-run.yaml")
    near_ray.run_pipeline(cfg)               # or the stages one by one:
    near_ray.run_label(cfg); near_ray.run_refine(cfg); near_ray.run_train(cfg); near_ray.run_classify(cfg)
    table = near_ray.read_predictions(cfg)   # a pandas DataFrame, one row per image
    bundle = near_ray.load_bundle("s3://…/bundles/near")

docs/python.md lists each function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "RunConfig": "near_ray.config",
    "load_config": "near_ray.config",
    "run_label": "near_ray.label.stage",
    "run_refine": "near_ray.refine.stage",
    "run_train": "near_ray.train.stage",
    "run_classify": "near_ray.classify.stage",
    "run_evaluate": "near_ray.eval.stage",
    "run_pipeline": "near_ray.pipeline",
    "load_bundle": "near_ray.model.bundle",
    "read_predictions": "near_ray.api",
    "read_labels": "near_ray.label.table",
}
__all__ = [
    "__version__", "RunConfig", "load_config", "run_label", "run_refine", "run_train", "run_classify",
    "run_evaluate", "run_pipeline", "load_bundle", "read_predictions", "read_labels",
]

if TYPE_CHECKING:
    from near_ray.api import read_predictions
    from near_ray.classify.stage import run_classify
    from near_ray.config import RunConfig, load_config
    from near_ray.eval.stage import run_evaluate
    from near_ray.label.stage import run_label
    from near_ray.label.table import read_labels
    from near_ray.model.bundle import load_bundle
    from near_ray.pipeline import run_pipeline
    from near_ray.refine.stage import run_refine
    from near_ray.train.stage import run_train


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'near_ray' has no attribute '{name}'")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
