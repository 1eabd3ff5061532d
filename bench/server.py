"""HTTP round trip through the real Cog server (coglet, as the container runs it) against the time the
prediction itself took, read from the same response (`metrics.predict_time`)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.common import ms, table
from flashsd.models import FlashModel
from testkit.cog_server import CogServer


def run(model: FlashModel, root: Path, size: int, repeats: int, in_process_ms: float | None = None) -> dict:
    inputs = {"prompt": "a photo of an astronaut riding a horse on the moon", "aspect_ratio": "custom",
              "width": size, "height": size, "seed": 1234, "output_format": "webp"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        env = {"FLASHSD_WEIGHTS": str(root), "FLASHSD_MODEL": model.key}
        started = time.perf_counter()
        with CogServer(env, Path(tmp) / "server.log") as server:
            ready_s = time.perf_counter() - started
            if server.health() != "READY":
                raise RuntimeError(f"cog server not ready:\n{server.logs()[-3000:]}")
            round_trips, predict_times, body_bytes = [], [], 0
            for i in range(repeats + 1):
                for _ in range(100):  # the slot may be freed a moment after the previous response
                    sent = time.perf_counter()
                    response = server.post(inputs)
                    elapsed = time.perf_counter() - sent
                    if response.status_code != 409:
                        break
                    time.sleep(0.05)
                body = response.json()
                if response.status_code != 200 or body.get("status") != "succeeded":
                    raise RuntimeError(f"prediction failed: {response.status_code} {str(body)[:500]}")
                if i == 0:
                    continue  # the first call warms the worker up
                round_trips.append(elapsed)
                predict_times.append(float(body["metrics"]["predict_time"]))
                body_bytes = len(response.content)
    rt, pt = statistics.median(round_trips), statistics.median(predict_times)
    result = {
        "size": f"{size}x{size}", "server_ready_s": round(ready_s, 2), "round_trip_ms": ms(rt),
        "server_predict_time_ms": ms(pt), "overhead_ms": ms(rt - pt), "ratio": round(rt / pt, 3),
        "response_kib": round(body_bytes / 1024, 1),
    }  # fmt: skip
    if in_process_ms:
        result["in_process_predict_ms"] = in_process_ms
        result["ratio_to_in_process_predict"] = round(rt * 1000 / in_process_ms, 3)
    return result


def report(result: dict) -> str:
    rows = [
        ("round trip (POST /predictions)", result["round_trip_ms"]),
        ("predict_time reported by the server", result["server_predict_time_ms"]),
        ("HTTP + serialisation overhead", result["overhead_ms"]),
    ]
    if "in_process_predict_ms" in result:
        rows.append(("predict() called in-process", result["in_process_predict_ms"]))
    return "\n".join([
        f"Cog HTTP server ({result['size']} webp, response {result['response_kib']} KiB; server ready in "
        f"{result['server_ready_s']} s incl. setup)",
        table(rows, ("", "ms")),
        f"round trip / predict_time {result['ratio']}"
        + (f"; round trip / in-process predict() {result['ratio_to_in_process_predict']}" if "in_process_predict_ms" in result else ""),
    ])  # fmt: skip
