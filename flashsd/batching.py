"""The model's own thread, and dynamic batching of concurrent predictions on it.

**One thread owns the model.** Every torch call and every use of the model's tokenizers runs on one dedicated,
long-lived thread (`ModelThread`): the load, the warm-up, the predictions, and the batching decision itself (its
key counts a prompt's tokens with the pipeline's own tokenizers). A transformers tokenizer keeps its padding and
truncation settings in shared state, so two threads using one corrupt each other's calls; and each thread that
runs a torch CPU op gets an OpenMP team of its own whose idle threads spin. The event loop only awaits.

**Batching.** While a batch runs, new requests queue. When the thread frees up, the oldest queued request and every
queued request compatible with it (equal `key`: mode, size, steps, guidance, LoRA state — prompts may differ) run
together, up to an image budget. A request that arrives at an idle thread starts at once: nothing waits for
company. Each request keeps its own generators, seeds, safety verdicts and log lines (the work function gets each
job's context to log in); a cancelled job is dropped from what it is waiting for, and a batch whose every member
was cancelled is told to stop. A failure of a shared call (out of memory, say) retries its members one by one, so
that one big request cannot fail the others. Any failure while choosing or running a batch fails the predictions
involved, never the thread; if the thread is ever closed, waiting and later predictions fail at once.

What a prediction waited for is kept: `serve` returns its result with the seconds it spent queued and running (the
per-prediction metrics), and `ModelThread.busy` says whether the thread has work, so that the health check's device
probe never queues behind a prediction.

The batcher knows nothing of diffusers or Cog: `run` is any function of a list of jobs that returns one result per
job (an exception instance fails that job alone).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("flashsd")

RECENT_BATCHES = 256  # sizes of the last batches kept (for the logs, the benchmarks and the tests)


class WorkerStopped(RuntimeError):
    """The model's thread no longer runs: no prediction can be served (the health check says so too)."""


