"""Keeping one prediction's failure from becoming the container's: a Cog worker that dies is not restarted.

`PredictionGuard` (what Engine.generate runs its pipeline call in): an out-of-memory error becomes `OutOfMemory`,
a message that says what to lower, after the frames that held the tensors are cleared and the allocator's cache
is emptied; after any failure or cancellation, components moved or cast during the call are put back, so the next
prediction runs exactly as before. The schedulers need nothing: every diffusers pipeline call starts with
`scheduler.set_timesteps`, which resets their per-call state (`_step_index`, `_begin_index`) in LCMScheduler and
in flashsd.schedulers' Flash scheduler alike. A fatal device error (one that poisons the CUDA context:
flashsd.health) is recorded in the engine's DeviceFault and becomes `DeviceFailed`, which says that this instance
can no longer serve. It works on what the engine exposes (its modules and fault record), not on the engine itself.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import InputError
from .health import DeviceFault

if TYPE_CHECKING:
    from .request import GenerationRequest

log = logging.getLogger("flashsd")


class OutOfMemory(InputError):
    """The request needs more memory than the device has free: the message says what to lower."""


_OOM_ERRORS = (torch.OutOfMemoryError, MemoryError)  # torch.cuda.OutOfMemoryError is torch.OutOfMemoryError
# RuntimeErrors that are allocation failures under another name (cuBLAS/cuDNN workspaces, the CPU allocator).
_OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "failed to allocate memory",
)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, _OOM_ERRORS):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MARKERS)


def out_of_memory_message(request: GenerationRequest, device: torch.device) -> str:
    memory = "GPU memory" if device.type == "cuda" else "memory"
    megapixels = request.width * request.height / 1e6
    lower = []
    if request.num_outputs > 1:
        lower.append(f"num_outputs (it is {request.num_outputs}; the images are generated together)")
    lower.append(
        f"the size (it is {request.width}x{request.height}, {megapixels:.1f} megapixels: pick a smaller "
        "aspect_ratio, or smaller width and height with aspect_ratio 'custom')"
    )
    if len(request.controls) > 1:
        lower.append(f"the number of controls (it is {len(request.controls)}; each ControlNet runs at every step)")
    if request.guidance_scale > 1:
        lower.append(
            f"guidance_scale to 1 or less (it is {request.guidance_scale:g}; above 1 each image is computed twice)"
        )
    return (
        f"Out of {memory} generating {request.num_outputs} image(s) at {request.width}x{request.height}: lower "
        f"{'; or '.join(lower)}, then try again. The memory was freed; the next prediction runs normally."
    )


def free_memory() -> None:
    """Collect what the failed call left unreferenced and give the allocator's cached blocks back."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        with contextlib.suppress(Exception):  # a broken CUDA context must not hide the real error
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()


# -- state restored after a failure ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModuleState:
    module: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    training: bool


def _uniform_state(module: torch.nn.Module) -> tuple[torch.device, torch.dtype] | None:
    """(device, dtype) of the module's floating-point parameters when they all agree, else None."""
    states = {(p.device, p.dtype) for p in module.parameters() if p.is_floating_point()}
    return states.pop() if len(states) == 1 else None


def snapshot(modules: Mapping[str, torch.nn.Module]) -> dict[str, _ModuleState]:
    shot = {}
    for name, module in modules.items():
        first = next((p for p in module.parameters() if p.is_floating_point()), None)
        if first is not None:
            shot[name] = _ModuleState(module, first.device, first.dtype, module.training)
    return shot


def restore(shot: dict[str, _ModuleState]) -> list[str]:
    """Put back what a failed or cancelled call changed; returns what was restored (for the log)."""
    restored = []
    for name, state in shot.items():
        module = state.module
        if module.training != state.training:
            module.train(state.training)
            restored.append(f"{name} back in {'training' if state.training else 'eval'} mode")
        current = _uniform_state(module)
        if current is not None and current != (state.device, state.dtype):
            # e.g. a VAE upcast to float32 for decoding (diffusers' upcast_vae) when the decode failed
            module.to(device=state.device, dtype=state.dtype)
            restored.append(f"{name} back to {str(state.dtype).removeprefix('torch.')} on {state.device}")
    return restored


class PredictionGuard:
    """`with PredictionGuard(modules, request, device): pipe(...)`.

    On an exception (cancellation included): restores the modules' device, dtype and mode; an out-of-memory error
    is replaced by `OutOfMemory` once memory is freed; a fatal device error is recorded in `fault` and replaced by
    `DeviceFailed`.
    """

    def __init__(
        self,
        modules: Mapping[str, torch.nn.Module],
        request: GenerationRequest,
        device: torch.device,
        fault: DeviceFault | None = None,
    ):
        self.modules, self.request, self.device, self.fault = modules, request, device, fault

    def __enter__(self) -> PredictionGuard:
        self._shot = snapshot(self.modules)
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            return False
        out_of_memory = is_out_of_memory(error)
        if out_of_memory:
            last = traceback.extract_tb(tb)[-1] if tb is not None else None
            where = f" in {last.name} ({Path(last.filename).name}:{last.lineno})" if last else ""
            cause = f"{type(error).__name__}{where}: {_first_line(error)}"
            # The frames of the failed call hold its activations (and closures such as torch's hook wrapper keep
            # them even from cleared frames): clear the frames and drop the traceback before freeing memory.
            traceback.clear_frames(tb)
            error.__traceback__ = None
            del tb
            free_memory()
        try:
            restored = restore(self._shot)
        except BaseException as restore_error:  # noqa: BLE001 - said loudly, then the original error goes on
            log.error("Could not restore the pipeline after a failed prediction: %r", restore_error)
            restored = []
        if restored:
            log.warning("Restored after the failed prediction: %s", ", ".join(restored))
        if self.fault is not None and self.fault.record(error):
            raise self.fault.failure() from error
        if not out_of_memory:
            return False  # the original exception (or cancellation) propagates unchanged
        log.warning("%s; memory freed, the worker carries on", cause)
        raise OutOfMemory(out_of_memory_message(self.request, self.device)) from None


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "…"
