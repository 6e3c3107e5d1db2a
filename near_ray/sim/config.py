"""The demo's config: a run config plus the ``synth`` section that describes its stand-in world.

A production run config has no ``synth`` section (``RunConfig`` forbids it); the demo, the
benchmarks and the tests validate against ``DemoConfig``.
"""

from __future__ import annotations

from pydantic import Field

from near_ray.config import ModelConfig, RunConfig, Section


class SynthConfig(Section):
    """The synthetic benchmark and simulated annotator used by the offline demo and benchmarks."""

    domains: list[str] = Field(default_factory=lambda: ["birds", "flowers"])
    species: int = Field(8, ge=2)  # per domain
    images_per_species: int = Field(24, ge=2)  # split between train (discovery) and test
    image_size: int = Field(64, ge=16)
    test_fraction: float = Field(0.5, gt=0, lt=1)
    seed: int = 0
    annotator_profile: str = "strong"  # a profile name (near_ray/sim/profiles) or a YAML file
    annotator_faults: str | None = None  # fault injection as JSON, e.g. '{"rate_429": 0.05}'
    # The pretraining corpus: a separate, larger image-caption set (another seed, more domains), the
    # offline stand-in for the web data a production CLIP was pretrained on. Captions never name species.
    pretrain_domains: list[str] = Field(default_factory=lambda: ["birds", "flowers", "butterflies", "mushrooms"])
    pretrain_species: int = Field(12, ge=2)
    pretrain_images_per_species: int = Field(30, ge=2)
    pretrain_seed: int = 1000


class DemoConfig(RunConfig):
    synth: SynthConfig = Field(default_factory=SynthConfig)
    # The stand-in world's CLIP: the near-tiny model near_ray ships, pretrained on the synthetic caption
    # corpus (a production config names an open_clip tag; random init is only ever asked for by name).
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(arch="near-tiny", pretrained="synthetic"))
