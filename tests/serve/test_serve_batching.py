"""The model deployment's adaptive batcher: batches form while the model is busy, never before."""

import asyncio
import threading
import time

import pytest

from near_ray.serve.batching import AdaptiveBatcher


class SlowModel:
    """Records each batch; the first call blocks until released, so the test controls timing."""

    def __init__(self, first_call_gate: threading.Event | None = None, fail_on: object = None):
        self.batches: list[list] = []
        self.gate = first_call_gate
        self.fail_on = fail_on

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        if self.gate is not None and len(self.batches) == 1:
            assert self.gate.wait(10)
        if self.fail_on in items:
            raise ValueError(f"cannot classify {self.fail_on}")
        time.sleep(0.01)
        return [x * 10 for x in items]


def test_lone_request_runs_at_once_and_load_forms_full_batches():
    async def scenario():
        gate = threading.Event()
        model = SlowModel(gate)
        b = AdaptiveBatcher(model, max_batch_size=8)
        t0 = time.perf_counter()
        first = asyncio.ensure_future(b.submit(1))
        while not model.batches:  # the lone request starts without waiting for company
            await asyncio.sleep(0.001)
        started_after = time.perf_counter() - t0
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(2, 22)]  # arrive while the model is busy
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, *rest)
        return model.batches, results, started_after

    batches, results, started_after = asyncio.run(scenario())
    assert started_after < 0.5
    assert results == [i * 10 for i in range(1, 22)]  # each caller gets its own answer
    assert [len(x) for x in batches] == [1, 8, 8, 4]  # queued requests fill batches up to the maximum


def test_a_failed_batch_fails_its_requests_and_the_next_batch_still_runs():
    async def scenario():
        gate = threading.Event()
        model = SlowModel(gate, fail_on=3)
        b = AdaptiveBatcher(model, max_batch_size=4)
        first = asyncio.ensure_future(b.submit(1))
        while not model.batches:
            await asyncio.sleep(0.001)
        doomed = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0.02)
        gate.set()
        assert await first == 10
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)
        later = await b.submit(5)
        return outcomes, later

    outcomes, later = asyncio.run(scenario())
    assert all(isinstance(o, ValueError) and "cannot classify 3" in str(o) for o in outcomes)
    assert later == 50


def test_cancelled_requests_are_not_computed():
    async def scenario():
        gate = threading.Event()
        model = SlowModel(gate)
        b = AdaptiveBatcher(model, max_batch_size=8)
        first = asyncio.ensure_future(b.submit(1))
        while not model.batches:
            await asyncio.sleep(0.001)
        gone = asyncio.ensure_future(b.submit(2))
        kept = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0.01)
        gone.cancel()  # e.g. the client's request timed out
        gate.set()
        await first
        assert await kept == 30
        with pytest.raises(asyncio.CancelledError):
            await gone
        return model.batches

    assert asyncio.run(scenario()) == [[1], [3]]


def test_a_wait_window_collects_requests_that_arrive_within_it():
    async def scenario():
        model = SlowModel()
        b = AdaptiveBatcher(model, max_batch_size=16, batch_wait_timeout_s=0.2)
        futures = []
        for i in range(5):
            futures.append(asyncio.ensure_future(b.submit(i)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*futures)
        return model.batches

    assert asyncio.run(scenario()) == [[0, 1, 2, 3, 4]]
