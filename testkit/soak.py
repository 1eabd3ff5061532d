"""A soak of the real Cog server (coglet) on loopback: many varied predictions, sequential or from several clients,
with the worker's and coglet's resident memory (RSS), open file descriptors and threads and the files left in the
temporary folder sampled along the way (growth per 100 predictions from a least-squares fit); and requests beyond
capacity while one prediction runs. bench/soak.py runs it from the command line, tests/test_robustness_http.py and
tests/test_concurrency_http.py in the suite.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from testkit.cog_server import CogServer, files_under, open_fds, rss_mb, tiny_png, wait_ready, worker_pid

# What the README promises for a soak, after a warm-up of WARM_UP predictions.
RSS_GROWTH_BOUND_MB = 150  # worker RSS, after - before (allocator caches and lazily built state settle early)
FD_GROWTH_BOUND = 4  # open file descriptors, worker and coglet each
WARM_UP = 20


@dataclass
class Sample:
    done: int
    worker_rss_mb: float
    server_rss_mb: float
    worker_fds: int
    server_fds: int
    worker_threads: int
    temp_files: int


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def sample(server: CogServer, done: int, temp: Path) -> Sample:
    worker = worker_pid(server)
    return Sample(
        done,
        round(rss_mb(worker), 1),
        round(rss_mb(server.process.pid), 1),
        open_fds(worker),
        open_fds(server.process.pid),
        threads(worker),
        len(files_under(temp)),
    )


def inputs_for(i: int) -> dict:
    """Varied cheap requests: formats, batch sizes, sizes, seeds, plain, weighted and long prompts (the last two
    encoded by flashsd with the model's own tokenizers, the first by the pipeline), now and then image-to-image."""
    prompts = (
        f"a lighthouse at dawn, variation {i}",
        f"a (lighthouse:1.3) at [dawn], variation {i}",
        f"a lighthouse at dawn, variation {i}, " + "stormy sea, dramatic sky, " * 12,  # over 75 tokens
    )
    inputs = {
        "prompt": prompts[i % 3 if i % 2 else 0],
        "aspect_ratio": "custom",
        "width": (64, 128, 64, 96)[i % 4],
        "height": (64, 64, 128, 96)[i % 4],
        "num_outputs": 1 + (i % 7 == 0),
        "seed": i,
        "output_format": ("webp", "jpg", "png")[i % 3],
        "disable_safety_checker": True,
    }
    if i % 10 == 5:
        inputs["image"] = tiny_png((64, 64))
    return inputs


@dataclass
class SoakResult:
    predictions: int
    statuses: dict[str, int]
    seconds: float
    per_prediction_ms: float
    before: Sample
    after: Sample
    samples: list[Sample] = field(default_factory=list)
    rss_growth_mb: float = 0.0
    rss_slope_mb_per_100: float = 0.0
    leftover_files: list[str] = field(default_factory=list)
    worker_replaced: bool = False
    clients: int = 1  # predictions sent at once (the server's COG_MAX_CONCURRENCY should allow them)

    def problems(self) -> list[str]:
        found = []
        if self.statuses.get("succeeded", 0) != self.predictions:
            found.append(f"not every prediction succeeded: {self.statuses}")
        if self.rss_growth_mb > RSS_GROWTH_BOUND_MB:
            found.append(f"worker RSS grew {self.rss_growth_mb:.0f} MB (bound {RSS_GROWTH_BOUND_MB} MB)")
        for who in ("worker", "server"):
            grown = getattr(self.after, f"{who}_fds") - getattr(self.before, f"{who}_fds")
            if grown > FD_GROWTH_BOUND:
                found.append(f"{who} open files grew by {grown}")
        # concurrent predictions fill asyncio's default thread pool (bounded: min(32, cores + 4)) as they come
        pool = 0 if self.clients == 1 else min(32, (os.cpu_count() or 1) + 4)
        if self.after.worker_threads > self.before.worker_threads + 2 + pool:
            found.append(f"worker threads {self.before.worker_threads} -> {self.after.worker_threads}")
        # the output folders of the last predictions in flight are kept until newer ones replace them
        if self.after.temp_files > self.before.temp_files + 2 * self.clients:
            found.append(
                f"temporary files {self.before.temp_files} -> {self.after.temp_files}: {self.leftover_files[:5]}"
            )
        if self.worker_replaced:
            found.append("the worker process was replaced")
        return found


def soak(
    server: CogServer, temp: Path, predictions: int, every: int = 25, warm_up: int = WARM_UP, clients: int = 1
) -> SoakResult:
    pid = worker_pid(server)
    for i in range(warm_up):
        server.predict(inputs_for(100_000 + i)).raise_for_status()
    wait_ready(server)
    before = sample(server, 0, temp)
    samples = [before]
    statuses: dict[str, int] = {}
    started = time.monotonic()

    def one(i: int) -> str:
        response = server.predict(inputs_for(i), busy_wait=60)
        return (
            response.json().get("status", f"http {response.status_code}")
            if response.ok
            else f"http {response.status_code}"
        )

    with ThreadPoolExecutor(max_workers=clients) as pool:
        for chunk in range(0, predictions, every):
            for status in pool.map(one, range(chunk, min(predictions, chunk + every))):
                statuses[status] = statuses.get(status, 0) + 1
            wait_ready(server)
            samples.append(sample(server, min(predictions, chunk + every), temp))
    seconds = time.monotonic() - started
    after = samples[-1]
    xs = [s.done for s in samples]
    ys = [s.worker_rss_mb for s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mean_x) ** 2 for x in xs))
    return SoakResult(
        predictions=predictions,
        statuses=statuses,
        seconds=round(seconds, 1),
        per_prediction_ms=round(1000 * seconds / predictions, 1),
        before=before,
        after=after,
        samples=samples,
        rss_growth_mb=round(after.worker_rss_mb - before.worker_rss_mb, 1),
        rss_slope_mb_per_100=round(100 * slope, 2),
        leftover_files=[str(p.relative_to(temp)) for p in files_under(temp)],
        worker_replaced=worker_pid(server) != pid,
        clients=clients,
    )


