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
    weights = cfg.paths.pretrained
    if st.exists(weights):
        return weights
    s = cfg.synth
    if not st.exists(join(corpus, "captions.parquet")):
        generate(out=corpus, domains=s.pretrain_domains, species=s.pretrain_species,
                 images_per_species=s.pretrain_images_per_species, image_size=s.image_size,
                 seed=s.pretrain_seed, test_fraction=0.05, storage=st)
    pretrain(cfg, captions=join(corpus, "captions.parquet"), out=weights)
    return weights


def synthetic_texts(seeds: range = range(64), species: int = 24) -> list[str]:
    """Every kind of text a small text tower meets in the synthetic world: species names, synonyms,
    genus and hallucinated names in the prompt template, and attribute captions, over many taxonomy
    seeds. Its BPE tokens are the text vocabulary of ``near-tiny`` (``scripts/near_tiny_tokens.py``)."""
    import numpy as np

    from near_ray.sim.render import BACKGROUNDS
    from near_ray.sim.synth import _captions
    from near_ray.sim.taxonomy import PALETTE, SPECIES_PREFIXES, TEMPLATES, build_taxonomy

    texts: list[str] = []
    for domain, template in TEMPLATES.items():
        texts += [f"a photo of a {p} {c.name} {h}." for p in SPECIES_PREFIXES for c in PALETTE for h in template.heads]
        for seed in seeds:
            tax = build_taxonomy(domain, species, seed)
            rng = np.random.default_rng(seed)
            for sp in tax.species:
                names = [sp.canonical, *sp.synonyms, sp.genus_common, sp.genus, sp.family, sp.scientific_name]
                texts += [f"a photo of a {n}." for n in names]
                texts += _captions(sp, tax.template, str(rng.choice(list(BACKGROUNDS))), rng)
    return texts
