"""Connecting to Ray: the cluster a job was submitted to, or a local one bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from near_ray.errors import NearRayError

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


class DeviceError(NearRayError):
    """Ray gave this process GPUs that torch cannot use."""


def torch_device() -> str:
    """The device this process may use: "cuda" only when Ray assigned it GPUs.

    Ray 2.60 no longer hides a node's GPUs from workers that reserved none, so
    ``torch.cuda.is_available()`` alone would let a 0-GPU actor (or a driver, which Ray never assigns
    GPUs) take a GPU that Ray gave someone else. Outside Ray (a plain script), a visible GPU is used.
    A process Ray assigned GPUs that torch cannot see is an error, not a quiet fall back to the CPU:
    on a node whose driver is older than the CUDA build of torch needs, every embed, classify and serve
    actor would otherwise run in fp32 on the CPU, holding GPUs it never uses.
    """
    import torch

    ray = sys.modules.get("ray")  # a Ray worker has always imported ray; a plain script need not
    gpu_ids = ray.get_gpu_ids() if ray is not None and ray.is_initialized() else None
    if not torch.cuda.is_available():
        if gpu_ids:
            raise DeviceError(
                f"Ray assigned GPU(s) {gpu_ids} to this process but torch {torch.__version__} sees no CUDA device "
                f"(built for CUDA {torch.version.cuda or 'none'}; CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): the node's NVIDIA driver may be older than "
                "this torch needs, or this torch is a CPU build. Fix the node's image, or ask for no GPUs "
                "(refine.embed_gpus, refine.knn_gpus, classify.gpus_per_actor, serve.gpus_per_replica: 0)"
            )
        return "cpu"
    if gpu_ids is not None:
        return "cuda" if gpu_ids else "cpu"
    return "cuda"


T = TypeVar("T")
_compute: ThreadPoolExecutor | None = None
_compute_lock = threading.Lock()
_compute_ident: int | None = None


def compute_thread() -> ThreadPoolExecutor:
    """This process's one thread for torch compute: actors and replicas build and run their models here.

    Torch's CPU kernels parallelize with OpenMP, and every thread that runs a parallel op gets an OpenMP
    team of its own. Ray runs user code in threads of its choosing (an actor's ``__init__`` in one,
    Ray Data's batches in another, Serve's sync calls in a pool), so a model built in one thread and
    run in another, or batches landing on different pool threads, leave several teams waiting on the
    same cores, and every parallel op of the forward pass pays for it at its barriers (measured on 2
    cores: a near-tiny training step ~200 ms with one team, ~320 ms once a second thread had run one
    parallel op). Running all torch work through this one thread keeps one team per process.
    """
    global _compute, _compute_ident
    with _compute_lock:
        if _compute is None:
            _compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="near-ray-compute")
            _compute_ident = _compute.submit(threading.get_ident).result()
        return _compute


def on_compute_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the compute thread, waiting for it (inline when already there)."""
    pool = compute_thread()
    if threading.get_ident() == _compute_ident:
        return fn(*args, **kwargs)
    return pool.submit(fn, *args, **kwargs).result()


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


class StopRequest:
    """Set when the process is asked to stop (``ray job stop`` sends SIGTERM) while a stage that winds
    down by itself runs: the stage stops starting new work, keeps what is in flight, then stops."""

    def __init__(self) -> None:
        self.requested = False


_stoppable: list[StopRequest] = []


@contextmanager
def stoppable() -> Iterator[StopRequest]:
    """While inside, ``request_stop`` sets the yielded flag instead of interrupting the stage."""
    request = StopRequest()
    _stoppable.append(request)
    try:
        yield request
    finally:
        _stoppable.remove(request)


def request_stop() -> bool:
    """Ask the running stage to wind down; False when none can (or it was already asked): interrupt it."""
    if not _stoppable or _stoppable[-1].requested:
        return False
    _stoppable[-1].requested = True
    return True


class _Flag:
    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def get(self) -> bool:
        return self.value


class StopSignal:
    """A stage's stop, readable by its actors on every node: the driver ``set``s it when the job is
    stopping, and a worker that is about to pay for new work (an MLLM request) checks it first, so a
    stop asks nothing more than what is already in flight, however far ahead Ray Data built requests.
    A zero-CPU Ray actor holding one flag; picklable (it travels in ``fn_constructor_kwargs``)."""

    def __init__(self) -> None:
        import ray

        self._actor = ray.remote(_Flag).options(num_cpus=0).remote()

    @contextmanager
    def following(self, request: StopRequest, every_s: float = 0.2) -> Iterator[StopSignal]:
        """While inside, a driver thread sets the signal within ``every_s`` of ``request`` (the process's
        SIGTERM), not only when the driver next wakes up (an engine batch can take minutes)."""
        done = threading.Event()

        def watch() -> None:
            while not done.wait(every_s):
                if request.requested:
                    self.set()
                    return

        thread = threading.Thread(target=watch, name="near-ray-stop", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join()

    def set(self) -> None:
        import ray

        ray.get(self._actor.set.remote())

    def is_set(self) -> bool:
        import ray

        return bool(ray.get(self._actor.get.remote()))

    async def is_set_async(self) -> bool:  # in an async actor: awaits without blocking its event loop
        return bool(await self._actor.get.remote())
