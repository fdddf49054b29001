"""tracker.stream.batching.Batcher: batches are formed when the worker is free, not when items arrive."""

from __future__ import annotations

import asyncio
import time

import pytest

from tracker.stream.batching import Batcher


class Recorder:
    """A `run` that records each batch and takes `seconds` (as a model forward would)."""

    def __init__(self, seconds: float = 0.0, fail_on: object = None):
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [10 * i for i in items]


def test_items_that_arrive_while_a_batch_runs_all_go_into_the_next_batch():
    """The case @serve.batch gets wrong: under load it queues one single-item batch per arrival."""
    run = Recorder(seconds=0.2)
    batcher = Batcher(run, max_batch_size=8, wait_s=0.0)

    async def go():
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)  # the first batch is running
        later = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
        for i in range(1, 6):
            await asyncio.sleep(0.01)
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(go())
    assert first == 0 and later == [10, 20, 30, 40, 50]
    assert run.batches == [[0], [1, 2, 3, 4, 5]]
    assert (batcher.batches, batcher.items) == (2, 6)


def test_batches_hold_at_most_max_batch_size_items_in_arrival_order():
    run = Recorder(seconds=0.05)
    batcher = Batcher(run, max_batch_size=3, wait_s=0.0)

    async def go():
        return await asyncio.gather(*(batcher.submit(i) for i in range(8)))

    assert asyncio.run(go()) == [10 * i for i in range(8)]
    assert run.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_an_idle_worker_waits_up_to_wait_s_from_the_first_arrival_for_company():
    run = Recorder()
    batcher = Batcher(run, max_batch_size=8, wait_s=0.15)

    async def go():
        t0 = time.monotonic()
        a = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)
        b = asyncio.create_task(batcher.submit(2))
        await asyncio.gather(a, b)
        return time.monotonic() - t0

    took = asyncio.run(go())
    assert run.batches == [[1, 2]]
    assert 0.14 <= took < 0.5  # waited for the first item's wait_s, not wait_s again from the second


def test_a_full_batch_does_not_wait():
    run = Recorder()
    batcher = Batcher(run, max_batch_size=2, wait_s=5.0)

    async def go():
        t0 = time.monotonic()
        out = await asyncio.gather(batcher.submit(1), batcher.submit(2))
        return out, time.monotonic() - t0

    out, took = asyncio.run(go())
    assert out == [10, 20] and took < 1.0


def test_a_failing_batch_fails_its_own_callers_only_and_the_worker_goes_on():
    run = Recorder(seconds=0.05, fail_on=2)
    batcher = Batcher(run, max_batch_size=2, wait_s=0.0)

    async def go():
        return await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)

    out = asyncio.run(go())
    assert out[0] == 0 and out[1] == 10
    assert isinstance(out[2], ValueError) and isinstance(out[3], ValueError) and "bad item 2" in str(out[2])
    assert out[4] == 40
    assert run.batches == [[0, 1], [2, 3], [4]]


def test_a_wrong_number_of_results_is_an_error_for_that_batch():
    async def short(items):
        return items[:-1]

    batcher = Batcher(short, max_batch_size=4, wait_s=0.0)

    async def go():
        return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)

    out = asyncio.run(go())
    assert all(isinstance(o, RuntimeError) and "2 items returned 1" in str(o) for o in out)


def test_a_caller_that_gave_up_is_left_out_of_the_next_batch():
    run = Recorder(seconds=0.1)
    batcher = Batcher(run, max_batch_size=8, wait_s=0.0)

    async def go():
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await first, await kept

    assert asyncio.run(go()) == (0, 20)
    assert run.batches == [[0], [2]]


def test_settings_are_validated_and_can_change_while_serving():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(Recorder(), max_batch_size=0)
    run = Recorder(seconds=0.05)
    batcher = Batcher(run, max_batch_size=1, wait_s=0.0)

    async def go():
        await asyncio.gather(*(batcher.submit(i) for i in range(2)))
        batcher.max_batch_size = 4
        await asyncio.gather(*(batcher.submit(i) for i in range(4)))

    asyncio.run(go())
    assert run.batches == [[0], [1], [0, 1, 2, 3]]


def test_one_batcher_serves_one_event_loop_after_another():
    """A pipeline built once and driven by several asyncio.run calls (a replay, then another)."""
    run = Recorder()
    batcher = Batcher(run, max_batch_size=8, wait_s=0.02)

    async def go(base):
        return await asyncio.gather(*(batcher.submit(base + i) for i in range(3)))

    assert asyncio.run(go(0)) == [0, 10, 20]
    assert asyncio.run(asyncio.wait_for(go(10), 5)) == [100, 110, 120]
    assert run.batches == [[0, 1, 2], [10, 11, 12]]
