"""What a Ray job says about itself: its config, where its run lives, and one line at the end.

The entry points in ``jobs/`` (``ray job submit -- python jobs/X.py …``) run ``near-ray X`` with a
``JobRecord`` around it, so that ``ray job logs`` shows what ran and how it ended. A stopped job
(``ray job stop`` sends SIGTERM) writes what it already has before it exits (labeling builds no new
requests and writes the answers to those already built, so no answer is paid for twice; training
keeps its epoch checkpoints), and a resubmission with the same config continues from storage.

Credentials never appear: a run config holds none (``label.backend.api_key_env`` and
``serve.auth_token_env`` are the *names* of environment variables, S3 access comes from the
environment or the node's role), and no environment variable is ever printed.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from near_ray.config import RunConfig, dump_config
from near_ray.errors import NearRayError

log = logging.getLogger("near_ray.job")


def _on_stop(signum: int, frame: Any) -> None:
    from near_ray.stopping import request_stop

    if request_stop():
        log.info("job: stop requested (signal %d): the running stage finishes the work in flight, then stops "
                 "(a second signal interrupts it)", signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def stop_gracefully() -> None:
    """SIGTERM (``ray job stop``, a pod's termination) stops the job like Ctrl-C, so ``finally`` blocks
    write what the stage has (Python's default would end the process without writing anything); a
    stage that winds down by itself (labeling: the requests already made are answered and written)
    is asked to, and a second signal interrupts it."""
    signal.signal(signal.SIGTERM, _on_stop)


@dataclass
class JobRecord:
    command: str
    config: str | None
    workdir: str
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, command: str, config: str | None, cfg: RunConfig) -> JobRecord:
        """Log the job's identity and config, join the cluster, make SIGTERM a clean stop (the preflight,
        ``near_ray.preflight``, has checked what the command needs, the workdir included)."""
        from near_ray.ray_session import ensure_ray

        record = cls(command, config, cfg.storage.workdir)
        submission = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID")
        log.info("job %s%s: config %s, workdir %s", command, f" ({submission})" if submission else "",
                 config or "<defaults>", cfg.storage.workdir)
        log.info("job %s: the config as validated (it holds no credentials; those come from the environment "
                 "or the node's role and are never logged):\n%s", command, dump_config(cfg).rstrip())
        ensure_ray()
        stop_gracefully()  # after ray.init, which installs its own SIGTERM handler (an abrupt sys.exit)
        return record

    def finish(self, status: str, result: Any = None, error: str | None = None) -> str:
        """Log and return the one-line summary: ``job run SUCCEEDED in 12.3 s: …``."""
        facts = [f"workdir {self.workdir}"]
        if error:
            facts.append(error.splitlines()[0])
        elif isinstance(result, dict):
            facts.extend(summary_facts(self.command, result))
        line = f"job {self.command} {status} in {time.monotonic() - self.started:.1f} s: " + "; ".join(facts)
        log.info("%s", line)
        return line


def summary_facts(command: str, result: dict[str, Any]) -> list[str]:
    """The few numbers an operator looks for first, from a stage's (or the pipeline's) summary."""
    if command == "run":
        parts = [(name, result.get(name)) for name in ("label", "refine", "evaluate", "classify")]
        facts = [f for name, part in parts if isinstance(part, dict) for f in _stage_facts(name, part)]
        trained = result.get("train") or {}
        if trained:
            facts.append("bundles " + ", ".join(f"{m}{' (kept)' if t.get('skipped') else ''}"
                                                for m, t in trained.items() if isinstance(t, dict)))
        return facts
    return _stage_facts(command, result)


def _stage_facts(name: str, s: dict[str, Any]) -> list[str]:
    if name == "label":
        return [f"label {s.get('rows_written', 0)} rows written, {s.get('mllm_calls', 0)} MLLM calls "
                f"(${s.get('estimated_cost_usd', 0):.4f}), {s.get('samples_skipped', 0)} samples already on storage"]
    if name == "refine":
        return [f"refine vocabulary {s.get('vocabulary_size')} names over {s.get('images')} images"
                + (" (kept)" if s.get("skipped") else "")]
    if name == "train":
        return [f"bundle {s['bundle']}"] if "bundle" in s else [f"trained {', '.join(s)}"]
    if name == "evaluate":
        from near_ray.eval.metrics import View, registered

        methods = {m: v for m, v in (s.get("methods") or {}).items() if isinstance(v, dict)}
        cells = {m: " ".join(f"{k.title} {k.text(v[k.name])}" for k in registered(View.SUMMARY)
                             if isinstance(v.get(k.name), (int, float))) for m, v in methods.items()}
        accs = ", ".join(f"{m} {c}" for m, c in cells.items() if c)
        return [f"evaluate {accs}" if accs else "evaluate done"]
    if name == "serve":
        return [f"serving {s.get('app')} at {s.get('url')}"]
    return [f"{name} done"]


def wait_until_ready(cfg: RunConfig, started: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """After ``run_serve(block=False)``: wait until the app answers ``/readyz`` (a model replica loaded
    its bundle), then return, leaving the app running on the cluster (Serve's controller owns it)."""
    import httpx

    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    probe = f"http://{host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}/readyz"
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(probe, timeout=10.0)
            if r.status_code == 200:
                log.info("serve: %s is ready (%s), the job exits and leaves it running", started.get("app"),
                         r.json().get("model_versions"))
                return {**started, "ready": probe}
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(1.0)
    raise NearRayError(f"serve: {started.get('app')} not ready at {probe} after {timeout_s:.0f} s ({last}); "
                       f"see `serve status` and the replicas' logs")
