"""What the bookkeeping costs as a collection grows: listing -> resume ledger -> part table -> resume, at
synthetic sizes, with no pixels and a stand-in for the model.

    .venv/bin/python benchmarks/bookkeeping_scaling.py [--sizes 100000,1000000,10000000] [--partitions 0]

Each size runs in a fresh process with its own local Ray (peak memory = each process's own maximum
resident set: /proc/<pid>/status VmHWM). The steps are the classify stage's, minus the pixels:

- listing: a manifest of N URIs (1% of them the same bytes as their neighbour) streamed in chunks of
  ``label.listing_chunk`` by the stages' listing (each URI once);
- first run: a ``ResumeLedger`` over the empty predictions table; Ray Data read tasks plan each batch
  (``ledger.plan``) and the stand-in answers what is planned (a row per image, no model); the driver
  writes the rows as parts (``PartTable``), then copies the identical images' rows;
- resume: a new ledger loads the table (parallel tasks, every part read once), and the same listing is
  planned again: every image must be skipped, nothing computed, nothing written.

Image ids are the hash of the URI (the bytes' hash in the product). Writes
benchmarks/results/bookkeeping_scaling.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "bookkeeping_scaling.json"
DOMAIN, VERSION = "birds", "bundle-v1"
TWIN_EVERY = 100  # every 100th URI holds the same bytes as the one before it


def peak_rss_mb(pid: int | None = None) -> float:
    """The process's peak resident set (VmHWM), in MB."""
    if pid is None:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


def image_id_of(uri: str) -> str:
    i = int(uri.rsplit("/", 1)[1].split(".")[0])
    twin = i - 1 if i % TWIN_EVERY == TWIN_EVERY - 1 else i
    return hashlib.sha256(f"img-{twin}".encode()).hexdigest()[:20]


def plan_and_predict(batch: Any, *, ledger: Any) -> Any:
    """A read task without the reading: ids, the ledger's plan, and the stand-in's rows for what is to do."""
    from near_ray.classify.table import as_table

    uris = batch["uri"].to_pylist()
    ids = [image_id_of(u) for u in uris]
    plans = ledger.plan([(u, DOMAIN, i) for u, i in zip(uris, ids, strict=True)])
    return as_table([
        {"image_id": i, "uri": u, "domain": DOMAIN, "name": f"species {int(i[:4], 16) % 200}", "score": 0.5,
         "confidence": 0.5, "abstained": False, "new_name": False, "source": "clip", "model_version": VERSION,
         "status": "ok", "mllm_cost_usd": 0.0}
        for u, i, p in zip(uris, ids, plans, strict=True) if p])  # fmt: skip


def one_pass(cfg: Any, table: Any, partitions: int | None, block: int) -> dict[str, Any]:
    """One run of the stage's bookkeeping over the listing; returns its figures."""
    import ray

    from near_ray.classify.table import copy_identical, resume_rule
    from near_ray.data.collections import listing_chunks, listing_size
    from near_ray.parts import ResumeLedger

    t0 = time.monotonic()
    rows0 = table.rows_written
    ledger = ResumeLedger.open(table, resume_rule({DOMAIN: VERSION}), partitions, listing_size(cfg, table.storage))
    t_open = time.monotonic() - t0
    listed = 0
    for chunk in listing_chunks(cfg, table.storage):
        listed += len(chunk)
        ds = ray.data.from_items(chunk, override_num_blocks=math.ceil(len(chunk) / block))
        out = ds.map_batches(plan_and_predict, fn_kwargs={"ledger": ledger}, batch_size=None,
                             batch_format="pyarrow", num_cpus=0.5)  # fmt: skip
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
            table.add(batch)
    table.flush()
    copied = 0
    for aliases in ledger.aliases():
        copies, _ = copy_identical(aliases, table, {DOMAIN: VERSION})
        table.add(copies)
        copied += copies.num_rows
    table.flush()
    counts = ledger.counts()
    actors = _ledger_actors()
    ledger.close()
    return {"seconds": round(time.monotonic() - t0, 2), "ledger_open_s": round(t_open, 2), "listed": listed,
            **ledger.loaded, **counts, "rows_written": table.rows_written - rows0, "rows_copied": copied,
            "ledger_actor_peak_rss_mb": actors, "driver_peak_rss_mb": peak_rss_mb()}  # fmt: skip


