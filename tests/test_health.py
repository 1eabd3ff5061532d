"""The health check tells the truth: a fatal device error, a stopped model thread and a device that fails or does
not answer a tiny operation each make it raise Unhealthy saying why; a prediction's ordinary failure does not.
Faults are injected where they happen: a CUDA error raised inside the denoiser (as torch raises it), the model
thread's state, the device probe."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from flashsd.health import (
    FATAL_CUDA_ERRORS,
    DeviceFailed,
    DeviceFault,
    HealthCheck,
    Unhealthy,
    is_fatal_device_error,
    probe_device,
)
from flashsd.models import MODELS
from flashsd.recovery import OutOfMemory
from flashsd.request import build_request

# What torch raises on a sticky CUDA error: "CUDA error: " + cudaGetErrorString, then c10's suffix
# (c10/cuda/CUDAMiscFunctions.cpp, get_cuda_check_suffix), as a torch.AcceleratorError.
TORCH_SUFFIX = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be "
    "incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to enable "
    "device-side assertions.\n"
)
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered" + TORCH_SUFFIX
CUDA_OOM = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.11 GiB."


def request(**inputs):
    return build_request(MODELS["sd15"], **{"prompt": "a cat", "aspect_ratio": "custom", "width": 64, "height": 64,
                                            "seed": 3, "disable_safety_checker": True, **inputs})  # fmt: skip


def failing_denoiser(engine, error: BaseException):
    """The denoiser raises `error` on its second call (mid-denoising, where a kernel would fail)."""
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error

    return engine.pipe.unet.register_forward_pre_hook(hook)


def check(health: HealthCheck) -> bool:
    return asyncio.run(health.check())


class Worker:
    """The model thread as the health check sees it: alive, busy, and running what it is given on its own thread."""

    def __init__(self):
        self.alive, self.busy, self.ran_on = True, False, []

    async def run(self, fn):
        def on_thread():
            self.ran_on.append(threading.current_thread().name)
            return fn()

        return await asyncio.to_thread(on_thread)


def health_of(fault: DeviceFault, worker: Worker, device: str | None = None, **options) -> HealthCheck:
    return HealthCheck(
        fault, worker_alive=lambda: worker.alive, worker_busy=lambda: worker.busy, run_on_worker=worker.run,
        device=torch.device(device) if device else None, **options,
    )  # fmt: skip


@pytest.mark.parametrize("code", sorted(code for code, text in FATAL_CUDA_ERRORS.items() if text))
def test_every_sticky_cuda_error_is_fatal_as_torch_words_it(code):
    assert is_fatal_device_error(torch.AcceleratorError(f"CUDA error: {FATAL_CUDA_ERRORS[code]}{TORCH_SUFFIX}"))
    assert is_fatal_device_error(RuntimeError(f"CUDA error: {FATAL_CUDA_ERRORS[code]}"))


def test_a_fatal_error_is_known_by_its_code_too():
    class Coded(torch.AcceleratorError):  # torch sets error_code itself on the errors it raises
        error_code = 226

    assert is_fatal_device_error(Coded("Error 226 in a future wording"))


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError(CUDA_OOM),
        torch.AcceleratorError("CUDA error: out of memory" + TORCH_SUFFIX),
        RuntimeError("CUDA error: invalid argument"),
        ValueError("CUDA error: an illegal memory access was encountered"),  # not a device error, whatever it says
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
    ],
)
def test_recoverable_errors_are_not_fatal(error):
    assert not is_fatal_device_error(error)


def test_a_fatal_device_error_fails_the_prediction_saying_so_and_the_health_check_reports_it(engines, monkeypatch):
    engine = engines("sd15")
    monkeypatch.setattr(engine, "fault", DeviceFault())  # a fresh record for this test; the old one is put back
    worker = Worker()
    health = health_of(engine.fault, worker)
    assert check(health) is True
    handle = failing_denoiser(engine, torch.AcceleratorError(ILLEGAL_ACCESS))
    try:
        with pytest.raises(DeviceFailed, match=r"The GPU failed \(AcceleratorError: CUDA error: an illegal memory "
                                               r"access was encountered\).*run the prediction again"):  # fmt: skip
            engine.generate(request())
    finally:
        handle.remove()
    with pytest.raises(Unhealthy, match="the GPU reported a fatal error .*illegal memory access.*every later"):
        check(health)
    # It stays unhealthy: the context stays poisoned whatever comes next.
    engine.generate(request())
    with pytest.raises(Unhealthy):
        check(health)


@pytest.mark.parametrize(
    "error, raised",
    [(torch.OutOfMemoryError(CUDA_OOM), OutOfMemory), (ValueError("a bug"), ValueError)],
    ids=["out-of-memory", "a-bug"],
)
def test_a_prediction_that_fails_otherwise_leaves_the_instance_healthy(engines, monkeypatch, error, raised):
    engine = engines("sd15")
    monkeypatch.setattr(engine, "fault", DeviceFault())
    handle = failing_denoiser(engine, error)
    try:
        with pytest.raises(raised):
            engine.generate(request())
    finally:
        handle.remove()
    assert engine.fault.error is None and check(health_of(engine.fault, Worker())) is True


def test_a_stopped_model_thread_is_unhealthy():
    worker = Worker()
    health = health_of(DeviceFault(), worker)
    assert check(health) is True
    worker.alive = False
    with pytest.raises(Unhealthy, match="the model thread has stopped: no prediction can run"):
        check(health)


def test_the_device_probe_runs_on_the_model_thread_only_while_it_is_idle():
    worker = Worker()
    probes = []
    health = health_of(DeviceFault(), worker, "cpu")
    health.run_on_worker = lambda fn: (probes.append(fn), worker.run(fn))[1]
    assert check(health) is True and len(probes) == 1 and worker.ran_on[0] != threading.current_thread().name
    worker.busy = True  # a running prediction exercises the device itself
    assert check(health) is True and len(probes) == 1


def test_a_device_that_fails_the_probe_is_unhealthy_and_the_fault_is_kept():
    fault, worker = DeviceFault(), Worker()

    async def lost(fn):
        raise torch.AcceleratorError("CUDA error: unknown error" + TORCH_SUFFIX)

    health = health_of(fault, worker, "cpu")
    health.run_on_worker = lost
    with pytest.raises(Unhealthy, match="the cpu device failed a tiny operation .*CUDA error: unknown error"):
        check(health)
    assert fault.error == "AcceleratorError: CUDA error: unknown error"
    health.run_on_worker = worker.run  # the device answers again: the poisoned context does not come back
    with pytest.raises(Unhealthy, match="the GPU reported a fatal error"):
        check(health)


def test_a_device_that_does_not_answer_in_time_is_unhealthy():
    worker = Worker()

    async def hung(fn):
        await asyncio.sleep(30)

    health = health_of(DeviceFault(), worker, "cpu", probe_timeout_s=0.2)
    health.run_on_worker = hung
    with pytest.raises(Unhealthy, match="did not complete a tiny operation within 0.2 s"):
        check(health)


def test_the_probe_touches_nothing_on_the_cpu():
    assert probe_device(torch.device("cpu")) is None
