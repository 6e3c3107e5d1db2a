"""Where each stage's artifacts live below ``storage.workdir``: the on-disk layout, named in one place.

``cfg.paths.vocabulary`` rather than ``cfg.artifact("refine/vocabulary.json")``: every stage finds what
another wrote through these members, so a stage can run alone and a resumed run finds its old files. Each
member is exactly the URI ``RunConfig.artifact`` gives for its name; renaming one moves files that
existing workdirs hold (tests/test_layout.py keeps artifact names out of the stages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from near_ray.config import RunConfig


@dataclass(frozen=True)
class RunPaths:
    """The artifacts of one run config (``RunConfig.paths``); a config whose workdir changes gets new ones."""

    cfg: RunConfig

    # ----------------------------------------------------------------------------------------- label
    @property
    def labels(self) -> str:
        """The labels table (a part table: ``domain=<name>/part-….parquet``), the label stage's output."""
        return self.cfg.artifact("labels")

    @property
    def label_summary(self) -> str:
        """What the last label run did: counts, tokens, spend, pace (written last)."""
        return self.cfg.artifact("labels/_summary.json")

    @property
    def label_selection(self) -> str:
        """The images ``label.select`` chose to ask about, with the fingerprint of the settings that chose them."""
        return self.cfg.artifact("labels/_selection.json")

    def manifest(self, name: str) -> str:
        """A generated image manifest (``manifests/<name>.parquet``) that a label run reads as a domain's images."""
        return self.cfg.artifact(f"manifests/{name}.parquet")

    # ---------------------------------------------------------------------------------------- refine
    @property
    def refine(self) -> str:
        """The refine stage's folder: vocabulary, merges, embeddings, neighbour graph, candidate sets."""
        return self.cfg.artifact("refine")

    def refine_file(self, name: str) -> str:
        """A file of refine's folder by name (``near_ray.refine.stage.OUTPUTS`` lists the outputs)."""
        return self.cfg.artifact(f"refine/{name}")

    @property
    def vocabulary(self) -> str:
        """The discovered vocabulary: one entry per class name, with its domain, synonyms and support."""
        return self.cfg.artifact("refine/vocabulary.json")

    @property
    def merges(self) -> str:
        """Which raw names refine merged into which vocabulary name."""
        return self.cfg.artifact("refine/merges.json")

    @property
    def candidates(self) -> str:
        """Per labeled image, its candidate class set (the training targets)."""
        return self.cfg.artifact("refine/candidates.parquet")

    @property
    def neighbors(self) -> str:
        """The kNN graph over the labeled images' embeddings."""
        return self.cfg.artifact("refine/neighbors.parquet")

    @property
    def embeddings(self) -> str:
        """The labeled images' image embeddings."""
        return self.cfg.artifact("refine/embeddings.parquet")

    @property
    def embeddings_record(self) -> str:
        """The fingerprint the embeddings were computed under (refine's resume record)."""
        return self.cfg.artifact("refine/_embeddings.json")

    @property
    def neighbors_record(self) -> str:
        """The fingerprint the neighbour graph was computed under (refine's resume record)."""
        return self.cfg.artifact("refine/_neighbors.json")

    @property
    def refine_summary(self) -> str:
        """Refine's summary and fingerprints, written last: its presence means the outputs are whole."""
        return self.cfg.artifact("refine/_summary.json")

    # ----------------------------------------------------------------------------------------- train
    @property
    def pretrained(self) -> str:
        """The weights ``near-ray pretrain`` writes by default (and the simulated corpus trains)."""
        return self.cfg.artifact("pretrained/model.safetensors")

    @property
    def train(self) -> str:
        """Ray Train's storage folder: one run folder of checkpoints per training run."""
        return self.cfg.artifact("train")

    def checkpoints(self, name: str) -> str:
        """The checkpoints of training run ``name`` (``near_ray.train.runner.run_name``)."""
        return self.cfg.artifact(f"train/{name}")

    @property
    def tensorboard(self) -> str:
        """TensorBoard event files, unless ``train.tracking.uri`` names another place."""
        return self.cfg.artifact("tensorboard")

    @property
    def bundles(self) -> str:
        """The model bundles, one folder per method."""
        return self.cfg.artifact("bundles")

    def bundle(self, method: str) -> str:
        """The model bundle trained with ``method`` (``zero_shot``: the untrained CLIP and the vocabulary)."""
        return self.cfg.artifact(f"bundles/{method}")

    @property
    def select(self) -> str:
        """The label-free choice's workdir (``train.select``): the fit slice's refine outputs and bundles."""
        return self.cfg.artifact("select")

    @property
    def choice(self) -> str:
        """The label-free choice: the method chosen and each candidate's agreement."""
        return self.cfg.artifact("select/choice.json")

    # -------------------------------------------------------------------------------------- classify
    @property
    def predictions(self) -> str:
        """The predictions table (a part table), the classify stage's output."""
        return self.cfg.artifact("predictions")

    def calibration(self, model_version: str) -> str:
        """The temperature fitted for the bundle of ``model_version``, and its calibration errors."""
        return self.cfg.artifact(f"classify/calibration/{model_version}.json")

    @property
    def cascade(self) -> str:
        """The workdir of the classify cascade's own label runs (the MLLM's answers for unsure images)."""
        return self.cfg.artifact("classify/mllm")

    @property
    def cascade_labels(self) -> str:
        """The labels table of the classify cascade (``labels`` below ``cascade``)."""
        return self.cfg.artifact("classify/mllm/labels")

    # ------------------------------------------------------------------------------------------ eval
    @property
    def direct_mllm(self) -> str:
        """The workdir of the direct-MLLM baseline's label run over the test images."""
        return self.cfg.artifact("eval/direct_mllm")

    def benchmark_manifest(self, domain: str) -> str:
        """A prepared benchmark's discovery images of ``domain`` (a manifest)."""
        return self.cfg.artifact(f"benchmark/{domain}/discovery.parquet")

    def benchmark_truth(self, domain: str) -> str:
        """A prepared benchmark's test images of ``domain`` with their true class."""
        return self.cfg.artifact(f"benchmark/{domain}/truth.parquet")

    @property
    def report(self) -> str:
        """The evaluation report's folder: report.json, report.md, predictions, plots."""
        return self.cfg.artifact("report")

    @property
    def report_json(self) -> str:
        """The evaluation report's numbers."""
        return self.cfg.artifact("report/report.json")

    @property
    def report_md(self) -> str:
        """The evaluation report as tables, for a person."""
        return self.cfg.artifact("report/report.md")

    @property
    def review(self) -> str:
        """The review page: a self-contained HTML page of the discovered names."""
        return self.cfg.artifact("review/index.html")

    @property
    def run_summary(self) -> str:
        """What ``near-ray run`` did, stage by stage (JSON)."""
        return self.cfg.artifact("run_summary.json")