class ModelThread:
    """The one thread that touches the model: a single-worker executor whose thread lives as long as the container.
    `call` (blocking, for setup) and `run` (awaitable) hand it work; tasks run one at a time, in order."""

    def __init__(self, name: str = "flashsd-model"):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.ident: int | None = None  # the thread's id, once it has run something
        self.closed: str | None = None  # why it stopped taking work, once it has
        self._lock = threading.Lock()
        self._pending = 0  # tasks handed to the thread and not finished

    def submit(self, fn: Callable, /, *args, **kwargs) -> concurrent.futures.Future:
        """Queue `fn(*args, **kwargs)` in a copy of the caller's context (Cog routes log lines by it)."""
        return self._submit(contextvars.copy_context(), fn, args, kwargs)

    def spawn(self, fn: Callable, /, *args) -> concurrent.futures.Future:
        """Queue `fn(*args)` in an empty context: what it logs belongs to no prediction unless it says so."""
        return self._submit(contextvars.Context(), fn, args, {})

    def _submit(
        self, context: contextvars.Context, fn: Callable, args, kwargs, only_if_idle: bool = False
    ) -> concurrent.futures.Future | None:
        if self.closed is not None:
            raise WorkerStopped(self.closed)
        with self._lock:  # the idle test and the hand-over are one step: nothing slips in between
            if only_if_idle and self._pending:
                return None
            try:
                future = self._executor.submit(self._in, context, fn, args, kwargs)
            except RuntimeError as error:  # shut down (interpreter exit)
                self.closed = self.closed or f"the model's thread was shut down ({error})"
                raise WorkerStopped(self.closed) from None
            self._pending += 1
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending -= 1

    def _in(self, context: contextvars.Context, fn: Callable, args, kwargs):
        self.ident = threading.get_ident()
        return context.run(fn, *args, **kwargs)

    def call(self, fn: Callable, /, *args, **kwargs):
        """`fn(*args, **kwargs)` on the model's thread; blocks until done. Not from the model's thread itself."""
        if threading.get_ident() == self.ident:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable, /, *args, **kwargs):
        """`fn(*args, **kwargs)` on the model's thread, awaited."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    async def run_if_idle(self, fn: Callable[[], Any]) -> bool:
        """`fn()` on the model's thread, awaited, only if the thread has nothing else to do (so it waits for
        nothing, and nothing waits long for it); returns whether it ran."""
        future = self._submit(contextvars.Context(), fn, (), {}, only_if_idle=True)
        if future is None:
            return False
        await asyncio.wrap_future(future)
        return True

    @property
    def alive(self) -> bool:
        return self.closed is None

    @property
    def busy(self) -> bool:
        """Whether the thread is running or has queued work (a prediction, setup, anything handed to it)."""
        return self._pending > 0

    def close(self, reason: str = "the model's thread was closed") -> None:
        """Stop taking work (what is queued still runs: callers waiting on it are answered)."""
        self.closed = self.closed or reason
        self._executor.shutdown(wait=False)


@dataclass(eq=False)
class Job:
    """One request waiting for, or running in, a batch."""

    payload: Any
    images: int
    context: contextvars.Context  # the submitting prediction's: its log lines belong there
    future: asyncio.Future = field(repr=False)
    key: Hashable | None = None  # set on the model's thread, when a batch is chosen
    cancelled: bool = False
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when its first call started (on the model's thread)
    done_at: float | None = None  # when its result was ready

    def say(self, level: int, message: str, *args) -> None:
        """Log a line as this job's own (Cog routes log lines by the prediction's context)."""
        self.context.run(log.log, level, message, *args)

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """Answer the waiting prediction, from any thread (a cancelled one is answered already)."""

        def answer() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        loop = self.future.get_loop()
        try:
            loop.call_soon_threadsafe(answer)
        except RuntimeError:  # its event loop is closed: nobody waits any more
            pass


@dataclass(frozen=True)
class Served:
    """A prediction's result and where its time went (Batcher.serve)."""

    result: Any
    queued_s: float  # from its submission to the start of its call on the model's thread
    # from there to its result; after a failed shared call, the retries alone included (the members of a batch
    # are answered together)
    run_s: float


