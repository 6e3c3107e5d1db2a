"""Stopping a stage without losing work: ``ray job stop`` sends SIGTERM; a stage that winds down by itself
(``stoppable``) stops starting new work and keeps what is in flight, and its actors on every node read the
stop from one ``StopSignal`` before they pay for anything new."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


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
    A zero-CPU Ray actor holding one flag, on the driver's node: it lives and dies with the driver, so the loss
    of another node never takes the stage's stop with it. Picklable (it travels in ``fn_constructor_kwargs``).
    A flag that cannot be reached reads as not set: only the driver's node going takes it, and the job's workers
    go with their driver (a worker that read "stop" instead would drop its rows while a live driver waits)."""

    def __init__(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._actor = ray.remote(_Flag).options(num_cpus=0, scheduling_strategy=here).remote()

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

        try:
            return bool(ray.get(self._actor.get.remote()))
        except ray.exceptions.RayActorError:
            return False

    async def is_set_async(self) -> bool:  # in an async actor: awaits without blocking its event loop
        import ray

        try:
            return bool(await self._actor.get.remote())
        except ray.exceptions.RayActorError:
            return False
