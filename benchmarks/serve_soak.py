"""A soak of the Ray Serve application: steady open-loop traffic for many minutes, good and bad requests mixed.

One replica of a near-tiny bundle (random init; weights do not change what a soak measures) behind
Serve's proxy on 127.0.0.1. A bounded client sends ``--rpm`` requests a minute at a fixed rate for
``--minutes`` (at most ``--max-in-flight`` outstanding; every request has a timeout), cycling through a
mix: a PNG, a JPEG, a larger photo-sized JPEG, bytes that are not an image, an empty body, a body with
the wrong content type and a batch of two. Per minute: requests, answers by status, p50 and p99 of the
good requests' latency; unexpected answers (a good request not answered 200, a bad one answered
anything but 4xx, a connection error or timeout) are counted apart. The model replica's resident
memory, threads and open file descriptors (every replica of the app, ingress and model) are read at the start (after warm-up) and at the end: a
leak shows as growth. Prints a table and writes benchmarks/results/serve_soak.json.

    python benchmarks/serve_soak.py [--minutes 15] [--rpm 300] [--max-in-flight 16] [--out FILE]

``make bench-smoke`` runs it for half a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import make_bundle, start_serve  # noqa: E402  (one way of starting the app, shared)

RESULTS = Path(__file__).resolve().parent / "results" / "serve_soak.json"


def _image(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def request_mix() -> list[dict]:
    """The cycle of requests: what a client sends, and whether a correct server answers it 200."""
    png, jpeg, photo = _image("PNG", (128, 96), 0), _image("JPEG", (96, 96), 1), _image("JPEG", (1024, 768), 2)
    good = [{"kind": "png", "path": "", "body": png, "type": "image/png"},
            {"kind": "jpeg", "path": "", "body": jpeg, "type": "image/jpeg"},
            {"kind": "photo_jpeg", "path": "", "body": photo, "type": "image/jpeg"},
            {"kind": "batch_of_2", "path": "/batch", "files": [("files", ("a.png", png, "image/png")),
                                                               ("files", ("b.jpg", jpeg, "image/jpeg"))]}]
    bad = [{"kind": "not_an_image", "path": "", "body": b"GIF89a but not really" * 20, "type": "image/gif"},
           {"kind": "empty", "path": "", "body": b"", "type": "image/png"},
           {"kind": "wrong_type", "path": "", "body": png, "type": "text/plain"}]
    mix = [{**g, "ok": True} for g in good] * 2 + [{**b, "ok": False} for b in bad]  # 8 good, 3 bad per cycle
    return mix


def replica_processes(app: str = "bench") -> list:
    """The application's replica processes (ingress and model; psutil): Ray titles each worker process
    after its actor, ``ray::ServeReplica:<app>:<deployment>``."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(f"ray::ServeReplica:{app}:"):
            procs.append(p)
    return procs


def footprint(procs: list) -> dict:
    import psutil

    out = {}
    for p in procs:
        try:
            out[str(p.pid)] = {"rss_mb": round(p.memory_info().rss / 2**20, 1), "threads": p.num_threads(),
                               "fds": p.num_fds()}
        except psutil.Error as e:
            out[str(p.pid)] = {"error": str(e)}
    return out


