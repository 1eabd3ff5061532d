"""Load: concurrent clients against the real Cog server, one prediction at a time vs concurrent with batching.

    python -m bench.load                       # tiny random SD1.5 weights at 64x64 (built in a temp dir)
    python -m bench.load --model sdxl --weights weights/ --size 1024 --requests 16

Prints, for 1, 2, 4 and 8 clients each sending single-image predictions back to back: images/s and the p50 / p95
latency, with the server at COG_MAX_CONCURRENCY=1 (one at a time: a busy server answers 409 and the client
retries, as a load balancer would) and at the concurrency predict.py declares; and the ratio of four
single-image predictions sent at once to one prediction of the same four images (same server, same run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.common import table
from testkit.cog_server import CogServer, declared_concurrency


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def post_until_accepted(server: CogServer, inputs: dict) -> tuple[float, dict]:
    """Seconds from the first try to the answer (409s retried at once, as a balancer with one replica would)."""
    started = time.perf_counter()
    while (response := server.post(inputs)).status_code == 409:
        time.sleep(0.005)
    body = response.json()
    assert body["status"] == "succeeded", body
    return time.perf_counter() - started, body


def clients(server: CogServer, count: int, per_client: int, inputs: dict) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for n in range(per_client):
            seconds, _ = post_until_accepted(server, {**inputs, "seed": 1000 * index + n})
            with lock:
                latencies.append(seconds)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "images_per_s": round(len(latencies) / wall, 2),
        "p50_s": round(percentile(latencies, 0.5), 3),
        "p95_s": round(percentile(latencies, 0.95), 3),
    }


def four_at_once_vs_one_call(server: CogServer, inputs: dict, repeats: int) -> dict:
    """Median seconds of one 4-image prediction and of 4 single-image predictions sent at once, interleaved."""
    one, four = [], []
    for r in range(repeats):
        one.append(post_until_accepted(server, {**inputs, "num_outputs": 4, "seed": r})[0])
        server.wait_ready()
        barrier = threading.Barrier(4)
        done: list[float] = []

        def single(i: int, r: int = r) -> None:
            barrier.wait()
            done.append(post_until_accepted(server, {**inputs, "seed": r + i})[0])

        started = time.perf_counter()
        threads = [threading.Thread(target=single, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        four.append(time.perf_counter() - started)
        server.wait_ready()
    return {"one_call_4_images_s": statistics.median(one), "4_requests_at_once_s": statistics.median(four)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--weights", help="a weights root (default: tiny random weights built in a temp dir)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8, help="predictions per client")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    inputs = {"prompt": "a lighthouse at dawn", "aspect_ratio": "custom", "width": args.size, "height": args.size,
              "output_format": "jpg", "disable_safety_checker": True}  # fmt: skip
    results: dict = {"model": args.model, "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            from testkit.tiny_repos import build_tiny_weights

            weights = str(build_tiny_weights(Path(tmp) / "weights", (args.model,)))
        concurrency = declared_concurrency()
        for label, limit in (("one at a time", 1), (f"concurrent ({concurrency})", concurrency)):
            env = {"FLASHSD_WEIGHTS": weights, "FLASHSD_MODEL": args.model, "COG_MAX_CONCURRENCY": str(limit)}
            with CogServer(env, Path(tmp) / f"server-{limit}.log") as server:
                post_until_accepted(server, inputs)  # warm
                results[label] = {n: clients(server, n, args.requests, inputs) for n in (1, 2, 4, 8)}
                if limit > 1:
                    results["batching"] = four_at_once_vs_one_call(server, inputs, args.repeats)
    rows = [
        (f"{n} client(s)", *(f"{results[label][n]['images_per_s']} img/s, p50 {results[label][n]['p50_s']} s, "
                             f"p95 {results[label][n]['p95_s']} s" for label in list(results)[2:4]))
        for n in (1, 2, 4, 8)
    ]  # fmt: skip
    print(table(rows, ("clients", *list(results)[2:4])))
    batching = results["batching"]
    ratio = batching["4_requests_at_once_s"] / batching["one_call_4_images_s"]
    batching["ratio"] = round(ratio, 3)
    print(
        f"\n4 single-image predictions at once: {batching['4_requests_at_once_s']:.3f} s; one prediction of 4 images: "
        f"{batching['one_call_4_images_s']:.3f} s; ratio {ratio:.3f} (target <= 1.25)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
