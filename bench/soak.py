#!/usr/bin/env python3
"""Sustained load on the real Cog server (coglet) on loopback: many sequential predictions, then requests
beyond capacity while one runs.

Measures what would make a long-lived container fall over: the worker's and coglet's resident memory (RSS),
their open file descriptors and threads, and the files left in the temporary folder, after a warm-up and
after the run (sampled along the way, with the growth per 100 predictions from a least-squares fit); then
that requests sent while a prediction runs get coglet's 409 and the running prediction's images are exactly
those it gives alone.

    python -m bench.soak                    # 300 predictions on tiny random weights (SDXL layout)
    python -m bench.soak --predictions 1000 --model sd15 --json soak.json

The soak itself is testkit/soak.py; tests/test_robustness_http.py runs a shorter one in the test suite with the same
measurements and bounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from testkit.cog_server import CogServer, server_root
from testkit.soak import beyond_capacity, soak
from testkit.tiny_repos import build_tiny_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--weights", type=Path, help="weights root (default: tiny random weights, built now)")
    parser.add_argument("--predictions", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flashsd-soak-") as tmp:
        tmp = Path(tmp)
        weights = args.weights or build_tiny_weights(tmp / "weights", (args.model,))
        temp = tmp / "tmp"
        temp.mkdir()
        env = {"FLASHSD_WEIGHTS": str(weights), "FLASHSD_MODEL": args.model, "TMPDIR": str(temp), "HF_HUB_OFFLINE": "1"}
        with CogServer(env, tmp / "server.log", cwd=server_root(tmp / "root")) as server:
            if server.health() != "READY":
                print(server.logs()[-3000:], file=sys.stderr)
                return 1
            result = soak(server, temp, args.predictions)
            busy = beyond_capacity(server)
    summary = {"model": args.model, "soak": asdict(result), "beyond_capacity": asdict(busy)}
    for s in summary["soak"].pop("samples"):
        print(
            f"  after {s['done']:4d}: worker RSS {s['worker_rss_mb']:7.1f} MB, coglet RSS {s['server_rss_mb']:5.1f} MB, "
            f"fds {s['worker_fds']}/{s['server_fds']}, threads {s['worker_threads']}, temp files {s['temp_files']}"
        )
    print(json.dumps(summary, indent=2))
    problems = result.problems()
    if busy.extra_statuses != {409: busy.extra_requests}:
        problems.append(f"requests beyond capacity got {busy.extra_statuses}")
    if not busy.overlapped:
        problems.append("the slow prediction ended before the extra requests were answered: make it slower")
    if busy.running_status != "succeeded" or not busy.running_equal_to_alone:
        problems.append(
            f"the running prediction was affected: {busy.running_status}, equal: {busy.running_equal_to_alone}"
        )
    for p in problems:
        print("PROBLEM", p)
    if args.json:
        args.json.write_text(json.dumps(summary | {"samples": [asdict(s) for s in result.samples]}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