async def soak(url: str, mix: list[dict], args: argparse.Namespace) -> dict:
    """Open-loop traffic at ``args.rpm`` for ``args.minutes``: per-minute figures."""
    import httpx

    interval = 60.0 / args.rpm
    total = int(args.minutes * args.rpm)
    gate = asyncio.Semaphore(args.max_in_flight)
    minutes: dict[int, dict] = {}
    skipped = 0

    async def one(c: httpx.AsyncClient, i: int, t_sched: float, start: float) -> None:
        req = mix[i % len(mix)]
        row = minutes.setdefault(int((t_sched - start) // 60), {"latency_ms": [], "status": {}, "unexpected": 0,
                                                                "requests": 0})
        row["requests"] += 1
        t0 = time.perf_counter()
        try:
            if "files" in req:
                r = await c.post(url + req["path"], files=req["files"])
            else:
                r = await c.post(url + req["path"], content=req["body"], headers={"content-type": req["type"]})
            status = str(r.status_code)
        except httpx.HTTPError as e:
            status = type(e).__name__
        finally:
            gate.release()
        row["status"][status] = row["status"].get(status, 0) + 1
        if req["ok"] and status == "200":
            row["latency_ms"].append((time.perf_counter() - t0) * 1000)
        elif req["ok"] or not status.startswith("4"):
            row["unexpected"] += 1

    async with httpx.AsyncClient(timeout=args.timeout_s) as c:
        for req in mix:  # warm-up, outside the measurement
            await (c.post(url + req["path"], files=req["files"]) if "files" in req else
                   c.post(url + req["path"], content=req["body"], headers={"content-type": req["type"]}))
        args.start_footprint = footprint(args.procs)
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            t_sched = start + i * interval
            await asyncio.sleep(max(0.0, t_sched - time.perf_counter()))
            if gate.locked():  # the server is behind by max_in_flight requests: shed, and say so
                skipped += 1
                continue
            await gate.acquire()
            tasks.append(asyncio.create_task(one(c, i, t_sched, start)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    per_minute = []
    for m in sorted(minutes):
        row = minutes[m]
        ms = np.array(row["latency_ms"]) if row["latency_ms"] else np.array([np.nan])
        per_minute.append({"minute": m + 1, "requests": row["requests"], "status": dict(sorted(row["status"].items())),
                           "unexpected": row["unexpected"], "p50_ms": round(float(np.nanpercentile(ms, 50)), 2),
                           "p99_ms": round(float(np.nanpercentile(ms, 99)), 2)})
    return {"per_minute": per_minute, "elapsed_s": round(elapsed, 1), "sent": len(tasks), "not_sent_backlog": skipped}


def run(args: argparse.Namespace) -> dict:
    tmp = tempfile.mkdtemp(prefix="serve_soak_")
    bundle = make_bundle(str(Path(tmp) / "bundle"), "near-tiny")
    args.replicas, args.max_batch_size, args.batch_wait = 1, 16, None
    url = start_serve(bundle, args, cpus_per_replica=1)
    args.procs = replica_processes()
    mix = request_mix()
    result = asyncio.run(soak(url, mix, args))
    end = footprint(args.procs)
    start = args.start_footprint
    growth = {pid: {"rss_growth_pct": round(100 * (end[pid]["rss_mb"] / s["rss_mb"] - 1), 2),
                    "threads": [s["threads"], end[pid]["threads"]], "fds": [s["fds"], end[pid]["fds"]]}
              for pid, s in start.items() if "rss_mb" in s and "rss_mb" in end.get(pid, {})}
    p99 = [m["p99_ms"] for m in result["per_minute"] if np.isfinite(m["p99_ms"])]
    return {"minutes": args.minutes, "rpm": args.rpm, "max_in_flight": args.max_in_flight,
            "mix": [{"kind": r["kind"], "ok": r["ok"]} for r in mix], **result,
            "unexpected_total": sum(m["unexpected"] for m in result["per_minute"]),
            "p99_ms_worst_minute": max(p99) if p99 else None,
            "replica_start": start, "replica_end": end, "replica_growth": growth,
            "model": "near-tiny (random init), 1 replica, 1 CPU, max_batch_size 16",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_avg_1m_end": round(os.getloadavg()[0], 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--rpm", type=int, default=300, help="requests a minute (fixed rate)")
    parser.add_argument("--max-in-flight", type=int, default=16, help="outstanding requests at most (then shed)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per request")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    report = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'minute':>6} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'unexpected':>10}  status")
    for m in report["per_minute"]:
        print(f"{m['minute']:>6} {m['requests']:>8} {m['p50_ms']:>8.1f} {m['p99_ms']:>8.1f} {m['unexpected']:>10}  "
              f"{m['status']}")
    for pid, g in report["replica_growth"].items():
        print(f"replica {pid}: RSS {report['replica_start'][pid]['rss_mb']} -> {report['replica_end'][pid]['rss_mb']} MB "
              f"({g['rss_growth_pct']:+.1f}%), threads {g['threads'][0]} -> {g['threads'][1]}, "
              f"fds {g['fds'][0]} -> {g['fds'][1]}")
    print(f"sent {report['sent']}, shed {report['not_sent_backlog']}, unexpected {report['unexpected_total']}; "
          f"written {args.out}")


if __name__ == "__main__":
    main()
