"""flashsd's benchmarks: the figures the speed work is judged by, each ratio measured within one run.

Measurements are interleaved and medians reported; prints tables and writes
bench/results/<time>-<device>.json.

    python -m bench.run                                   # every section that applies to this machine
    python -m bench.run --sections encode,lora            # some sections
    python -m bench.run --model sd15 --size 512           # the single-model sections on another model
    python -m bench.run --weights tiny                    # tiny random-weight repos even if real ones exist
    python -m bench.run --sections compile --models sd15  # compiled mode (on a CPU: opt-in, ~2 min a model)
    python -m bench.run --sections setup --model sd15 --models sd15 --weights sd15-size   # setup at real size

Weights: real ones (FLASHSD_WEIGHTS or weights/) where complete for a model, else tiny random-weight repos
built into a temporary folder; the JSON says which. On tiny weights the model-dependent figures measure
flashsd's own overhead against a very small model, not the real models' speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.common import table  # noqa: E402

SECTIONS = ("encode", "lora", "evaluations", "predict", "stages", "throughput", "layout", "setup", "http", "compile",
            "style_loras")  # fmt: skip
# style_loras builds an SDXL-size UNet (10 GB in fp32 on a CPU): opt-in there.
CPU_DEFAULT = tuple(s for s in SECTIONS if s not in ("layout", "compile", "style_loras"))
RESULTS = common.PROJECT / "bench" / "results"


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        default="default",
        help=f"comma-separated from {', '.join(SECTIONS)}; 'all'; default: all on a GPU, all but "
        "layout and compile on a CPU",
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("FLASHSD_MODEL") or "sdxl",
        help="model of the single-model sections (evaluations, predict, setup, http)",
    )
    parser.add_argument(
        "--models",
        default="sdxl,sd3,sd15,pixart",
        help="models of the per-model sections (stages, throughput, layout, compile)",
    )
    parser.add_argument(
        "--weights",
        default="auto",
        help="auto | tiny | sd15-size (random weights at SD1.5's sizes, "
        "with --model sd15 --models sd15) | a weights folder",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=1024 if cuda else 256,
        help="square image size (default: 1024 on a GPU, 256 on a CPU)",
    )
    parser.add_argument("--repeats", type=int, default=10 if cuda else 5, help="timed repeats; medians are reported")
    parser.add_argument(
        "--compile-sizes",
        default="table" if cuda else "one",
        help="warm-up sizes of the compile section: 'table' (every aspect ratio, as setup() does) or "
        "'one' (--size only)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None if cuda else 1,
        help="CPU threads for torch, here and in the subprocesses; 0: torch's own choice (default on "
        "a GPU). On a CPU the default is 1: the figures are ratios, and one thread keeps a machine "
        "shared with other jobs from thrashing (several OpenMP threads slow down erratically, "
        "up to 10x, when another process takes a core)",
    )
    parser.add_argument("--no-grid", action="store_true", help="skip the WebP/PNG settings grid")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the JSON results")
    args = parser.parse_args(argv)
    if args.sections == "default":
        args.sections = ",".join(SECTIONS if cuda else CPU_DEFAULT)
    elif args.sections == "all":
        args.sections = ",".join(SECTIONS)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def _probe(what: str, *arguments: str, timeout: float = 1800) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.probe", what, *arguments],
        cwd=common.PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in done.stdout.splitlines():
        if line.startswith("PROBE-RESULT "):
            return json.loads(line.removeprefix("PROBE-RESULT "))
    raise RuntimeError(f"probe {what} failed ({done.returncode}):\n{done.stderr[-4000:]}")


class Bench:
    def __init__(self, args):
        from bench import pipeline
        from flashsd.models import MODELS
        from flashsd.runtime import select_runtime

        self.args = args
        self.pipeline = pipeline
        self.MODELS = MODELS
        self.runtime = select_runtime()
        self.results: dict = {}
        self.errors: dict = {}
        self.seconds: dict = {}
        self.weights: dict = {}
        self.predictor = None

    def weights_for(self, key: str):
        from bench.sources import weights_for

        if key not in self.weights:
            self.weights[key] = weights_for(self.MODELS[key], self.args.weights)
        return self.weights[key]

    # -- engines: the predictor's for --model, one at a time for the others
    def predictor_for_model(self):
        if self.predictor is None:
            weights = self.weights_for(self.args.model)
            self.predictor, seconds = self.pipeline.load_predictor(self.MODELS[self.args.model], weights.root)
            self.results.setdefault("notes", {})["in_process_setup_s"] = round(seconds, 2)
        return self.predictor

    def engine_for(self, key: str):
        if key == self.args.model:
            return self.predictor_for_model().engine
        from flashsd.engine import Engine

        cached = getattr(self, "_engine", None)
        if cached is not None and cached.model.key == key:
            return cached
        self._engine = None
        self.pipeline.free()
        self._engine = Engine.load(self.MODELS[key], self.weights_for(key).root, self.runtime)
        self.pipeline.quiet()
        return self._engine

    def release_engines(self):
        self.predictor = None
        self._engine = None
        gc.collect()
        self.pipeline.free()

    # -- sections
    def encode(self):
        from bench import encode

        result = encode.run(repeats=max(5, self.args.repeats), with_grid=not self.args.no_grid)
        return result, encode.report(result)

    def lora(self):
        from bench import lora

        result = lora.run(self.runtime.device, self.runtime.dtype, repeats=max(7, self.args.repeats))
        return result, lora.report(result)

    def style_loras(self):
        from bench import style_loras

        self.release_engines()
        key = self.args.model
        result = style_loras.run(self.MODELS[key], self.weights_for(key).root, self.runtime.device, self.runtime.dtype,
                                 self.args.size, self.args.repeats)  # fmt: skip
        return result, style_loras.report(result)

    def evaluations(self):
        engine = self.engine_for(self.args.model)
        result = self.pipeline.denoiser_evaluations(
            engine, self.weights_for(self.args.model).root, self.args.size, self.args.repeats
        )
        return result, self.pipeline.report_evaluations(result)

    def predict(self):
        result = self.pipeline.predict_overhead(self.predictor_for_model(), self.args.size, self.args.repeats)
        return result, self.pipeline.report_predict(result)

    def _per_model(self, fn):
        return {key: fn(self.engine_for(key)) for key in self.args.models}

    def stages(self):
        result = self._per_model(lambda e: self.pipeline.stages(e, self.args.size, self.args.repeats))
        return result, self.pipeline.report_stages(result)

    def throughput(self):
        result = self._per_model(lambda e: self.pipeline.throughput(e, self.args.size, self.args.repeats))
        return result, self.pipeline.report_throughput(result)

    def layout(self):
        result = self._per_model(lambda e: self.pipeline.layout(e, self.args.size, self.args.repeats))
        return result, self.pipeline.report_layout(result)

    def setup(self):
        from bench.sources import disk_bytes

        self.release_engines()
        key = self.args.model
        weights = self.weights_for(key)
        probe = _probe("setup", "--model", key, "--weights", str(weights.root))
        disk = disk_bytes(self.MODELS[key], weights.root)
        result = {
            **probe, "weights_on_disk": disk,
            "peak_rss_over_disk": round(probe["peak_rss"] / disk, 2),
            "peak_rss_growth_over_disk": round((probe["peak_rss"] - probe["rss_after_imports"]) / disk, 2),
            "in_memory_over_disk": round(probe["weights_in_memory"] / disk, 2),
        }  # fmt: skip
        if "cuda_max_allocated" in probe:
            result["cuda_max_allocated_over_disk"] = round(probe["cuda_max_allocated"] / disk, 2)
        rows = [
            ("imports (torch, diffusers, cog, flashsd)", f"{probe['import_s']} s"),
            ("Predictor.setup()", f"{probe['setup_s']} s"),
            ("weights on disk (safetensors)", _gib(disk)),
            (f"weights in memory ({probe['dtype']}, {probe['device']})", _gib(probe["weights_in_memory"])),
            ("RSS after imports", _gib(probe["rss_after_imports"])),
            ("peak RSS", _gib(probe["peak_rss"])),
            ("peak RSS / weights on disk (target <= 1.3)", result["peak_rss_over_disk"]),
            ("(peak RSS - RSS after imports) / weights on disk", result["peak_rss_growth_over_disk"]),
        ]
        if "cuda_max_allocated" in probe:
            rows.append(("peak GPU memory allocated / weights on disk", result["cuda_max_allocated_over_disk"]))
        return result, "\n".join([f"Setup of {key} ({weights.kind} weights), fresh process", table(rows, ("", ""))])

    def http(self):
        from bench import server

        self.release_engines()
        key = self.args.model
        in_process = self.results.get("predict", {}).get("by_num_outputs", {}).get(1, {}).get("predict_ms")
        result = server.run(self.MODELS[key], self.weights_for(key).root, self.args.size, self.args.repeats, in_process)
        return result, server.report(result)

    def compile(self):
        self.release_engines()
        result = {}
        sizes = "table" if self.args.compile_sizes == "table" else f"{self.args.size}x{self.args.size}"
        for key in self.args.models:
            cache = tempfile.mkdtemp(prefix=f"flashsd-bench-compile-{key}-")
            common_args = (
                "--model",
                key,
                "--weights",
                str(self.weights_for(key).root),
                "--cache",
                cache,
                "--sizes",
                sizes,
                "--size",
                str(self.args.size),
                "--repeats",
                str(max(3, self.args.repeats // 2)),
            )
            try:
                cold = _probe("compile", *common_args)
                warm = _probe("compile", *common_args)  # a restarted container: same cache folder, fresh process
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            result[key] = {"cold": cold, "warm_restart": warm, "warm_up_sizes": sizes}
        rows = []
        for key, r in result.items():
            c, w = r["cold"], r["warm_restart"]
            for n in ("1", "4"):
                rows.append(
                    (
                        key,
                        n,
                        c["eager"]["images_per_s"][n],
                        c["compiled"]["images_per_s"][n],
                        c["speedup"][n],
                        c["compile_and_warm_up_s"] if n == "1" else "",
                        w["compile_and_warm_up_s"] if n == "1" else "",
                        c["max_pixel_difference_vs_eager"] if n == "1" else "",
                    )
                )
        text = "\n".join([
            f"Compiled mode (FLASHSD_COMPILE=1) at {self.args.size}x{self.args.size}; warm-up sizes: {sizes}",
            table(rows, ("model", "batch", "eager images/s", "compiled images/s", "speed-up", "compile+warm-up s (cold)",
                         "same, restarted with cache", "max pixel diff vs eager")),
        ])  # fmt: skip
        return result, text

    def summary(self) -> str:
        r = self.results
        rows = []
        if "predict" in r:
            for n, row in r["predict"]["by_num_outputs"].items():
                rows.append(
                    (
                        f"predict() / diffusers call, {n} image(s) (from overhead alone)",
                        f"{row['ratio']} ({row['ratio_from_overhead_alone']})",
                        "<= 1.03",
                    )
                )
        if "lora" in r:
            rows.append(("fused-LoRA / base denoiser forward", r["lora"]["fused_over_base"], "<= 1.02"))
            rows.append(("unfused-LoRA / base denoiser forward", r["lora"]["unfused_over_base"], ""))
        if "style_loras" in r:
            s = r["style_loras"]
            for key, swap in s["swap"].items():
                t = swap["ms"]
                rows.append((f"style LoRA at {key} UNet size: load / fuse / restore ms", f"{t['load']} / {t['fuse']} / "
                             f"{t['restore']}", ""))  # fmt: skip
            rows.append(("cached-LoRA / no-LoRA prediction", s["prediction"]["ratio"], "<= 1.02"))
        if "evaluations" in r:
            e = r["evaluations"]
            rows.append(
                (
                    "denoiser evaluations / image: Flash vs base 25-step guided",
                    f"{e['flash']['rows_per_image']:g} vs {e['base']['rows_per_image']:g} ({e['evaluations_ratio']}x)",
                    "4",
                )
            )
        if "encode" in r:
            for fmt, v in r["encode"]["formats"].items():
                rows.append(
                    (
                        f"{fmt} encode ms/MP (wall / CPU), q80",
                        f"{v['ms_per_mp']} / {v['cpu_ms_per_mp']}",
                        "<= 30" if fmt == "webp" else "",
                    )
                )
        if "setup" in r:
            rows.append(
                (
                    "setup s / peak RSS over weights on disk",
                    f"{r['setup']['setup_s']} / {r['setup']['peak_rss_over_disk']}",
                    "<= 1.3x",
                )
            )
        if "http" in r:
            rows.append(
                (
                    "HTTP round trip / predict_time (overhead ms)",
                    f"{r['http']['ratio']} ({r['http']['overhead_ms']})",
                    "",
                )
            )
        if "throughput" in r:
            for key, t in r["throughput"].items():
                rows.append(
                    (
                        f"{key} images/s at {t['size']}, batch 1 / 4",
                        " / ".join(str(v) for v in t["images_per_s"].values()),
                        "",
                    )
                )
        if "compile" in r:
            for key, c in r["compile"].items():
                rows.append(
                    (
                        f"{key} compiled speed-up batch 1; compile s cold / warm",
                        f"{c['cold']['speedup']['1']}x; {c['cold']['compile_and_warm_up_s']} / "
                        f"{c['warm_restart']['compile_and_warm_up_s']}",
                        "",
                    )
                )
        return "Summary\n" + table(rows, ("figure", "measured", "target"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the probes and the Cog server inherit these
            os.environ[name] = str(args.threads)
    facts = {**common.machine(), "torch_threads": torch.get_num_threads()}
    bench = Bench(args)
    started = dt.datetime.now(dt.UTC)
    command = " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])])
    print(
        f"flashsd benchmarks on {facts.get('gpu') or facts['cpu']} ({facts['cpu_cores']} cores), torch "
        f"{facts['torch']}, {bench.runtime.device} {str(bench.runtime.dtype).removeprefix('torch.')}; "
        f"sections: {', '.join(args.sections)}\n",
        flush=True,
    )
    for section in args.sections:
        t0 = time.perf_counter()
        try:
            result, text = getattr(bench, section)()
        except Exception as e:  # one failing section must not lose the others
            bench.errors[section] = f"{type(e).__name__}: {e}"
            print(f"[{section}] FAILED: {bench.errors[section]}\n{traceback.format_exc()}", flush=True)
            continue
        bench.seconds[section] = round(time.perf_counter() - t0, 1)
        bench.results[section] = result
        print(f"{text}\n[{section}: {bench.seconds[section]} s]\n", flush=True)
    print(bench.summary())
    weights = {key: {"kind": w.kind, "root": str(w.root)} for key, w in bench.weights.items()}
    document = {
        "command": command, "started": started.isoformat(timespec="seconds"), "machine": facts,
        "runtime": {"device": str(bench.runtime.device), "dtype": str(bench.runtime.dtype).removeprefix("torch.")},
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "weights": weights,
        "results": bench.results, "errors": bench.errors, "section_seconds": bench.seconds,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{started.strftime('%Y%m%dT%H%M%SZ')}-{common.device_label(facts)}.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nwrote {path.relative_to(common.PROJECT) if path.is_relative_to(common.PROJECT) else path}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
