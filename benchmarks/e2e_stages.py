"""End to end: the offline demo's wall time by stage, from its own summary (demo_summary.json).

    python benchmarks/e2e_stages.py [--out DIR] [--set section.key=value ...]

Runs ``near-ray demo`` once in a fresh folder (benchmark generation, pretraining, label, refine,
training of NeaR and the baselines, evaluation, serving a few images over HTTP), then prints and
writes each stage's seconds, the refine stage's own split (vocabulary, embeddings, kNN, candidate
sets) and the label stage's throughput. ``--set`` passes overrides to the demo (e.g. a smaller
benchmark for a smoke run). Writes benchmarks/results/e2e_stages.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "e2e_stages.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="demo folder (default: a temporary one)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from near_ray.console import setup_console
    from near_ray.demo import run_demo
    from near_ray.ray_session import prefer_loopback

    prefer_loopback()
    setup_console(False)
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        t0 = time.monotonic()
        run_demo(out=out, overrides=args.set)
        total = time.monotonic() - t0
        summary = json.loads((Path(out) / "demo_summary.json").read_text())
    wall = summary.get("wall_s", {})
    refine = summary.get("refine", {}).get("timings_s", {})
    label = summary.get("label", {})
    print(f"{'stage':<24}{'seconds':>10}")
    for name, seconds in wall.items():
        print(f"{name:<24}{seconds:>10.1f}")
    print(f"refine split: {refine}")
    doc = {
        "wall_s": wall, "refine_timings_s": refine,
        "label": {k: label.get(k) for k in ("rows_written", "mllm_calls", "images_per_s")},
        "overrides": args.set, "run_s": round(total, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m": [load_before, round(os.getloadavg()[0], 2)]},
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
