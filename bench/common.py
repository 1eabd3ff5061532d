"""Helpers shared by the benchmark sections: timing with medians, machine facts, tables."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def synchronize() -> None:
    """Wait for queued GPU work, so wall-clock time covers it (a no-op on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn()` takes, GPU work included."""
    synchronize()
    started = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - started


def medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run interleaved (a, b, c, a, b, c, ...) so that load from other
    processes on a shared machine falls on all of them alike; ratios of these medians are what the
    benchmarks report."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def wall_and_cpu_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, tuple[float, float]]:
    """Like `medians`, for single-threaded work done in this thread: (wall, CPU) median seconds. On a
    machine shared with other jobs the CPU time (time.thread_time) is the steadier of the two: it leaves
    out the time this thread waited for a core."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    walls: dict[str, list[float]] = {name: [] for name in fns}
    cpus: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            cpu, wall = time.thread_time(), time.perf_counter()
            fn()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.thread_time() - cpu)
    return {name: (statistics.median(walls[name]), statistics.median(cpus[name])) for name in fns}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the figures were measured on."""
    import diffusers
    import PIL
    import torch

    facts = {
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "pillow": PIL.__version__,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            device="cuda",
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return facts


def device_label(facts: dict) -> str:
    """A short name for result files: 'cpu' or the GPU's name."""
    if facts.get("device") == "cuda":
        return "".join(c if c.isalnum() else "-" for c in facts["gpu"].lower()).strip("-")
    return "cpu"


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def table(rows: list[tuple], headers: tuple[str, ...]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [tuple(str(c) for c in headers)] + [tuple("" if c is None else str(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]]
    )
