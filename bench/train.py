"""Training speed and memory (flashsd.training): steps per second and peak memory of a LoRA training, per model.

Each configuration runs in a process of its own (so its peak resident memory is its own), as `train()` runs in Cog's
worker: the base model loaded, the images encoded once, then the optimisation steps. Reported per configuration:
- steps/s: wall-clock, from the second step's progress line to the last (the first step's allocations left out);
- CPU s/step: the process's CPU time over the same steps (steadier than wall time on a machine shared with others);
- peak RSS: the process's maximum resident memory (imports, model, training), and on a GPU the peak allocated memory.

    python -m bench.train                                  # tiny random SDXL and SD1.5 weights, CPU, 256 px
    python -m bench.train --models sd15 --sizes 256,512 --steps 40
    python -m bench.train --weights weights --sizes 1024 --models sdxl      # real weights (a GPU), 1024 px

Default threads, as users run. On tiny weights the figures measure the training loop's own overhead around a very
small model, not the real models' speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import table


def child(args) -> None:
    """One training configuration; prints its figures as one JSON line."""
    import torch

    from flashsd.models import MODELS
    from flashsd.runtime import select_runtime
    from flashsd.training import TrainingOptions, load_training_set, train_lora
    from testkit.training_sets import write_sample_archive

    runtime = select_runtime("auto")
    folder = Path(tempfile.mkdtemp(prefix="bench-train-"))
    archive = write_sample_archive(folder / "set.zip", count=4, size=max(args.size, 320))
    images = load_training_set(archive, folder, "TOK", args.size).images
    marks: list[tuple[float, float]] = []  # (wall, CPU) at each progress line

    def say(level, message, *rest):
        if "|" in message % rest and "it" in message % rest:
            marks.append((time.perf_counter(), time.process_time()))

    options = TrainingOptions(
        steps=args.steps, resolution=args.size, lora_rank=args.rank, batch_size=args.batch, seed=0,
        train_text_encoder=args.text_encoder,
    )  # fmt: skip
    lora = train_lora(MODELS[args.model], Path(args.weights), images, options, runtime.device, says=[say])
    (first_wall, first_cpu), (last_wall, last_cpu) = marks[0], marks[-1]
    steps = len(marks) - 1
    print(json.dumps({
        "model": args.model, "size": args.size, "rank": args.rank, "batch": args.batch,
        "text_encoder": args.text_encoder, "device": str(runtime.device), "precision": lora.precision.name,
        "steps": args.steps, "steps_per_s": steps / (last_wall - first_wall),
        "cpu_s_per_step": (last_cpu - first_cpu) / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": None if lora.peak_gpu_bytes is None else lora.peak_gpu_bytes / 2**20,
        "parameters": lora.parameters, "threads": torch.get_num_threads(),
    }))  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sdxl,sd15")
    parser.add_argument("--sizes", default="256", help="comma-separated training resolutions")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-encoder", action="store_true", help="also train the text encoders' LoRA")
    parser.add_argument("--weights", default="tiny", help="tiny (built in a temporary folder) or a weights folder")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    models = args.models.split(",")
    weights = args.weights
    if weights == "tiny":
        from testkit.tiny_repos import build_tiny_weights

        weights = str(build_tiny_weights(Path(tempfile.mkdtemp(prefix="bench-train-weights-")), models))
    rows, results = [], []
    for model in models:
        for size in (int(s) for s in args.sizes.split(",")):
            command = [sys.executable, "-m", "bench.train", "--child", "--model", model, "--size", str(size),
                       "--steps", str(args.steps), "--rank", str(args.rank), "--batch", str(args.batch),
                       "--weights", weights] + (["--text-encoder"] if args.text_encoder else [])  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(figures)
            rows.append((
                model, f"{size}x{size}", figures["device"], figures["precision"], f"{figures['parameters']:,}",
                f"{figures['steps_per_s']:.2f}", f"{figures['cpu_s_per_step']:.3f}", f"{figures['peak_rss_mb']:.0f}",
                "-" if figures["peak_gpu_mb"] is None else f"{figures['peak_gpu_mb']:.0f}",
            ))  # fmt: skip
    print(f"Training ({'tiny random weights' if args.weights == 'tiny' else args.weights}; {args.steps} steps, "
          f"rank {args.rank}, batch {args.batch}{', text encoders too' if args.text_encoder else ''})")  # fmt: skip
    headers = (
        "model",
        "size",
        "device",
        "precision",
        "LoRA params",
        "steps/s",
        "CPU s/step",
        "peak RSS MB",
        "peak GPU MB",
    )
    print(table(rows, headers))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
