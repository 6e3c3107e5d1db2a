"""The offline demo: the whole NeaR pipeline on the synthetic benchmark, on this machine, end to end.

synthetic benchmark (≥ 2 domains) → small CLIP pretrained on its captions → labels from the simulated
MLLM annotator over real HTTP (S > 1 samples) → vocabulary → embeddings → kNN → candidate sets →
NeaR training with Ray Train (2 workers) and the baselines → evaluation → model bundle → the held-back
test split named by `classify` (the predictions table, a user's deliverable) → Ray Serve on 127.0.0.1,
a few test images classified over HTTP → results table. A second run reuses everything already on
storage. Every MLLM answer in it is simulated, and the report says so.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

from near_ray.config import DomainConfig, load_config
from near_ray.sim.config import DemoConfig
from near_ray.storage import Storage, join, storage_for

log = logging.getLogger(__name__)


def default_config() -> str:
    """The demo's config, shipped with the package (``near_ray/demo.yaml``): the demo runs from any folder."""
    return str(resources.files("near_ray") / "demo.yaml")


def _benchmark(cfg: DemoConfig, st: Storage, root: str) -> dict[str, Any]:
    from near_ray.sim.synth import generate

    if st.exists(join(root, "truth.parquet")):
        log.info("synthetic benchmark already at %s, reused", root)
    else:
        s = cfg.synth
        generate(
            out=root,
            domains=s.domains,
            species=s.species,
            images_per_species=s.images_per_species,
            image_size=s.image_size,
            seed=s.seed,
            test_fraction=s.test_fraction,
            storage=st,
        )
    return st.read_json(join(root, "taxonomy.json"))


def _classify_over_http(cfg: DemoConfig, st: Storage, root: str, n: int = 4) -> list[dict[str, Any]]:
    """Start the Serve app on 127.0.0.1, classify a few test images over HTTP, shut it down."""
    import httpx
    import pyarrow.compute as pc
    from ray import serve

    from near_ray.serve.app import run_serve

    truth = st.read_parquet(join(root, "truth.parquet"))
    test = truth.filter(pc.equal(truth["split"], "test")).to_pylist()
    picks = [next(r for r in test if r["domain"] == d) for d in cfg.synth.domains] + test[: max(0, n - 2)]
    url = run_serve(cfg, write_config=None, block=False)["url"]
    results = []
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=60) as client:
            for row in picks[:n]:
                data = st.read_bytes(join(root, row["path"]))
                r = client.post("/v1/classify", params={"domain": row["domain"]}, content=data,
                                headers={"content-type": "image/png"})
                r.raise_for_status()
                top = r.json()["predictions"][0]
                results.append({"image": row["path"], "true": row["species"], "predicted": top["name"],
                                "score": round(top["score"], 3)})
                log.info("serve: %s (true %s) → %s (%.2f)", row["path"], row["species"], top["name"], top["score"])
    finally:
        serve.shutdown()
    return results


def format_table(report: dict[str, Any]) -> str:
    """The results as a markdown table: what a run of the same commit and config reproduces exactly.
    Latency is a wall-clock measure of this machine at this moment, so it is printed apart."""
    from near_ray.eval.metrics import View, registered
    from near_ray.eval.report import ordered_methods

    methods, served = report.get("methods", {}), report.get("served")
    shown = registered(View.TABLE)
    lines = ["| method | " + "".join(f"{k.title} | " for k in shown) + "names / classes | cost / 1k images ($) |",
             "|---|" + "---|" * (len(shown) + 2)]
    for m in ordered_methods(methods):
        r = methods[m]
        spread = r.get("spread", {})
        names = f"{sum(s['distinct_names'] for s in spread.values())} / {sum(s['classes'] for s in spread.values())}"
        cells = [k.text(r.get(k.name)) for k in shown]
        cost = f"{r['cost_per_1k']:.3f}" if isinstance(r.get("cost_per_1k"), (int, float)) else "–"
        name = f"{m} (served)" if m == served else m
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {names if spread else '–'} | {cost} |")
    latency = {m: r["latency_ms"] for m, r in methods.items() if isinstance(r.get("latency_ms"), (int, float))}
    cond = report.get("latency_conditions") or {}
    where = f", load average {cond['load_average_1m']} on {cond['cpus']} CPUs" if cond else ""
    lines.append(f"\nlatency (ms per image, batch 1{where}): " + ", ".join(f"{m} {v:.1f}" for m, v in latency.items()))
    return "\n".join(lines)


