"""The review: one static HTML page a person reads before trusting the discovered names.

``write_review(cfg)`` reads a run's artifacts (labels, refine, the bundle, predictions, truth where it
exists; ``gather``), weighs each image's views against its name (``evidence``), embeds thumbnails
(``thumbs``) and writes ``{workdir}/review/index.html`` (``page``): self-contained, so it opens from
local disk or from S3 with no server and no side files. See docs/review.md.
"""

from __future__ import annotations

import logging
import time

from near_ray.config import RunConfig
from near_ray.eval.review.evidence import DomainReview, review_domain
from near_ray.eval.review.gather import ReviewError, gather
from near_ray.eval.review.page import CHECK_THUMBS, examples, render
from near_ray.eval.review.thumbs import thumbnails
from near_ray.storage import storage_for

__all__ = ["ReviewError", "review_uri", "write_review"]

log = logging.getLogger(__name__)

SUSPECTS = 20  # suspect images listed per domain


def review_uri(cfg: RunConfig) -> str:
    return cfg.paths.review


def _pictured(reviews: list[DomainReview]) -> set[str]:
    """The URIs the page shows: each name's examples and the suspects."""
    uris = set()
    for r in reviews:
        for s in r.names:
            top, bottom = examples(s)
            uris.update(v.uri for v in top + bottom)
        uris.update(v.uri for v in r.suspects[: max(SUSPECTS, CHECK_THUMBS)])
    return uris


def write_review(cfg: RunConfig, out: str | None = None) -> str:
    """Write the review page of ``cfg``'s run (default ``{workdir}/review/index.html``); returns its URI."""
    t0 = time.monotonic()
    st = storage_for(cfg)
    out = out or review_uri(cfg)
    domains, run = gather(cfg, st)
    if not domains:
        raise ReviewError(f"review: the labels table of {cfg.storage.workdir} has no rows of the configured domains")
    minimum = {"refine": cfg.refine.min_support, "train": cfg.train.min_label_support}
    reviews = [review_domain(d, minimum, SUSPECTS) for d in domains]
    thumbs = thumbnails(_pictured(reviews), st)
    page = render(reviews, run, thumbs)
    st.write_text(out, page)
    log.info("review: %s (%d domain(s), %d thumbnails, %.0f KB, %.1f s)", out, len(reviews), len(thumbs),
             len(page) / 1024, time.monotonic() - t0)
    return out
