"""Connecting to Ray: the cluster a job was submitted to, or a local one bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# A local Ray cluster binds its servers to the node IP; with this set (read when ray is imported) the
# node IP of a locally started cluster is 127.0.0.1, so nothing listens beyond loopback. Clusters
# joined through RAY_ADDRESS are unaffected.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def prefer_loopback() -> None:
    """Call before ray is first imported by a process that may start a local cluster."""
    if not os.environ.get("RAY_ADDRESS"):
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Use the running Ray session, else join RAY_ADDRESS (`ray job submit`), else start a local one.

    A local cluster binds to 127.0.0.1 and passes the AWS_* variables to its workers so that they
    reach the same object store as the driver.
    """
    prefer_loopback()
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    log.info("starting a local Ray cluster on 127.0.0.1")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env_vars} if env_vars else None,
    )


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started by the demo and benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
