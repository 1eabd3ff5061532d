"""Dynamic batching of concurrent predictions: requests that share the model's state run as one pipeline call.

While a batch runs, new requests queue. When the denoiser frees up, the oldest queued request and every queued
request compatible with it (same `key`: mode, size, steps, guidance, LoRA state — prompts may differ) run
together, up to an image budget. A request that arrives at an idle batcher starts at once: nothing waits for
company. Each request keeps its own generators, seeds, safety verdicts and log lines (the work function gets
each job's context to log in); a cancelled job is dropped from what it is waiting for, and a batch whose every
member was cancelled is told to stop. A failure of a shared call (out of memory, say) retries its members one
by one, so that one big request cannot fail the others.

The batcher knows nothing of diffusers or Cog: `run` is any function of a list of jobs that returns one result
per job (an exception instance fails that job alone), and it runs in a worker thread, off the event loop (coglet runs every prediction on one loop).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("flashsd")


@dataclass(eq=False)
class Job:
    """One request waiting for, or running in, a batch."""

    payload: Any
    key: Hashable
    images: int
    context: contextvars.Context  # the submitting prediction's: its log lines belong there
    future: asyncio.Future = field(repr=False)
    cancelled: bool = False

    def say(self, level: int, message: str, *args) -> None:
        """Log a line as this job's own (Cog routes log lines by the prediction's context)."""
        self.context.run(log.log, level, message, *args)


class Batcher:
    def __init__(
        self,
        run: Callable[[Sequence[Job]], Sequence[Any]],
        *,
        key: Callable[[Any], Hashable],
        images: Callable[[Any], int],
        budget: Callable[[Hashable], int],
    ):
        self._run, self._key, self._images, self._budget = run, key, images, budget
        self._queue: collections.deque[Job] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batches: list[int] = []  # sizes of the batches run (jobs), for the logs and the tests

    async def submit(self, payload) -> Any:
        """The result of `payload`, run alone or with compatible others. Cancelling the awaiting task drops it."""
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        job = Job(payload, self._key(payload), self._images(payload), contextvars.copy_context(), loop.create_future())
        self._queue.append(job)
        self._wake.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # queued: never runs; running: its result is dropped
            raise

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is not None and not self._worker.done() and self._worker.get_loop() is loop:
            return
        self._wake = asyncio.Event()
        # An empty context: a task started from a prediction would inherit its id, and Cog would give that
        # prediction every batch's log lines.
        self._worker = loop.create_task(self._work(), context=contextvars.Context())

    def _next_batch(self) -> list[Job]:
        while self._queue and self._queue[0].cancelled:
            self._queue.popleft()
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch, room = [first], self._budget(first.key) - first.images
        for job in list(self._queue):
            if not job.cancelled and job.key == first.key and job.images <= room:
                self._queue.remove(job)
                batch.append(job)
                room -= job.images
        return batch

    async def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.batches.append(len(batch))
            try:
                outcomes = await asyncio.to_thread(self._run_isolated, batch)
            except Exception as error:  # the waiting predictions fail with it; the worker goes on
                outcomes = [(None, error)] * len(batch)
            for job, (result, error) in zip(batch, outcomes):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):  # `run` may fail one job of a batch and not the others
                    result, error = None, result
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)

    def _run_isolated(self, batch: list[Job]) -> list[tuple[Any, BaseException | None]]:
        """(result, error) per job. A shared call that fails is retried one job at a time; what is no Exception
        (a cancellation delivered into the call) ends the whole batch."""
        try:
            return [(result, None) for result in self._run(batch)]
        except Exception as error:
            if len(batch) == 1:
                return [(None, error)]
            log.warning(
                "A batch of %d predictions failed (%s); running them one by one", len(batch), type(error).__name__
            )
        except BaseException as error:  # noqa: B036 - handed to every waiting prediction, the worker goes on
            return [(None, error)] * len(batch)
        outcomes = []
        for job in batch:
            if job.cancelled:
                outcomes.append((None, asyncio.CancelledError()))
                continue
            try:
                outcomes.append((self._run([job])[0], None))
            except Exception as error:
                outcomes.append((None, error))
        return outcomes


def engine_batcher(engine, image_budget: Callable[[Hashable], int]) -> Batcher:
    """The batcher of an Engine (flashsd.engine; duck-typed here): a request alone runs the single-request path
    itself, in its own context; several share `generate_together`, which stops when none of them waits."""

    def run(jobs: Sequence[Job]) -> Sequence[Any]:
        if len(jobs) == 1:
            job = jobs[0]
            return [job.context.run(engine.generate, job.payload, stop=lambda: job.cancelled)]
        return engine.generate_together(
            [job.payload for job in jobs], [job.say for job in jobs], stop=lambda: all(job.cancelled for job in jobs)
        )

    return Batcher(run, key=engine.batch_key, images=lambda request: request.num_outputs, budget=image_budget)
