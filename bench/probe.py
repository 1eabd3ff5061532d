"""Measurements that need a fresh process, run by bench/run.py as subprocesses; prints one JSON object.

python -m bench.probe setup   --model sdxl --weights DIR
python -m bench.probe compile --model sdxl --weights DIR --cache DIR --sizes 1024x1024,... --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def setup(args) -> dict:
    """Predictor.setup() as the container runs it: time, and memory against the weights' size."""
    started = time.perf_counter()
    os.environ["FLASHSD_WEIGHTS"], os.environ["FLASHSD_MODEL"] = args.weights, args.model
    import torch

    from predict import Predictor

    imported = time.perf_counter()
    rss_imports = rss_bytes()
    predictor = Predictor()
    predictor.setup()
    done = time.perf_counter()
    pipe = predictor.engine.pipe
    in_memory = sum(
        t.numel() * t.element_size()
        for m in pipe.components.values() if isinstance(m, torch.nn.Module)
        for t in (*m.parameters(), *m.buffers())
    )  # fmt: skip
    out = {
        "import_s": round(imported - started, 2), "setup_s": round(done - imported, 2),
        "rss_after_imports": rss_imports, "rss_after_setup": rss_bytes(), "peak_rss": peak_rss_bytes(),
        "weights_in_memory": in_memory, "device": str(predictor.engine.runtime.device),
        "dtype": str(predictor.engine.runtime.dtype).removeprefix("torch."),
    }  # fmt: skip
    if torch.cuda.is_available():
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return out


def compile_run(args) -> dict:
    """Load, eager images/s, compile + warm-up with the given cache folder, compiled images/s, and how far
    compiled images are from eager ones."""
    import numpy as np
    import torch

    from bench.common import medians
    from bench.pipeline import quiet, request_for
    from flashsd import speed
    from flashsd.engine import Engine
    from flashsd.models import MODELS

    quiet()
    model = MODELS[args.model]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")] if args.sizes != "table" else None
    started = time.perf_counter()
    engine = Engine.load(model, Path(args.weights))
    load_s = time.perf_counter() - started
    size = args.size
    requests = {n: request_for(model, size, n) for n in (1, 4)}
    eager_images = engine.generate(requests[1])
    eager = medians({n: (lambda r=r: engine.generate(r)) for n, r in requests.items()}, args.repeats)
    # As in the product, with `--cache` standing for the weights folder the cache is kept beside.
    settings = speed.compile_settings(Path(args.cache), engine.runtime, enabled=True)
    state = engine.compile(settings, sizes=sizes)
    compiled_images = engine.generate(requests[1])
    compiled = medians({n: (lambda r=r: engine.generate(r)) for n, r in requests.items()}, args.repeats)
    difference = max(
        int(np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16)).max())
        for a, b in zip(eager_images, compiled_images)
    )  # fmt: skip
    return {
        "load_s": round(load_s, 2), "compile_and_warm_up_s": round(state.compile_seconds or 0, 2),
        "graphs": state.graphs_compiled, "warm_up_calls": state.warm_up_calls, "error": state.error,
        "mega_cache_loaded": state.mega_cache_loaded, "size": f"{size}x{size}",
        "eager": {"images_per_s": {n: round(n / t, 3) for n, t in eager.items()}},
        "compiled": {"images_per_s": {n: round(n / t, 3) for n, t in compiled.items()}},
        "speedup": {n: round(eager[n] / compiled[n], 3) for n in eager},
        "max_pixel_difference_vs_eager": difference,
        "peak_rss": peak_rss_bytes(), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["setup", "compile"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--cache")
    parser.add_argument("--sizes", default="table", help="WxH,... to warm up at, or 'table' (the aspect ratios)")
    parser.add_argument("--size", type=int, default=1024, help="square size the images/s are measured at")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = setup(args) if args.what == "setup" else compile_run(args)
    print("PROBE-RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