def ray_processes() -> dict[int, str]:
    """This process's descendants (the local Ray cluster it started): pid -> process title."""
    parent: dict[int, int] = {}
    titles: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                status = (d / "status").read_text()
                titles[int(d.name)] = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            parent[int(d.name)] = int(next(x for x in status.splitlines() if x.startswith("PPid:")).split()[1])
    me, out = os.getpid(), {}
    for pid in parent:
        p = pid
        while p in parent and p != me:
            p = parent[p]
        if p == me and pid != me:
            out[pid] = titles.get(pid, "")
    return out


def _ledger_actors() -> list[float]:
    return [peak_rss_mb(pid) for pid, title in ray_processes().items() if title.startswith("ray::LedgerPartition")]


def run_size(n: int, partitions: int | None, block: int) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from near_ray.classify.table import predictions_table
    from near_ray.config import RunConfig
    from near_ray.data.collections import listing_chunks
    from near_ray.storage import Storage

    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="bookkeeping-") as tmp:
        st = Storage()
        manifest = f"{tmp}/manifest.parquet"
        with pq.ParquetWriter(manifest, pa.schema([("uri", pa.string())])) as w:
            for lo in range(0, n, 1_000_000):
                w.write_table(pa.table({"uri": [f"s3://collection/{DOMAIN}/{i:09d}.jpg"
                                                for i in range(lo, min(n, lo + 1_000_000))]}))  # fmt: skip
        cfg = RunConfig.model_validate({"storage": {"workdir": f"{tmp}/run"}, "data": {"domains": [
            {"name": DOMAIN, "uri": "s3://collection/birds", "manifest": manifest}]}})  # fmt: skip
        t = time.monotonic()
        listed = sum(len(c) for c in listing_chunks(cfg, st))
        listing = {"seconds": round(time.monotonic() - t, 2), "uris": listed, "driver_peak_rss_mb": peak_rss_mb()}
        table = predictions_table(cfg.artifact("predictions"), st, part_rows=cfg.classify.part_rows)
        first = one_pass(cfg, table, partitions, block)
        resume = one_pass(cfg, table, partitions, block)
        parts = sum(len(p) for p in table.part_files().values())
    workers = [peak_rss_mb(pid) for pid, title in ray_processes().items()
               if title.startswith("ray::") and not title.startswith("ray::LedgerPartition")]  # fmt: skip
    ray.shutdown()
    return {"rows": n, "listing": listing, "first_run": first, "resume": resume, "parts": parts,
            "worker_peak_rss_mb_max": max(workers, default=None), "driver_peak_rss_mb": peak_rss_mb()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--partitions", type=int, default=0, help="ledger actors; 0 = the stages' default rule")
    ap.add_argument("--block", type=int, default=2000, help="URIs per read task")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size, in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_size(args.one, args.partitions or None, args.block)))
        return
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--one", str(n), "--partitions", str(args.partitions),
               "--block", str(args.block)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"size {n} failed:\n{out.stderr[-4000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        f, s = r["first_run"], r["resume"]
        print(f"{n:>11,} rows: listing {r['listing']['seconds']:7.1f} s | first run {f['seconds']:7.1f} s "
              f"({f['samples_asked']:,} computed, {f['rows_copied']:,} copied) | resume {s['seconds']:7.1f} s "
              f"(load {s['ledger_open_s']:.1f} s, {s['images_skipped']:,} skipped, {s['samples_asked']} computed) | "
              f"peak MB: driver {r['driver_peak_rss_mb']:.0f}, ledger {max(f['ledger_actor_peak_rss_mb'] + s['ledger_actor_peak_rss_mb']):.0f}, "
              f"worker {r['worker_peak_rss_mb_max']:.0f}", flush=True)  # fmt: skip
    doc = {"results": results, "machine": {"platform": platform.platform(), "python": platform.python_version(),
           "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
           "measured": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
