"""Connecting to Ray: the cluster a job was submitted to, or a local one bound to 127.0.0.1; its log folder,
and a free loopback port for the servers the demo and the benchmarks start."""

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


def joins_a_cluster() -> bool:
    """Whether ``ensure_ray`` would use a running Ray session or RAY_ADDRESS rather than start a local one."""
    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def ensure_ray(num_cpus: int | None = None) -> None:
    """Use the running Ray session, else join RAY_ADDRESS (`ray job submit`), else start a local one.

    A local cluster binds to 127.0.0.1 and passes the AWS_* variables to its workers so that they
    reach the same object store as the driver; it is always a new one (``address="local"``), never a
    head some earlier ``ray start`` left running on the machine. Workers' and actors' output goes to
    Ray's log folder, not the console, unless ``-v`` (see ``near_ray.console``).
    """
    prefer_loopback()
    import ray

    from near_ray.console import quiet_ray_data, verbose

    if ray.is_initialized():
        quiet_ray_data()
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"log_to_driver": verbose(), "logging_level": logging.INFO if verbose() else logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
    else:
        env_vars = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": env_vars} if env_vars else None,
            **quiet,
        )
        log.info("started a local Ray cluster on 127.0.0.1 (its logs: %s)", ray_log_folder())
    quiet_ray_data()


def ray_log_folder() -> str:
    """Where this Ray session writes its workers' and actors' logs."""
    import ray

    try:
        return str(ray._private.worker._global_node.get_logs_dir_path())
    except Exception:  # not a local session, or Ray moved it: the default location
        return "/tmp/ray/session_latest/logs"


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started by the demo and benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
