"""The synthetic pretraining corpus: the offline stand-in for the web data a production CLIP learned from."""

from __future__ import annotations

from near_ray.sim.config import DemoConfig
from near_ray.storage import join, storage_for
from near_ray.train.pretrain import pretrain


def pretrain_on_synthetic_corpus(cfg: DemoConfig, corpus: str) -> str:
    """Weights of a small CLIP pretrained on a synthetic image-caption corpus (made at ``corpus`` if absent).

    The corpus (``cfg.synth.pretrain_*``: another seed, more domains) stands in for the web data a
    production CLIP was pretrained on; it never holds the images a run labels or tests on. Returns the
    weights URI (``{workdir}/pretrained/model.safetensors``); both steps are skipped when done.
    """
    from near_ray.sim.synth import generate

    st = storage_for(cfg)
    weights = cfg.artifact("pretrained/model.safetensors")
    if st.exists(weights):
        return weights
    s = cfg.synth
    if not st.exists(join(corpus, "captions.parquet")):
        generate(out=corpus, domains=s.pretrain_domains, species=s.pretrain_species,
                 images_per_species=s.pretrain_images_per_species, image_size=s.image_size,
                 seed=s.pretrain_seed, test_fraction=0.05, storage=st)
    pretrain(cfg, captions=join(corpus, "captions.parquet"), out=weights)
    return weights
