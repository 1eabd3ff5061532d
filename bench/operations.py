#!/usr/bin/env python3
"""What the health check and the per-prediction metrics cost, and how fast a failed instance says so.

On the real Cog server (coglet) on loopback, with testkit/predictors/operations.py (the product's Predictor with
fault switches): the `GET /health-check` round trip while idle and while a prediction holds the model's thread (the
check must not wait behind it), then after an injected fatal CUDA error: the check's answer and how long a later
prediction takes to fail, against a normal prediction's round trip. In process: what the stage clock's hooks (the
metrics' prompt-encoding and denoising times) add to a forward, and to a pipeline call.

    python -m bench.operations                    # tiny random SD1.5 weights, built now
    python -m bench.operations --json operations.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from testkit.cog_server import CogServer, server_root
from testkit.tiny_repos import build_tiny_weights

SMALL = {"aspect_ratio": "custom", "width": 64, "height": 64, "output_format": "png"}
STUB = "testkit/predictors/operations.py:OperationsPredictor"


def milliseconds(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "n": len(ordered),
    }


def health_round_trips(server: CogServer, count: int) -> tuple[list[float], set[str]]:
    times, statuses = [], set()
    for _ in range(count):
        started = time.perf_counter()
        statuses.add(server.health_check()["status"])
        times.append(time.perf_counter() - started)
    return times, statuses


def while_a_prediction_runs(server: CogServer) -> tuple[list[float], set[str], float]:
    """Health checks sent while a `#slow` prediction (seconds on the model's thread) runs; its own duration."""
    done = threading.Event()
    took = []

    def predict():
        started = time.perf_counter()
        server.post({**SMALL, "prompt": "a lighthouse #slow"})
        took.append(time.perf_counter() - started)
        done.set()

    thread = threading.Thread(target=predict)
    thread.start()
    time.sleep(1.0)  # inside the call by now
    times, statuses = [], set()
    while not done.is_set():
        more, seen = health_round_trips(server, 1)
        times += more
        statuses |= seen
        time.sleep(0.05)
    thread.join()
    return times, statuses, took[0]


def prediction_round_trip(server: CogServer, prompt: str) -> tuple[float, dict]:
    started = time.perf_counter()
    body = server.predict({**SMALL, "prompt": prompt}).json()
    return time.perf_counter() - started, body


def hook_cost(repeats: int = 20000) -> dict[str, float]:
    """Seconds the stage clock's two hooks add to one forward of a trivial module (CPU: no synchronization)."""
    from flashsd.metrics import StageClock

    class Pipe:  # what the clock reads: components and the denoiser
        def __init__(self):
            self.text_encoder, self.unet = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.components = {"text_encoder": self.text_encoder, "unet": self.unet}

    pipe = Pipe()
    x = torch.zeros(1, 4)

    def forwards() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for _ in range(repeats):
                pipe.unet(x)
        return time.perf_counter() - started

    plain, hooked = [], []
    for _ in range(5):
        plain.append(forwards())
        with StageClock(pipe, "unet", torch.device("cpu")):
            hooked.append(forwards())
    return {"per_forward_us": round((statistics.median(hooked) - statistics.median(plain)) / repeats * 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--health-checks", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results: dict = {"hooks": hook_cost()}
    with tempfile.TemporaryDirectory(prefix="flashsd-operations-") as tmp:
        tmp = Path(tmp)
        weights = build_tiny_weights(tmp / "weights", ("sd15",))
        (tmp / "tmp").mkdir()
        env = {
            "FLASHSD_WEIGHTS": str(weights), "FLASHSD_MODEL": "sd15", "COG_MAX_CONCURRENCY": "4",
            "TMPDIR": str(tmp / "tmp"), "HF_HUB_OFFLINE": "1", "COG_PREDICT_TYPE_STUB": STUB,
        }  # fmt: skip
        with CogServer(env, tmp / "server.log", cwd=server_root(tmp / "root")) as server:
            if server.health() != "READY":
                print(server.logs()[-3000:], file=sys.stderr)
                return 1
            prediction_round_trip(server, "warm-up")
            server.wait_ready()
            idle, statuses = health_round_trips(server, args.health_checks)
            results["health_idle"] = milliseconds(idle) | {"statuses": sorted(statuses)}
            busy, statuses, took = while_a_prediction_runs(server)
            results["health_during_prediction"] = milliseconds(busy) | {
                "statuses": sorted(statuses), "prediction_s": round(took, 2),
            }  # fmt: skip
            normal = []
            for index in range(5):
                server.wait_ready()
                seconds, body = prediction_round_trip(server, f"a harbour {index}")
                normal.append(seconds)
                metrics = body["metrics"]
            results["prediction_round_trip"] = milliseconds(normal)
            results["metrics_example"] = metrics
            server.wait_ready()
            _, fatal = prediction_round_trip(server, "a lighthouse #cuda-error")
            unhealthy, statuses = health_round_trips(server, 20)
            results["health_after_fault"] = milliseconds(unhealthy) | {
                "statuses": sorted(statuses), "error": server.health_check().get("user_healthcheck_error"),
            }  # fmt: skip
            failing = []
            for index in range(5):
                seconds, body = prediction_round_trip(server, f"a desert {index}")
                assert body["status"] == "failed", body
                failing.append(seconds)
            results["failing_prediction_round_trip"] = milliseconds(failing)
            results["fault_error"] = fatal.get("error")
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
