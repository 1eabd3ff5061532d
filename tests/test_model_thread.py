"""One thread owns the model: every tokenizer and torch call of concurrent predictions runs on it, and the batcher
that feeds it never strands a prediction, whatever fails."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from flashsd.batching import RECENT_BATCHES, Batcher, ModelThread, WorkerStopped, engine_batcher
from flashsd.engine import stop_hook_sites
from flashsd.models import MODELS
from flashsd.request import build_request
from testkit.real_size import meta_denoiser

SMALL = dict(aspect_ratio="custom", width=64, height=64, disable_safety_checker=False)


def request(prompt, seed, **inputs):
    return build_request(MODELS["sdxl"], prompt=prompt, seed=seed, **{**SMALL, **inputs})


# -- the race this arrangement removes ---------------------------------------------------------------------------


def unpadded_results(padded_call, plain_call, seconds: float) -> tuple[int, int]:
    """(unpadded, total) results of `padded_call()` (the pipeline's `tokenizer(..., padding="max_length")`) from two
    threads while two others loop on `plain_call()` (a count without padding, as the batching decision makes); stops
    at the first unpadded result. (Two of each: on a loaded machine one pair can go seconds without interleaving.)"""
    deadline = time.monotonic() + seconds
    found = threading.Event()
    counts = [0, 0]

    def padded():
        while time.monotonic() < deadline and not found.is_set():
            counts[1] += 1
            if len(padded_call()) != 77:
                counts[0] += 1
                found.set()

    def plain():
        while time.monotonic() < deadline and not found.is_set():
            plain_call()

    threads = [threading.Thread(target=target) for target in (padded, plain, padded, plain)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts[0], counts[1]


def pipeline_tokenization(tokenizer):
    return tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids


def test_two_threads_sharing_a_tokenizer_corrupt_its_padding(engines):
    # The old arrangement: the batching decision counted tokens on the event loop while the pipeline encoded on
    # a pool thread. This is the failure the soak saw ("Expected size 77 but got size 6").
    engine = engines("sdxl")
    plain = request("a photo of a cat", 1)
    unpadded, total = unpadded_results(
        lambda: pipeline_tokenization(engine.pipe.tokenizer), lambda: engine.batch_key(plain), seconds=30
    )
    assert unpadded > 0, f"no unpadded result in {total} calls: the race did not show"


def test_the_same_calls_handed_to_the_model_thread_never_corrupt(engines):
    engine = engines("sdxl")
    plain = request("a photo of a cat", 1)
    owner = ModelThread()
    try:
        unpadded, total = unpadded_results(
            lambda: owner.call(pipeline_tokenization, engine.pipe.tokenizer),
            lambda: owner.call(engine.batch_key, plain),
            seconds=3,
        )
    finally:
        owner.close()
    assert total > 100 and unpadded == 0


def test_every_tokenizer_and_torch_call_of_concurrent_predictions_runs_on_the_model_thread(engines, monkeypatch):
    engine = engines("sdxl")
    seen: dict[str, set[int]] = {}

    def record(name):
        seen.setdefault(name, set()).add(threading.get_ident())

    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(engine.pipe, name)
        original = type(tokenizer).__call__
        monkeypatch.setattr(
            type(tokenizer),
            "__call__",
            lambda self, *a, __o=original, **k: (record("tokenizer"), __o(self, *a, **k))[1],
        )
    # Every torch module call anywhere in the process, whoever makes it.
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: record(type(m).__name__))
    thread = ModelThread()
    batcher = engine_batcher(engine, thread)
    prompts = ["a photo of a cat", "a (red:1.3) car", "a lighthouse, " * 30, "a bowl of fruit", "[dim] room BREAK lamp"]

    async def main():
        return await asyncio.gather(
            *(batcher.submit(request(prompt, seed)) for seed, prompt in enumerate(prompts * 2)), return_exceptions=True
        )

    try:
        results = asyncio.run(main())
    finally:
        hook.remove()
        thread.close()
    assert all(isinstance(result, list) and result for result in results), results
    # the tokenizers, the denoiser, both text encoders, the VAE's decoder and the safety checker's vision model
    assert {"tokenizer", "UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection", "Decoder"} <= set(seen)
    assert "CLIPVisionModel" in seen or "CLIPVisionTransformer" in seen, sorted(seen)
    assert set().union(*seen.values()) == {thread.ident}
    assert threading.get_ident() != thread.ident


# -- the batcher survives anything -------------------------------------------------------------------------------


def batcher(run=None, key=None, budget=None, thread=None):
    return Batcher(
        run or (lambda jobs: [f"image of {job.payload}" for job in jobs]),
        key=key or (lambda payload: 64),
        images=lambda payload: 1,
        budget=budget or (lambda key: 4),
        thread=thread,
    )


def test_a_failure_while_choosing_a_batch_fails_that_prediction_and_the_next_runs():
    def key(payload):
        if payload == "bad key":
            raise ValueError("cannot count this prompt's tokens")
        return 64

    def budget(key):
        if key == 128:
            raise ValueError("no budget for this size")
        return 4

    b = batcher(key=lambda p: 128 if p == "bad budget" else key(p), budget=budget)

    async def main():
        outcomes = await asyncio.gather(*(b.submit(p) for p in ("bad key", "bad budget")), return_exceptions=True)
        return outcomes, await asyncio.wait_for(b.submit("next"), 10)

    (bad_key, bad_budget), after = asyncio.run(main())
    assert isinstance(bad_key, ValueError) and "tokens" in str(bad_key)
    assert isinstance(bad_budget, ValueError) and "budget" in str(bad_budget)
    assert after == "image of next" and b.alive


def test_even_a_base_exception_in_a_call_fails_only_its_predictions():
    def run(jobs):
        if jobs[0].payload == "exit":
            raise SystemExit("a library called exit()")
        return [f"image of {job.payload}" for job in jobs]

    b = batcher(run=run)

    async def main():
        with pytest.raises(RuntimeError, match="ended with SystemExit"):
            await asyncio.wait_for(b.submit("exit"), 10)
        return await asyncio.wait_for(b.submit("next"), 10)

    assert asyncio.run(main()) == "image of next"


def test_when_the_thread_stops_waiting_and_later_predictions_fail_at_once():
    release = threading.Event()

    def run(jobs):
        release.wait(10)
        return [f"image of {job.payload}" for job in jobs]

    b = batcher(run=run)

    async def main():
        running = asyncio.create_task(b.submit("running"))
        await asyncio.sleep(0.2)
        queued = asyncio.create_task(b.submit("queued"))
        await asyncio.sleep(0.1)
        b.thread._executor.shutdown(wait=False, cancel_futures=True)  # what interpreter shutdown does to it
        b.thread.close("the model's thread was shut down")
        started = time.monotonic()
        with pytest.raises(WorkerStopped):
            await asyncio.wait_for(queued, 5)
        with pytest.raises(WorkerStopped, match="shut down"):
            await b.submit("later")
        waited = time.monotonic() - started
        release.set()
        return await running, waited

    first, waited = asyncio.run(main())
    assert first == "image of running"  # what was already running is still answered
    assert waited < 1 and not b.alive


def test_the_record_of_batch_sizes_is_bounded():
    b = batcher()

    async def main():
        for index in range(RECENT_BATCHES + 10):
            await b.submit(index)

    asyncio.run(main())
    assert len(b.batches) == RECENT_BATCHES


def test_a_prediction_cancelled_while_a_failed_shared_call_is_retried_one_by_one_is_dropped_the_others_answered():
    hold = threading.Event()
    retrying = threading.Event()

    def run(jobs):
        names = [job.payload for job in jobs]
        if names == ["first"]:
            hold.wait(10)
        elif len(jobs) > 1:
            raise MemoryError("shared call too large")
        elif names == ["a"]:
            retrying.set()
            time.sleep(0.3)  # while "a" runs alone, "b" is cancelled
        return [f"image of {name}" for name in names]

    b = batcher(run=run)

    async def main():
        first = asyncio.create_task(b.submit("first"))
        await asyncio.sleep(0.1)
        tasks = {name: asyncio.create_task(b.submit(name)) for name in ("a", "b", "c")}
        await asyncio.sleep(0.1)
        hold.set()
        await asyncio.to_thread(retrying.wait, 10)
        tasks["b"].cancel()
        results = await asyncio.gather(first, *tasks.values(), return_exceptions=True)
        return dict(zip(["first", *tasks], results))

    results = asyncio.run(main())
    assert results["first"] == "image of first" and results["a"] == "image of a" and results["c"] == "image of c"
    assert isinstance(results["b"], asyncio.CancelledError)
    assert list(b.batches) == [1, 3]


# -- cancel checks cost little -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key, most", [("sdxl", 16), ("sd15", 16), ("sd3", 32), ("pixart", 36)])
def test_cancel_checks_sit_on_a_few_top_level_blocks_of_the_real_denoisers(key, most):
    denoiser = meta_denoiser(key)
    sites = stop_hook_sites(denoiser)
    # what the checks were before: every element of every ModuleList at any depth
    everywhere = sum(len(blocks) for blocks in denoiser.modules() if isinstance(blocks, torch.nn.ModuleList))
    blocks = [name for name, child in denoiser.named_children() if isinstance(child, torch.nn.ModuleList)]
    assert blocks and all(
        any(site is block for site in sites) for name in blocks for block in getattr(denoiser, name)
    )  # every block of the top-level lists is checked
    assert len(sites) <= most and len(sites) * 5 < everywhere, (len(sites), everywhere)


def test_the_thread_is_busy_while_it_has_work_and_a_probe_runs_only_when_it_is_idle():
    thread = ModelThread()
    release = threading.Event()
    ran = []

    async def main():
        assert not thread.busy and await thread.run_if_idle(lambda: ran.append(threading.get_ident()))
        running = thread.submit(release.wait, 10)
        queued = thread.submit(lambda: None)
        busy_while_running = thread.busy
        skipped = await asyncio.wait_for(thread.run_if_idle(lambda: ran.append("while busy")), 1)
        release.set()
        await asyncio.wrap_future(running)
        await asyncio.wrap_future(queued)
        await asyncio.sleep(0.05)  # the done callbacks
        return busy_while_running, skipped

    busy_while_running, skipped = asyncio.run(main())
    assert busy_while_running and skipped is False
    assert ran == [thread.ident] and thread.ident != threading.get_ident()  # on the model's thread, once
    assert not thread.busy
    thread.close()


def test_the_health_check_does_not_wait_behind_a_long_prediction():
    from flashsd.health import DeviceFault, HealthCheck

    thread = ModelThread()
    release = threading.Event()
    probes = []

    def probe():
        probes.append(threading.get_ident())

    health = HealthCheck(
        DeviceFault(), worker_alive=lambda: thread.alive, worker_busy=lambda: False,  # a busy signal gone stale
        run_on_worker=lambda fn: thread.run_if_idle(lambda: (probe(), fn())), device=torch.device("cpu"),
        probe_timeout_s=0.5,
    )  # fmt: skip

    async def main():
        running = thread.submit(release.wait, 10)  # a prediction that runs for seconds
        started = time.monotonic()
        healthy = await health.check()
        waited = time.monotonic() - started
        release.set()
        await asyncio.wrap_future(running)
        return healthy, waited, await health.check()

    healthy, waited, idle = asyncio.run(main())
    assert healthy is True and waited < 0.5 and idle is True
    assert probes == [thread.ident]  # skipped while the prediction ran, then run on the model's thread
    thread.close()