def format_predictions(predictions: Any, root: str, n: int = 8) -> str:
    """The first ``n`` rows of the predictions table as an aligned text table (image, name, score, source)."""
    rows = [("image", "name", "score", "source")]
    for r in predictions.head(n).itertuples():
        image = r.uri[len(root) :].lstrip("/") if r.uri.startswith(root) else r.uri
        score = f"{r.score:.3f}" if isinstance(r.score, float) and r.score == r.score else "–"
        rows.append((image, r.name if isinstance(r.name, str) else f"({r.status})", score, str(r.source)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    # the score column is right-aligned so its decimals line up
    cells = [[c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
             for row in rows]
    return "\n".join("  ".join(row).rstrip() for row in cells)


def run_demo(out: str = "demo_out", overrides: list[str] | None = None, config: str | None = None) -> dict[str, Any]:
    from near_ray.pipeline import run_pipeline
    from near_ray.ray_session import ensure_ray
    from near_ray.sim.annotator import AnnotatorServer
    from near_ray.sim.corpus import pretrain_on_synthetic_corpus

    out = str(Path(out).resolve()) if "://" not in out else out
    cfg = load_config(config or default_config(), [*(overrides or []), f"storage.workdir={join(out, 'work')}"],
                      schema=DemoConfig)
    st = storage_for(cfg)
    root = join(out, "data")
    t0 = time.monotonic()
    log.info("demo: writing everything under %s", out)
    ensure_ray()

    t = time.monotonic()
    taxonomy = _benchmark(cfg, st, root)
    before = {"benchmark": round(time.monotonic() - t, 2)}  # wall seconds of the demo's own steps
    cfg.data.domains = [
        DomainConfig(
            name=d,
            uri=join(root, "images", d, "train"),
            meta_class=taxonomy["domains"][d].get("meta_class"),
            truth=join(root, "truth.parquet"),
        )
        for d in cfg.synth.domains
    ]
    # the held-back test split is the collection the demo names: images no stage trained on
    cfg.classify.domains = [DomainConfig(name=d, uri=join(root, "images", d, "test")) for d in cfg.synth.domains]
    if not cfg.model.pretrained:
        t = time.monotonic()
        cfg.model.pretrained = pretrain_on_synthetic_corpus(cfg, corpus=join(out, "pretrain_corpus"))
        before["pretrain"] = round(time.monotonic() - t, 2)
    with AnnotatorServer(root, profile=cfg.synth.annotator_profile, seed=cfg.synth.seed,
                         faults=cfg.synth.annotator_faults) as annotator:
        cfg.label.backend.base_url = annotator.base_url
        summary = run_pipeline(cfg)
        summary["annotator_stats"] = annotator.stats()

    from near_ray.ray_session import free_local_port

    cfg.serve.port = free_local_port()
    t = time.monotonic()
    summary["served"] = _classify_over_http(cfg, st, root)
    summary["wall_s"] = {**before, **summary.get("wall_s", {}), "serve": round(time.monotonic() - t, 2),
                         "total": round(time.monotonic() - t0, 2)}

    report = st.read_json(cfg.paths.report_json)
    report_dir = Path(out) if "://" not in out else None
    if report_dir is not None:  # the report also lands at DIR/report.* for a person to open
        for name in [o.uri for o in st.list(cfg.paths.report)]:
            st.write_bytes(str(report_dir / Path(name).name), st.read_bytes(name))
    st.write_json(join(out, "demo_summary.json"), summary)
    print("\nnear_ray demo — synthetic benchmark, simulated MLLM annotator (all MLLM answers are simulated)")
    print(format_table(report))
    print(f"\nserved over HTTP: {json.dumps(summary['served'], indent=None)}")
    from near_ray.classify.table import read_predictions

    named = summary["classify"]
    predictions = read_predictions(named["predictions"], st)
    print(f"\nthe held-back test split named by `classify` ({len(predictions)} images, "
          f"{named['mllm_calls']} MLLM calls): the first rows of the predictions table")
    print(format_predictions(predictions, root))
    print(f"predictions table: {named['predictions']}")
    print(f"review page: {summary['review']}  (names, examples, merges, prunings, suspect images)")
    print(f"report: {join(out, 'report.md')}  ({time.monotonic() - t0:.0f} s)")
    return report
