"""Where and in what precision the pipeline runs, chosen once at setup from FLASHSD_DEVICE.

auto  (the default, when unset: tests, `make demo`, `make serve`) CUDA in fp16 when torch can use it,
      else the CPU in fp32
cuda  CUDA in fp16, or a DeviceError saying why not: cog.yaml sets it, so the container never falls back to
      the CPU without a word (with a driver too old for torch's CUDA, torch only warns and reports no GPU)
cpu   the CPU in fp32, even with a GPU
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DeviceError

DEVICE_VARIABLE = "FLASHSD_DEVICE"
# The oldest Linux driver branch each CUDA version of a torch build runs on (NVIDIA's CUDA release notes,
# "CUDA Toolkit and Corresponding Driver Versions"; minor-version compatibility aside).
MIN_DRIVER = {"13.0": "580", "12.8": "570", "12.6": "560", "12.4": "550"}
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
# torch's warning when cuInit finds an older driver; the number is the CUDA version it supports (12080 = 12.8).
_TOO_OLD = re.compile(r"NVIDIA driver on your system is too old \(found version (\d+)\)")


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision the pipeline runs; decided once, in select_runtime."""

    device: torch.device
    dtype: torch.dtype


CPU = Runtime(torch.device("cpu"), torch.float32)
CUDA = Runtime(torch.device("cuda"), torch.float16)  # with the fp16-safe VAE


def select_runtime(choice: str = "auto") -> Runtime:
    """The runtime FLASHSD_DEVICE (`choice`, one of settings.DEVICES, checked there) asks for (see the module's
    docstring); DeviceError when it cannot be had."""
    if choice == "cpu":
        return CPU
    available, driver_warning = _cuda_available()
    if available:
        return CUDA
    if choice == "cuda":
        raise DeviceError(_no_cuda_message(driver_warning))
    return CPU


def _cuda_available() -> tuple[bool, str | None]:
    """torch.cuda.is_available(), with the "driver too old" warning it may give (once per process) captured."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    for w in caught:  # still shown (auto falls back to the CPU on it), subject to the usual filters
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    found = next((m for w in caught if (m := _TOO_OLD.search(str(w.message)))), None)
    if found is None:
        return available, None
    version = int(found.group(1))
    cuda = f"{version // 1000}.{version % 1000 // 10}"
    return available, f'an NVIDIA driver that supports CUDA up to {cuda} (torch: "found version {version}")'


def driver_found(driver_warning: str | None = None) -> str:
    """The NVIDIA driver on this machine, in words: from torch's warning, else the kernel module's version file."""
    if driver_warning:
        return driver_warning
    try:
        text = DRIVER_VERSION_FILE.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "no NVIDIA driver found"
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text) or re.search(
        r"\b(\d{3}\.\d+(?:\.\d+)?)\b", text
    )
    if match:
        return f"NVIDIA driver {match.group(1)} ({DRIVER_VERSION_FILE})"
    first_line = text.strip().splitlines()[0] if text.strip() else "empty"
    return f"an NVIDIA driver of unknown version ({DRIVER_VERSION_FILE}: {first_line})"


def _no_cuda_message(driver_warning: str | None) -> str:
    cuda = torch.version.cuda
    found = driver_found(driver_warning)
    head = (
        f"{DEVICE_VARIABLE}=cuda (as cog.yaml sets it), but torch cannot use a GPU here; it does not fall back to the CPU. "
        f"torch {torch.__version__} is "
    )
    if cuda is None:
        return head + (
            f"a CPU-only build; found here: {found}. Install torch's CUDA build (the image's "
            f"requirements.txt pin, built for CUDA 13.0), or set {DEVICE_VARIABLE}=cpu (or auto) to run on the CPU."
        )
    needed = MIN_DRIVER.get(cuda)
    needs = (
        f"NVIDIA driver {needed} or newer" if needed else "the NVIDIA driver NVIDIA's CUDA release notes list for it"
    )
    return head + (
        f"built for CUDA {cuda}, which needs {needs}; found here: {found}. "
        f"Run the container on a host with {needs} and give it the GPU (`cog run`/`cog serve` do; "
        '`docker run --gpus all`), or rebuild the image for an older CUDA version (README: "GPU driver"). '
        f"To run on the CPU anyway (slow), set {DEVICE_VARIABLE}=cpu."
    )
