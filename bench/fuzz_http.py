#!/usr/bin/env python3
"""Fuzzing the HTTP API of the real Cog server (coglet) as the container runs it, on loopback, with the fuzzer of
testkit/fuzz.py (what it sends and what each request must get is described there).

    python -m bench.fuzz_http                      # tiny random weights (built in a temp dir), all cases
    python -m bench.fuzz_http --mixtures 2000 --full  # more random mixtures; heavy cases run to completion
    python -m bench.fuzz_http --model sd15 --weights weights/ --json fuzz.json
    python -m bench.fuzz_http --controlnets canny  # the server's FLASHSD_CONTROLNETS (default: every type it takes)

tests/test_robustness_http.py runs the same generator (at least 500 requests) in the test suite; heavy cases
(native-size aspect ratios, 4 images at 2048x2048) are cancelled there once running, and run to completion
here with --full.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import requests

from flashsd.control import CONTROL_TYPES, FAMILIES
from testkit.cog_server import CogServer, rss_mb, server_root, worker_pid
from testkit.fuzz import Generator, Outcome, run_cases
from testkit.tiny_repos import build_tiny_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--weights", type=Path, help="weights root (default: tiny random weights, built now)")
    parser.add_argument("--mixtures", type=int, default=300, help="random multi-field cases on top of the fixed ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="run heavy cases to completion instead of cancelling them")
    parser.add_argument("--json", type=Path, help="write every outcome here")
    parser.add_argument(
        "--controlnets", help="FLASHSD_CONTROLNETS of the server (default: canny,depth where the model takes them)"
    )
    args = parser.parse_args(argv)
    if args.controlnets is None:
        args.controlnets = ",".join(CONTROL_TYPES) if args.model in FAMILIES else ""
    controlnets = tuple(t for t in args.controlnets.split(",") if t)

    with tempfile.TemporaryDirectory(prefix="flashsd-fuzz-") as tmp:
        tmp = Path(tmp)
        weights = args.weights or build_tiny_weights(tmp / "weights", (args.model,))
        (tmp / "tmp").mkdir()
        env = {
            "FLASHSD_WEIGHTS": str(weights),
            "FLASHSD_MODEL": args.model,
            "TMPDIR": str(tmp / "tmp"),
            "HF_HUB_OFFLINE": "1",
            "FLASHSD_CONTROLNETS": ",".join(controlnets),
        }
        with CogServer(env, tmp / "server.log", cwd=server_root(tmp / "root")) as server:
            if server.health() != "READY":
                print(server.logs()[-3000:], file=sys.stderr)
                return 1
            schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
            cases = Generator(schema, args.seed, model=args.model, controlnets=controlnets).cases(args.mixtures)
            rss_before = rss_mb(worker_pid(server))

            def progress(i: int, o: Outcome) -> None:
                flag = (" PROBLEM" if o.problems else "") + (
                    "" if o.as_expected else f" MISMATCH (expected {o.expected})"
                )
                print(f"[{i + 1}/{len(cases)}] {o.kind:>9} {o.seconds:6.2f}s  {o.case[:90]}{flag}", flush=True)

            report = run_cases(server, cases, full=args.full, progress=progress)
            missing_logs = [c.name for c in cases if c.expect_log and c.expect_log not in server.logs()]
            summary = report.summary() | {
                "model": args.model,
                "worker_rss_mb": [
                    round(rss_before),
                    round(rss_mb(worker_pid(server))) if report.server_alive else None,
                ],
                "full": args.full,
            }
        print(json.dumps(summary, indent=2))
        for problem in report.problems:
            print("PROBLEM", problem)
        for mismatch in report.mismatches:
            print("MISMATCH", mismatch)
        if missing_logs:
            print("no log line about a long prompt for:", missing_logs)
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"summary": summary, "outcomes": [o.__dict__ for o in report.outcomes]},
                    indent=1,
                    ensure_ascii=False,
                    default=str,
                )
            )
        return 1 if report.problems or report.mismatches or missing_logs else 0


if __name__ == "__main__":
    sys.exit(main())
