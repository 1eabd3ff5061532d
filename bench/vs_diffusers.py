"""A prediction made the way coglet drives it against a plain diffusers script making the same image, each in a
process of its own, as their users run them (default thread counts, nothing pinned).

    python -m bench.vs_diffusers                          # tiny SDXL at 512x512, 6 alternating rounds
    python -m bench.vs_diffusers --model sd15 --size 256 --rounds 8 --predictions 6
    python -m bench.vs_diffusers --weights weights        # real weights (complete under that root)

Each round starts both programs, one after the other (the order alternates from round to round), and each makes
`--predictions` images after one untimed warm-up image:
- flashsd: `Predictor.setup()`, then every prediction awaited from one long-lived event loop (coglet's worker runs
  one loop for the life of the container), each writing its WebP (quality 80, the default);
- diffusers: the model card's recipe as a user writes it (the pipeline from_pretrained, the Flash LoRA loaded,
  fused and unloaded, the LCM scheduler with trailing spacing), then `pipe(...)` and `image.save(..., quality=80)`.
Same prompt, seed, size, 4 steps, guidance 0; the safety checker off in flashsd (diffusers' SDXL pipeline has none;
`--safety-checker` keeps it on, to see its cost). Reported: each program's median seconds per image in each round,
the ratio of the two in each round, and the median of the ratios (the figure the README gives).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of an astronaut riding a horse on the moon"
SEED = 1234


def flashsd_worker(args) -> list[float]:
    os.environ.update(FLASHSD_WEIGHTS=str(args.weights), FLASHSD_MODEL=args.model)
    from bench.pipeline import predictor_inputs
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    inputs = predictor_inputs(
        Predictor, prompt=PROMPT, seed=SEED, aspect_ratio="custom", width=args.size, height=args.size,
        disable_safety_checker=not args.safety_checker,
    )  # fmt: skip

    async def predictions() -> list[float]:  # one loop for all of them, as coglet's worker has
        times = []
        for index in range(args.predictions + 1):
            started = time.perf_counter()
            await predictor.predict(**inputs)
            if index:  # the first one warms up
                times.append(time.perf_counter() - started)
        return times

    return asyncio.run(predictions())


def diffusers_worker(args) -> list[float]:
    """The model card's recipe as a diffusers user writes it (no flashsd import)."""
    import diffusers
    import torch

    from flashsd.models import MODELS  # the repos' names and folders only
    from flashsd.weights import repo_dir

    model = MODELS[args.model]
    base = repo_dir(args.weights, model.base)
    extra = {}
    if model.vae is not None:
        extra["vae"] = diffusers.AutoencoderKL.from_pretrained(repo_dir(args.weights, model.vae), dtype=torch.float32)
    if model.key == "sd15":
        extra |= dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # fp32 on the CPU, as flashsd runs there (the fp16 files are cast on load)
    pipe = getattr(diffusers, model.pipeline).from_pretrained(base, variant=model.variant, dtype=torch.float32, **extra)
    pipe.scheduler = diffusers.LCMScheduler.from_pretrained(base, subfolder="scheduler", timestep_spacing="trailing")
    pipe.load_lora_weights(repo_dir(args.weights, model.adapter))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.predictions + 1):
            started = time.perf_counter()
            image = pipe(
                PROMPT, num_inference_steps=4, guidance_scale=0, width=args.size, height=args.size,
                generator=torch.Generator("cpu").manual_seed(SEED),
            ).images[0]  # fmt: skip
            image.save(Path(folder) / f"{index}.webp", quality=80)
            if index:
                times.append(time.perf_counter() - started)
    return times


WORKERS = {"flashsd": flashsd_worker, "diffusers": diffusers_worker}


def run_worker(name: str, args, checkout: Path | None = None) -> list[float]:
    """The worker `name` in a process of its own; from `checkout` (another copy of the project holding this file)
    when given, else from this one."""
    command = [sys.executable, "-m", "bench.vs_diffusers", "--worker", name, "--model", args.model,
               "--size", str(args.size), "--predictions", str(args.predictions), "--weights", str(args.weights)]  # fmt: skip
    if args.safety_checker:
        command.append("--safety-checker")
    env = os.environ | {"TMPDIR": args.temp} | ({"PYTHONPATH": str(checkout)} if checkout else {})
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=checkout, env=env)
    if done.returncode:
        raise SystemExit(f"{name} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vs_diffusers", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdxl", choices=["sdxl", "sd15"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--predictions", type=int, default=5, help="timed images per program and round")
    parser.add_argument("--weights", type=Path, help="weights root (default: tiny random weights, built once)")
    parser.add_argument("--safety-checker", action="store_true", help="keep flashsd's safety checker on")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of flashsd (with this file copied in) measured in the same rounds",
    )
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="flashsd-vs-diffusers-") as folder:
        args.temp = str(Path(folder) / "tmp")  # the workers' temporary files (flashsd's output folders) go here
        Path(args.temp).mkdir()
        if args.weights is None:
            from testkit.tiny_repos import build_tiny_weights

            args.weights = build_tiny_weights(Path(folder))
        programs = {"flashsd": None, "diffusers": None} | ({"baseline": args.baseline} if args.baseline else {})
        ratios: dict[str, list[float]] = {name: [] for name in programs if name != "diffusers"}
        print(f"{args.model} at {args.size}x{args.size}, {args.predictions} timed images per program and round; "
              f"safety checker {'on' if args.safety_checker else 'off'} in flashsd")  # fmt: skip
        print("round | " + " | ".join(f"{name} s/image" for name in programs) + " | " +
              " | ".join(f"{name} / diffusers" for name in ratios))  # fmt: skip
        for round_ in range(args.rounds):
            order = list(programs) if round_ % 2 == 0 else list(reversed(programs))
            medians = {}
            for name in order:
                worker = "diffusers" if name == "diffusers" else "flashsd"
                medians[name] = statistics.median(run_worker(worker, args, programs[name]))
            for name in ratios:
                ratios[name].append(medians[name] / medians["diffusers"])
            print(f"{round_ + 1:5d} | " + " | ".join(f"{medians[name]:.4f}" for name in programs) + " | " +
                  " | ".join(f"{ratios[name][-1]:.3f}" for name in ratios))  # fmt: skip
        for name, values in ratios.items():
            print(f"{name} / diffusers: median {statistics.median(values):.3f} (min {min(values):.3f}, "
                  f"max {max(values):.3f}) over {args.rounds} rounds")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