class Batcher:
    def __init__(
        self,
        run: Callable[[Sequence[Job]], Sequence[Any]],
        *,
        key: Callable[[Any], Hashable],
        images: Callable[[Any], int],
        budget: Callable[[Hashable], int],
        thread: ModelThread | None = None,
    ):
        self._run, self._key, self._images, self._budget = run, key, images, budget
        self.thread = thread or ModelThread()
        self._queue: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()
        self.batches: collections.deque[int] = collections.deque(maxlen=RECENT_BATCHES)  # jobs per batch run

    @property
    def alive(self) -> bool:
        return self.thread.alive

    async def submit(self, payload) -> Any:
        """The result of `payload`, run alone or with compatible others. Cancelling the awaiting task drops it."""
        return (await self.serve(payload)).result

    async def serve(self, payload) -> Served:
        """`submit`, with the seconds the prediction spent queued and running."""
        job = Job(
            payload, self._images(payload), contextvars.copy_context(), asyncio.get_running_loop().create_future()
        )
        with self._lock:
            self._queue.append(job)
        try:
            drain = self.thread.spawn(self._drain)  # one drain per job: each runs a batch if any job is left
        except WorkerStopped:
            with self._lock:
                self._queue.remove(job)
            raise
        drain.add_done_callback(self._after_drain)
        try:
            result = await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # queued: never runs; running: its result is dropped
            raise
        return Served(result, job.started_at - job.queued_at, job.done_at - job.started_at)

    def _after_drain(self, drain: concurrent.futures.Future) -> None:
        """A drain that never ran (the thread was shut down with it queued) fails every job still waiting."""
        if drain.cancelled():
            with self._lock:
                stranded, self._queue = list(self._queue), collections.deque()
            for job in stranded:
                job.settle(error=WorkerStopped(self.thread.closed or "the model's thread stopped"))

    def _drain(self) -> None:
        """On the model's thread: run the next batch, if any job is queued. Nothing raised here escapes: what fails
        fails the jobs it concerns, and the thread goes on."""
        batch: list[Job] = []
        try:
            batch = self._next_batch()
            if batch:
                self.batches.append(len(batch))
                outcomes = self._run_isolated(batch)
            else:
                outcomes = []
        except BaseException as error:  # noqa: BLE001 - handed to the predictions involved, the thread goes on
            # A cancellation delivered into the call reaches every prediction as it is; SystemExit or
            # KeyboardInterrupt would end the event loop that awaits it (asyncio re-raises those two).
            if isinstance(error, SystemExit | KeyboardInterrupt):
                log.error("A batch ended with %r", error)
                error = RuntimeError(f"The model's call ended with {error!r}; the next prediction runs normally.")
            outcomes = [(None, error)] * len(batch)
        done = time.perf_counter()
        for job, (result, error) in zip(batch, outcomes):
            if isinstance(result, BaseException):  # `run` may fail one job of a batch and not the others
                result, error = None, result
            job.done_at = done
            job.settle(result, error)

    def _next_batch(self) -> list[Job]:
        """The oldest queued job and every compatible one that fits its budget, taken off the queue. Each job has a
        drain of its own, and each drain takes at least one job off the queue (or finds it empty): no job is left
        behind. A job whose key or budget cannot be had fails alone."""
        with self._lock:
            queued = [job for job in self._queue if not job.cancelled]
            self._queue = collections.deque(queued)
        for job in queued:  # keys are computed here, on the model's thread (they may use its tokenizers)
            if job.key is None:
                try:
                    job.key = self._key(job.payload)
                except Exception as error:
                    self._fail(job, error)
        with self._lock:
            ready = [job for job in self._queue if job.key is not None and not job.cancelled]
        if not ready:
            return []  # (a job queued since has its own drain)
        first = ready[0]
        try:
            room = self._budget(first.key) - first.images
        except Exception as error:
            self._fail(first, error)
            return []
        batch = [first]
        for job in ready[1:]:
            if job.key == first.key and job.images <= room:
                batch.append(job)
                room -= job.images
        self._take(batch)
        return batch

    def _fail(self, job: Job, error: Exception) -> None:
        log.error("A prediction could not be batched: %r", error)
        self._take([job])
        job.settle(error=error)

    def _take(self, jobs: list[Job]) -> None:
        with self._lock:
            for job in jobs:
                if job in self._queue:
                    self._queue.remove(job)

    def _run_isolated(self, batch: list[Job]) -> list[tuple[Any, BaseException | None]]:
        """(result, error) per job. A shared call that fails is retried one job at a time; what is no Exception
        (a cancellation delivered into the call) ends the whole batch."""
        started = time.perf_counter()
        for job in batch:
            job.started_at = started
        try:
            return [(result, None) for result in self._run(batch)]
        except Exception as error:
            if len(batch) == 1:
                return [(None, error)]
            log.warning(
                "A batch of %d predictions failed (%s); running them one by one", len(batch), type(error).__name__
            )
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


def engine_batcher(engine, thread: ModelThread) -> Batcher:
    """The batcher of an Engine (flashsd.engine; duck-typed here), on the thread that loaded it. A request alone
    runs in its own context (every log line of the call is its own); several share one call, each logging through
    its `say`; a call stops when none of its predictions waits any more."""

    def run(jobs: Sequence[Job]) -> Sequence[Any]:
        payloads = [job.payload for job in jobs]
        stop = lambda: all(job.cancelled for job in jobs)  # noqa: E731
        if len(jobs) == 1:
            return jobs[0].context.run(engine.generate_batch, payloads, stop=stop)
        return engine.generate_batch(payloads, [job.say for job in jobs], stop=stop)

    return Batcher(
        run, key=engine.batch_key, images=lambda request: request.num_outputs, budget=engine.batch_budget, thread=thread
    )
