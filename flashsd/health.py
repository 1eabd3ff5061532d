"""Whether this container can still serve: what its Cog health check reports.

How Cog asks (coglet 0.23.1, read in replicate/cog's crates/coglet-python/src/predictor.rs and worker_bridge.rs,
crates/coglet/src/transport/http/routes.rs, and checked against the installed server): every `GET /health-check`
on a server whose setup succeeded calls the predictor's `healthcheck()` method, if it has one. An `async def`
runs on the predictor's event loop under `asyncio.wait_for(..., 5.0)`; a plain `def` runs in a new one-thread
pool, also 5 s. It is healthy when it returns True (or anything that is not a bool); False, an exception or the
5 s timeout turn the response's `status` into `UNHEALTHY` (HTTP 200) with `user_healthcheck_error` saying why:
"Healthcheck failed: user-defined healthcheck returned False", "Healthcheck failed: <Type>: <message>" or
"... timed out after 5.0 seconds". Replicate replaces an instance that reports UNHEALTHY. So the check raises
`Unhealthy` with the reason, and stays cheap: no denoiser pass, at most one tiny operation on the device.

What makes this instance unable to serve:
- a fatal device error: CUDA errors that poison the process's context (an illegal memory access, a device-side
  assert, a lost device...): every later CUDA call fails the same way until the process restarts. The engine's
  PredictionGuard records the first one in a `DeviceFault` (and turns it into `DeviceFailed`, a message that says so);
- the model thread (the batching worker that runs every prediction) has stopped: predictions would wait forever;
- the device does not complete a tiny operation (a GPU lost while idle), checked only while the model thread is
  idle: torch is touched from that thread alone, and a running prediction exercises the device itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

import torch

log = logging.getLogger("flashsd")

PROBE_TIMEOUT_S = 3.0  # well inside coglet's 5 s, so a hung device reads as such, not as a timed-out check
# CUDA runtime errors after which "the process is left in an inconsistent state and any further CUDA work will
# return the same error; to continue using CUDA, the process must be terminated and relaunched" (CUDA Runtime API,
# cudaError_t), with the text cudaGetErrorString gives, which torch puts after "CUDA error: ".
FATAL_CUDA_ERRORS = {
    700: "an illegal memory access was encountered",  # cudaErrorIllegalAddress
    702: "the launch timed out and was terminated",  # cudaErrorLaunchTimeout
    710: "device-side assert triggered",  # cudaErrorAssert
    714: "hardware stack error",  # cudaErrorHardwareStackError
    715: "an illegal instruction was encountered",  # cudaErrorIllegalInstruction
    716: "misaligned address",  # cudaErrorMisalignedAddress
    717: "operation not supported on global/shared address space",  # cudaErrorInvalidAddressSpace
    718: "invalid program counter",  # cudaErrorInvalidPc
    719: "unspecified launch failure",  # cudaErrorLaunchFailure
    214: "uncorrectable ECC error encountered",  # cudaErrorECCUncorrectable
    999: "unknown error",  # cudaErrorUnknown: what a GPU that fell off the bus gives
    100: "no CUDA-capable device is detected",  # cudaErrorNoDevice
    46: "CUDA-capable device(s) is/are busy or unavailable",  # cudaErrorDevicesUnavailable
    226: None,  # cudaErrorContained (a hardware error contained by the GPU): known by its code only
}


class Unhealthy(RuntimeError):
    """This instance cannot serve: the message says why (coglet shows it as the health check's error)."""


class DeviceFailed(RuntimeError):
    """A prediction hit a fatal device error: it and every later prediction on this instance fail."""


def is_fatal_device_error(error: BaseException) -> bool:
    """True for a CUDA error that leaves the process's CUDA context unusable (FATAL_CUDA_ERRORS): by its code
    (torch.AcceleratorError's `error_code`) or by torch's "CUDA error: <text>". Out of memory is not one."""
    code = getattr(error, "error_code", None)
    if isinstance(code, int) and code in FATAL_CUDA_ERRORS:
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(f"CUDA error: {t}" in text for t in FATAL_CUDA_ERRORS.values() if t)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0][:300]


class DeviceFault:
    """The first fatal device error this process met (`error` is None until then). Thread-safe: recorded on the
    model thread, read by the health check on the event loop."""

    def __init__(self):
        self._lock = threading.Lock()
        self.error: str | None = None

    def record(self, error: BaseException) -> bool:
        """Keep `error` if it is a fatal device error (the first one only); returns whether it is one."""
        if not is_fatal_device_error(error):
            return False
        with self._lock:
            first = self.error is None
            if first:
                self.error = f"{type(error).__name__}: {_first_line(error)}"
        if first:
            log.error("Fatal device error (%s): this instance can no longer serve and reports itself unhealthy",
                      self.error)  # fmt: skip
        return True

    def failure(self) -> DeviceFailed:
        """What a prediction that met the fault fails with."""
        return DeviceFailed(
            f"The GPU failed ({self.error}); this prediction and any later one on this instance would fail. The "
            "instance now reports itself unhealthy so that it is replaced: run the prediction again."
        )


def probe_device(device: torch.device) -> None:
    """One tiny operation on `device` and its result read back (which synchronizes): raises when the device or its
    context is unusable. Nothing to do on the CPU. Run it on the model thread, as every torch call."""
    if device.type != "cuda":
        return
    total = float(torch.arange(4, device=device, dtype=torch.float32).mul(2).sum())
    if total != 12.0:
        raise RuntimeError(f"the device computed 2 * (0 + 1 + 2 + 3) = {total}")


class HealthCheck:
    """The predictor's `healthcheck()`: `await check()` returns True, or raises Unhealthy saying why.

    `worker_alive()` / `worker_busy()`: the model thread's state. `run_on_worker(fn)`: awaits `fn()` run on the model
    thread (None: no device to probe, e.g. the CPU)."""

    def __init__(
        self,
        fault: DeviceFault,
        *,
        worker_alive: Callable[[], bool],
        worker_busy: Callable[[], bool] = lambda: False,
        run_on_worker: Callable[[Callable[[], None]], Awaitable[None]] | None = None,
        device: torch.device | None = None,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
    ):
        self.fault = fault
        self.worker_alive, self.worker_busy, self.run_on_worker = worker_alive, worker_busy, run_on_worker
        self.device = device
        self.probe_timeout_s = probe_timeout_s

    async def check(self) -> bool:
        problems = self.problems()
        if not problems and self.run_on_worker is not None and self.device is not None and not self.worker_busy():
            problem = await self._probe()
            problems += [problem] if problem else []
        if problems:
            raise Unhealthy("; ".join(problems))
        return True

    def problems(self) -> list[str]:
        """What is known to be wrong without touching the device."""
        found = []
        if self.fault.error is not None:
            found.append(f"the GPU reported a fatal error ({self.fault.error}): every later prediction would fail")
        if not self.worker_alive():
            found.append("the model thread has stopped: no prediction can run")
        return found

    async def _probe(self) -> str | None:
        device = self.device
        try:
            await asyncio.wait_for(self.run_on_worker(lambda: probe_device(device)), self.probe_timeout_s)
        except TimeoutError:
            return f"the {device} device did not complete a tiny operation within {self.probe_timeout_s:g} s"
        except Exception as error:  # noqa: BLE001 - any failure of the probe is the answer
            self.fault.record(error)
            return f"the {device} device failed a tiny operation ({type(error).__name__}: {_first_line(error)})"
        return None
