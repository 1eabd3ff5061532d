"""The batcher on its own (no model): who runs with whom, when, and what each waiting request gets back."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time

import pytest

from flashsd.batching import Batcher

WHO = contextvars.ContextVar("who", default=None)  # stands for coglet's prediction id


class Work:
    """A run function that records each batch and can hold the first one until released."""

    def __init__(self, hold_first=False, fail=None):
        self.batches: list[list] = []
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.started = threading.Event()
        self.fail = fail

    def __call__(self, jobs):
        self.batches.append([job.payload for job in jobs])
        self.started.set()
        self.release.wait(5)
        if self.fail:
            self.fail(jobs)
        for job in jobs:
            job.say(logging.INFO, "ran %s", job.payload["name"])
        return [f"image of {job.payload['name']}" for job in jobs]


def batcher(work, budget=4):
    return Batcher(work, key=lambda p: p.get("size", 64), images=lambda p: p.get("n", 1), budget=lambda key: budget)


async def predict(b, payload):
    WHO.set(payload["name"])
    return await b.submit(payload)


def p(name, **extra):
    return {"name": name, **extra}


async def start_first_then(b, work, *later):
    """Submit p('first'), wait until it runs, submit `later`, then release the first batch."""
    first = asyncio.create_task(predict(b, p("first")))
    await asyncio.to_thread(work.started.wait, 5)
    others = [asyncio.create_task(predict(b, payload)) for payload in later]
    await asyncio.sleep(0.05)  # let them queue
    work.release.set()
    return first, others


def test_a_request_at_an_idle_batcher_starts_at_once_and_alone():
    work = Work()

    async def main():
        b = batcher(work)
        return await predict(b, p("a")), list(b.batches)

    assert asyncio.run(main()) == ("image of a", [1])
    assert work.batches == [[p("a")]]


def test_requests_queued_while_a_batch_runs_share_the_next_call():
    work = Work(hold_first=True)

    async def main():
        b = batcher(work)
        first, others = await start_first_then(b, work, p("b"), p("c"), p("d"))
        return await first, await asyncio.gather(*others), list(b.batches)

    first, others, sizes = asyncio.run(main())
    assert first == "image of first" and others == ["image of b", "image of c", "image of d"]
    assert sizes == [1, 3] and [x["name"] for x in work.batches[1]] == ["b", "c", "d"]


def test_only_compatible_requests_share_a_call_and_the_image_budget_holds():
    work = Work(hold_first=True)

    async def main():
        b = batcher(work, budget=4)
        queued = [p("b"), p("big", n=3), p("other-size", size=128), p("c"), p("d", n=2)]
        first, others = await start_first_then(b, work, *queued)
        await asyncio.gather(first, *others)
        return b.batches

    asyncio.run(main())
    names = [[x["name"] for x in batch] for batch in work.batches]
    # oldest first; then every compatible queued request that still fits 4 images; the rest in later calls
    assert names == [["first"], ["b", "big"], ["other-size"], ["c", "d"]]


def test_a_request_cancelled_while_queued_never_runs_and_the_others_do():
    work = Work(hold_first=True)

    async def main():
        b = batcher(work)
        first = asyncio.create_task(predict(b, p("first")))
        await asyncio.to_thread(work.started.wait, 5)  # the first batch holds the denoiser
        b1, cancelled, c1 = (asyncio.create_task(predict(b, p(name))) for name in ("b", "cancelled", "c"))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        work.release.set()
        return await asyncio.gather(first, b1, c1)

    assert asyncio.run(main()) == ["image of first", "image of b", "image of c"]
    assert [[x["name"] for x in batch] for batch in work.batches] == [["first"], ["b", "c"]]


def test_a_request_cancelled_while_running_is_dropped_and_its_batch_knows():
    seen = {}

    def note_cancelled(jobs):
        seen.update({job.payload["name"]: job.cancelled for job in jobs})

    work = Work(hold_first=True, fail=note_cancelled)

    async def main():
        b = batcher(work)
        first = asyncio.create_task(predict(b, p("first")))
        await asyncio.to_thread(work.started.wait, 5)
        first.cancel()
        await asyncio.sleep(0.05)
        work.release.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await predict(b, p("next"))  # the worker goes on

    assert asyncio.run(main()) == "image of next"
    assert seen["first"] is True  # what the engine checks to stop a batch nobody waits for


def test_a_failing_shared_call_retries_its_members_one_by_one():
    def out_of_memory_when_shared_with_big(jobs):
        if len(jobs) > 1 and any(job.payload["name"] == "big" for job in jobs):
            raise MemoryError("shared call too large")
        if [job.payload["name"] for job in jobs] == ["big"]:
            raise MemoryError("big alone is too large")

    work = Work(hold_first=True, fail=out_of_memory_when_shared_with_big)

    async def main():
        b = batcher(work)
        first, others = await start_first_then(b, work, p("b"), p("big"), p("c"))
        return await first, await asyncio.gather(*others, return_exceptions=True)

    first, (b1, big, c1) = asyncio.run(main())
    assert (first, b1, c1) == ("image of first", "image of b", "image of c")
    assert isinstance(big, MemoryError) and "big alone" in str(big)


def test_each_request_logs_in_its_own_context(caplog):
    class Who(logging.Filter):
        def filter(self, record):
            record.who = WHO.get()
            return True

    handler_filter = Who()
    caplog.handler.addFilter(handler_filter)
    caplog.set_level(logging.INFO, logger="flashsd")
    work = Work(hold_first=True)

    async def main():
        b = batcher(work)
        first, others = await start_first_then(b, work, p("b"), p("c"))
        await asyncio.gather(first, *others)

    try:
        asyncio.run(main())
    finally:
        caplog.handler.removeFilter(handler_filter)
    lines = {(r.getMessage(), r.who) for r in caplog.records if r.getMessage().startswith("ran ")}
    assert lines == {("ran first", "first"), ("ran b", "b"), ("ran c", "c")}


def test_each_prediction_learns_how_long_it_was_queued_and_how_long_its_call_ran():
    class Timed(Work):
        def __call__(self, jobs):
            time.sleep(0.2)  # each call runs 0.2 s, the first one longer (held until released)
            return super().__call__(jobs)

    work = Timed(hold_first=True)

    async def main():
        b = batcher(work)
        first = asyncio.create_task(b.serve(p("first")))
        await asyncio.to_thread(work.started.wait, 5)
        queued = [asyncio.create_task(b.serve(payload)) for payload in (p("b"), p("c"))]
        await asyncio.sleep(0.5)  # they queue behind the first call, which is held
        work.release.set()
        return await first, await asyncio.gather(*queued)

    first, queued = asyncio.run(main())
    assert first.result == "image of first" and [s.result for s in queued] == ["image of b", "image of c"]
    assert first.queued_s < 0.1 and first.run_s >= 0.2 + 0.5  # started at once; ran while held, and its 0.2 s
    for served in queued:
        assert 0.5 <= served.queued_s < first.run_s + 0.1  # waited behind the first call, not longer
        assert 0.2 <= served.run_s < 0.5  # their one shared call
    assert queued[0].run_s == queued[1].run_s  # one call: the same time


def test_predictions_retried_alone_after_a_failed_shared_call_count_the_failed_call_and_the_retries():
    def fail_shared(jobs):
        if len(jobs) > 1:
            raise MemoryError("shared call too large")

    class Timed(Work):
        def __call__(self, jobs):
            time.sleep(0.2)
            return super().__call__(jobs)

    work = Timed(hold_first=True, fail=fail_shared)

    async def main():
        b = batcher(work)
        first = asyncio.create_task(b.serve(p("first")))
        await asyncio.to_thread(work.started.wait, 5)
        queued = [asyncio.create_task(b.serve(payload)) for payload in (p("b"), p("c"))]
        await asyncio.sleep(0.05)
        work.release.set()
        await first
        return await asyncio.gather(*queued)

    b1, c1 = asyncio.run(main())
    assert [len(batch) for batch in work.batches] == [1, 2, 1, 1]
    # The failed shared call, then each one's retry: the batch's members are answered together, after the last.
    assert b1.run_s == c1.run_s and 0.6 <= b1.run_s < 0.8