@dataclass
class BusyResult:
    extra_requests: int
    extra_statuses: dict[int, int]
    extra_messages: list[str]
    running_status: str
    overlapped: bool  # the extra requests all came back while it was still running
    running_equal_to_alone: bool
    running_seconds: float


def beyond_capacity(server: CogServer, extra: int = 8, inputs: dict | None = None) -> BusyResult:
    """One slow prediction; `extra` concurrent ones while it runs; then the slow one again, alone."""
    inputs = inputs or {
        "prompt": "a lighthouse at dawn",
        "aspect_ratio": "custom",
        "width": 512,
        "height": 512,
        "num_outputs": 2,
        "seed": 42,
        "disable_safety_checker": True,
    }
    wait_ready(server)
    log_start = len(server.logs())
    holder: dict = {}

    def run_slow() -> None:
        t = time.monotonic()
        holder["r"] = requests.put(
            f"{server.url}/predictions/soak-slow-{time.monotonic_ns()}", json={"input": inputs}, timeout=600
        )
        holder["s"] = time.monotonic() - t

    thread = threading.Thread(target=run_slow)
    thread.start()
    deadline = time.monotonic() + 60
    while "Generating" not in server.logs()[log_start:] and time.monotonic() < deadline:
        time.sleep(0.02)
    cheap = {"prompt": "a cat", "aspect_ratio": "custom", "width": 64, "height": 64}
    with ThreadPoolExecutor(extra) as pool:
        responses = list(pool.map(lambda _: server.post(cheap, timeout=60), range(extra)))
    still_running = thread.is_alive()
    thread.join()
    statuses: dict[int, int] = {}
    for r in responses:
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    slow = holder["r"].json()
    alone = server.predict(inputs).json()
    return BusyResult(
        extra_requests=extra,
        extra_statuses=statuses,
        extra_messages=sorted({r.text[:120] for r in responses}),
        running_status=slow.get("status"),
        overlapped=still_running,
        running_equal_to_alone=slow.get("output") == alone.get("output") and bool(alone.get("output")),
        running_seconds=round(holder["s"], 2),
    )
