"""Benchmarks of the loaded pipeline: predict() against the diffusers call it wraps, denoiser evaluations
against the base recipe, per-stage times, images/s, and the channels_last question."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import medians, ms, synchronize, table, timed
from flashsd.engine import Engine
from flashsd.images import write_outputs
from flashsd.models import FlashModel
from flashsd.request import build_request
from testkit.predictors import predictor_inputs

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
# The base models' own recipes: 25 steps with classifier-free guidance at each model card's scale.
BASE_STEPS = 25
BASE_GUIDANCE = {"sdxl": 5.0, "sd15": 7.5, "sd3": 7.0, "pixart": 4.5}


def quiet() -> None:
    """Predictor.setup() logs every generation at INFO; the tables are the output here."""
    logging.getLogger("flashsd").setLevel(logging.WARNING)
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def request_for(model: FlashModel, size: int, num_outputs: int = 1, **extra):
    return build_request(model, prompt=PROMPT, aspect_ratio="custom", width=size, height=size,
                         num_outputs=num_outputs, seed=1234, **extra)  # fmt: skip


def plain_call(engine: Engine, request) -> list:
    """The diffusers call engine.generate makes for `request`, and nothing else: pipeline_arguments gives
    its arguments; the SD3 scheduler takes the same per-image generators as in generate."""
    arguments = engine.pipeline_arguments(request)
    noise = getattr(engine.pipe.scheduler, "noise_generators", None)
    with noise(arguments["generator"]) if noise else contextlib.nullcontext():
        return engine.pipe(**arguments).images


def free(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- predict() / diffusers ---------------------------------------------------------------------------


class _Replay:
    """Stands in for a pipeline: answers every call at once with the images of one real call."""

    def __init__(self, pipe, images):
        self.scheduler, self.components, self._images = pipe.scheduler, pipe.components, images

    def __call__(self, **arguments):
        return SimpleNamespace(images=list(self._images))


def load_predictor(model: FlashModel, root: Path):
    os.environ["FLASHSD_WEIGHTS"] = str(root)
    os.environ["FLASHSD_MODEL"] = model.key
    from predict import Predictor

    predictor = Predictor()
    started = time.perf_counter()
    predictor.setup()
    quiet()
    return predictor, time.perf_counter() - started


def predict_overhead(predictor, size: int, repeats: int, batches=(1, 4)) -> dict:
    engine = predictor.engine
    model = engine.model
    rows = {}
    for n in batches:
        request = request_for(model, size, n)
        inputs = predictor_inputs(type(predictor), prompt=PROMPT, aspect_ratio="custom", width=size, height=size,
                                  num_outputs=n, seed=1234, output_format="webp", output_quality=80)  # fmt: skip
        images = [None]

        def diffusers_call():
            images[0] = plain_call(engine, request)

        times = medians(
            {"diffusers": diffusers_call, "predict": lambda: asyncio.run(predictor.predict(**inputs))}, repeats
        )
        generated = engine.generate(request)
        with tempfile.TemporaryDirectory() as tmp:
            encode = medians({"encode": lambda: write_outputs(generated, request, model, Path(tmp))}, repeats)["encode"]
        # predict() with the diffusers call replaced by its result: everything predict() adds to it (request,
        # safety checker, encoding, files), measured alone; the difference of the two medians above is only
        # as precise as the machine is quiet.
        real_pipe = engine.pipe
        engine.pipe = _Replay(real_pipe, images[0])
        try:
            stubbed = medians({"predict": lambda: asyncio.run(predictor.predict(**inputs))}, 2 * repeats)["predict"]
        finally:
            engine.pipe = real_pipe
        rows[n] = {
            "diffusers_ms": ms(times["diffusers"]), "predict_ms": ms(times["predict"]),
            "ratio": round(times["predict"] / times["diffusers"], 3),
            "overhead_ms": ms(times["predict"] - times["diffusers"]), "of_which_encode_ms": ms(encode),
            "overhead_alone_ms": ms(stubbed),
            "ratio_from_overhead_alone": round((times["diffusers"] + stubbed) / times["diffusers"], 3),
        }  # fmt: skip
    return {"size": f"{size}x{size}", "format": "webp q80", "by_num_outputs": rows}


def report_predict(result: dict) -> str:
    rows = [
        (
            n,
            r["diffusers_ms"],
            r["predict_ms"],
            r["ratio"],
            r["overhead_ms"],
            r["overhead_alone_ms"],
            r["of_which_encode_ms"],
            r["ratio_from_overhead_alone"],
        )
        for n, r in result["by_num_outputs"].items()
    ]
    return "\n".join([
        f"predict() against the diffusers call it wraps ({result['size']}, {result['format']}; target ratio <= 1.03)",
        table(rows, ("images", "diffusers ms", "predict() ms", "ratio", "difference ms", "overhead alone ms",
                     "encoding ms", "diffusers + overhead alone, ratio")),
    ])  # fmt: skip


# --- denoiser evaluations ----------------------------------------------------------------------------


class CallCounter:
    def __init__(self, module: torch.nn.Module):
        self.rows: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        self.rows.append(first.shape[0])

    def remove(self):
        self.handle.remove()


def _base_scheduler(engine: Engine, root: Path):
    """The base repo's own scheduler (EulerDiscrete for SDXL, PNDM for SD1.5, ...), as its card runs it."""
    import json

    import diffusers

    from flashsd.weights import repo_dir

    config = json.loads((repo_dir(root, engine.model.base) / "scheduler" / "scheduler_config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_config(config)


def denoiser_evaluations(engine: Engine, root: Path, size: int, repeats: int) -> dict:
    """Denoiser calls and batch rows per image: Flash's 4 unguided steps against the base model's 25
    guided steps (the same pipeline with the base scheduler), each counted with a forward hook and timed."""
    model = engine.model
    denoiser = getattr(engine.pipe, model.denoiser)
    flash_request = request_for(model, size, 2)
    guidance = BASE_GUIDANCE[model.key]
    base_request = request_for(model, size, 2, num_inference_steps=4, guidance_scale=guidance)
    flash_scheduler, base_scheduler = engine.pipe.scheduler, _base_scheduler(engine, root)

    def flash():
        return plain_call(engine, flash_request)

    def base():
        arguments = {**engine.pipeline_arguments(base_request), "num_inference_steps": BASE_STEPS}
        engine.pipe.scheduler = base_scheduler
        try:
            return engine.pipe(**arguments).images
        finally:
            engine.pipe.scheduler = flash_scheduler

    counts = {}
    for name, fn in (("flash", flash), ("base", base)):
        counter = CallCounter(denoiser)
        try:
            fn()
        finally:
            counter.remove()
        counts[name] = {"calls": len(counter.rows), "rows_per_image": sum(counter.rows) / 2}
    times = medians({"flash": flash, "base": base}, max(1, repeats // 2))
    return {
        "size": f"{size}x{size}",
        "flash": {**counts["flash"], "recipe": "4 steps, guidance 0", "ms_per_image": ms(times["flash"] / 2)},
        "base": {**counts["base"], "recipe": f"{BASE_STEPS} steps, guidance {guidance:g}, {type(base_scheduler).__name__}",
                 "ms_per_image": ms(times["base"] / 2)},
        "evaluations_ratio": round(counts["base"]["rows_per_image"] / counts["flash"]["rows_per_image"], 2),
        "time_ratio": round(times["base"] / times["flash"], 2),
    }  # fmt: skip


def report_evaluations(result: dict) -> str:
    rows = [
        (name, r["recipe"], r["calls"], r["rows_per_image"], r["ms_per_image"])
        for name, r in (("Flash", result["flash"]), ("base", result["base"]))
    ]
    return "\n".join([
        f"Denoiser evaluations per image ({result['size']})",
        table(rows, ("recipe", "settings", "denoiser calls", "evaluations / image", "ms / image")),
        f"base / Flash: {result['evaluations_ratio']}x the evaluations, {result['time_ratio']}x the time here",
    ])  # fmt: skip


# --- per-stage times -----------------------------------------------------------------------------------


class StageTimer:
    """Wall time per stage from hooks that synchronise the GPU at each boundary (so stage times add up;
    the throughput figures are measured without hooks)."""

    def __init__(self, engine: Engine):
        self.totals: dict[str, float] = defaultdict(float)
        self._started: dict[str, float] = {}
        self._undo = []
        self._restore = []
        pipe = engine.pipe
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if isinstance(getattr(pipe, name, None), torch.nn.Module):
                self._hook("text encoders", getattr(pipe, name))
        self._hook("denoising", getattr(pipe, engine.model.denoiser))
        self._hook("VAE decode", pipe.vae.decoder)
        checker = getattr(engine, "safety_checker", None) or getattr(pipe, "safety_checker", None)
        if isinstance(checker, torch.nn.Module):
            self._hook("safety checker", checker)
        elif callable(getattr(checker, "flags", None)):  # flashsd.safety.SafetyChecker: time flags()
            self._wrap("safety checker", checker, "flags")

    def _wrap(self, stage: str, owner, method: str):
        original = getattr(owner, method)

        def timed_call(*args, **kwargs):
            synchronize()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize()
                self.totals[stage] += time.perf_counter() - started

        setattr(owner, method, timed_call)
        self._restore.append(lambda: delattr(owner, method))

    def _hook(self, stage: str, module: torch.nn.Module):
        def before(*_):
            synchronize()
            self._started[stage] = time.perf_counter()

        def after(*_):
            synchronize()
            self.totals[stage] += time.perf_counter() - self._started.pop(stage)

        self._undo += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove(self):
        for handle in self._undo:
            handle.remove()
        for restore in self._restore:
            restore()


def count_syncs(engine: Engine, request) -> int | None:
    """Host-device synchronisations in one generate call (CUDA only), counted with PyTorch's sync debug
    mode, which warns at each synchronising operation."""
    if not torch.cuda.is_available():
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.generate(request)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def stages(engine: Engine, size: int, repeats: int) -> dict:
    model = engine.model
    request = request_for(model, size, 1)
    engine.generate(request)  # warm-up
    samples: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            timer = StageTimer(engine)
            try:
                synchronize()
                started = time.perf_counter()
                generated = engine.generate(request)
                synchronize()
                generate_s = time.perf_counter() - started
            finally:
                timer.remove()
            encode_s = timed(lambda: write_outputs(generated, request, model, Path(tmp)))
            for stage, seconds in timer.totals.items():
                samples[stage].append(seconds)
            samples["other (scheduler, latents, to PIL, ...)"].append(generate_s - sum(timer.totals.values()))
            samples["encoding (webp q80)"].append(encode_s)
            samples["total"].append(generate_s + encode_s)
    result = {"size": f"{size}x{size}", "ms": {stage: ms(statistics.median(v)) for stage, v in samples.items()}}
    four, eight = (count_syncs(engine, request_for(model, size, 1, num_inference_steps=n)) for n in (4, 8))
    if four is not None:
        # Syncs that every denoising step adds: the difference between an 8-step and a 4-step call, per step.
        result["syncs_per_prediction"] = four
        result["syncs_per_step"] = (eight - four) / 4
    return result


def report_stages(results: dict) -> str:
    names = []
    for result in results.values():
        names += [n for n in result["ms"] if n not in names]
    rows = [(n, *[r["ms"].get(n) for r in results.values()]) for n in names]
    if any("syncs_per_prediction" in r for r in results.values()):
        rows.append(
            (
                "GPU syncs per prediction / per step",
                *[f"{r['syncs_per_prediction']} / {r['syncs_per_step']:g}" for r in results.values()],
            )
        )
    size = next(iter(results.values()))["size"]
    return "\n".join([f"Per-stage times, one image at {size} (ms)", table(rows, ("stage", *results))])


# --- images/s ------------------------------------------------------------------------------------------


def throughput(engine: Engine, size: int, repeats: int, batches=(1, 4)) -> dict:
    requests = {n: request_for(engine.model, size, n) for n in batches}
    times = medians({n: (lambda r=r: engine.generate(r)) for n, r in requests.items()}, repeats)
    return {
        "size": f"{size}x{size}",
        "images_per_s": {n: round(n / t, 3) for n, t in times.items()},
        "ms_per_call": {n: ms(t) for n, t in times.items()},
    }


def report_throughput(results: dict) -> str:
    rows = [(key, n, r["ms_per_call"][n], ips) for key, r in results.items() for n, ips in r["images_per_s"].items()]
    size = next(iter(results.values()))["size"]
    return "\n".join(
        [
            f"Images/s at {size}, eager (generation without encoding; compiled: the compile section)",
            table(rows, ("model", "batch", "ms/call", "images/s")),
        ]
    )


# --- channels_last (eager) -------------------------------------------------------------------------------


def layout(engine: Engine, size: int, repeats: int) -> dict:
    """Denoiser forward and VAE decode in NCHW (the eager default) against channels_last, on inputs
    captured from a real call. On a CUDA GPU this decides whether eager should run channels_last too."""
    pipe, model = engine.pipe, engine.model
    denoiser = getattr(pipe, model.denoiser)
    captured = {}

    def grab(name):
        def hook(module, args, kwargs):
            captured.setdefault(name, (args, kwargs))

        return hook

    handles = [
        denoiser.register_forward_pre_hook(grab("denoiser"), with_kwargs=True),
        pipe.vae.decoder.register_forward_pre_hook(grab("decoder"), with_kwargs=True),
    ]
    try:
        engine.generate(request_for(model, size, 1))
    finally:
        for h in handles:
            h.remove()
    out = {"size": f"{size}x{size}"}
    for name, module in (("denoiser", denoiser), ("vae_decoder", pipe.vae.decoder)):
        args, kwargs = captured["denoiser" if name == "denoiser" else "decoder"]
        if not any(p.dim() == 4 for p in module.parameters()):
            continue

        def call(module=module, args=args, kwargs=kwargs):
            with torch.inference_mode():
                module(*args, **kwargs)

        nchw = medians({"x": call}, repeats)["x"]
        module.to(memory_format=torch.channels_last)
        try:
            cl = medians({"x": call}, repeats)["x"]
        finally:
            module.to(memory_format=torch.contiguous_format)
        out[name] = {"nchw_ms": ms(nchw), "channels_last_ms": ms(cl), "ratio": round(cl / nchw, 3)}
    return out


def report_layout(results: dict) -> str:
    rows = [
        (key, part, r[part]["nchw_ms"], r[part]["channels_last_ms"], r[part]["ratio"])
        for key, r in results.items()
        for part in ("denoiser", "vae_decoder")
        if part in r
    ]
    return "\n".join(
        [
            "Eager memory layout (channels_last / NCHW below 1: channels_last is faster)",
            table(rows, ("model", "module", "NCHW ms", "channels_last ms", "ratio")),
        ]
    )
