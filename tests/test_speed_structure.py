"""The structural facts flashsd's speed rests on, checked on tiny random-weight pipelines of every family.

No timing here (bench/run.py measures speed): each test asserts a property that, when lost, makes the
GPU path slower without changing a single pixel, so only a test like this one notices.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from flashsd import speed
from flashsd.engine import Engine
from flashsd.models import MODELS
from flashsd.request import build_request, distinct_sizes, size_table
from flashsd.runtime import Runtime
from flashsd.settings import Settings
from testkit.pixels import max_difference
from testkit.predictors import predictor_inputs

CPU32 = Runtime(torch.device("cpu"), torch.float32)
CPU16 = Runtime(torch.device("cpu"), torch.float16)
ALL = list(MODELS)
PROJECT = Path(__file__).resolve().parent.parent


def request(key, **inputs):
    return build_request(MODELS[key], **{
        "prompt": "a lighthouse at dawn", "seed": 7, "aspect_ratio": "custom", "width": 64, "height": 96, **inputs,
    })  # fmt: skip


class Calls:
    """Records every forward call of a module: the batch size of its first tensor argument and the dtype."""

    def __init__(self, module: torch.nn.Module):
        self.batches: list[int] = []
        self.dtypes: list[torch.dtype] = []
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self.batches.append(first.shape[0] if first is not None else -1)
        self.dtypes.append(first.dtype if first is not None else None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- the eager path ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ALL)
def test_default_path_has_no_slicing_no_tiling_and_sdpa_everywhere(engines, key):
    engine = engines(key)
    pipe = engine.pipe
    assert speed.fast_path_problems(pipe, engine.model, CPU32.dtype) == []
    processors = {
        type(m.processor).__name__
        for c in pipe.components.values() if isinstance(c, torch.nn.Module)
        for m in c.modules() if hasattr(m, "processor")
    }  # fmt: skip
    assert processors and all(name.endswith("2_0") for name in processors), processors  # SDPA processors
    assert not any("Sliced" in name for name in processors)
    assert pipe.vae.use_slicing is False and pipe.vae.use_tiling is False
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            assert encoder.config._attn_implementation == "sdpa", name
    assert not engine.speed.compiled and not engine.speed.channels_last
    assert not any(
        getattr(m, "_compiled_call_impl", None) is not None
        for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()
    ), "eager is the default: nothing may be compiled without FLASHSD_COMPILE=1"  # fmt: skip


@pytest.mark.parametrize("key", ALL)
def test_adapter_is_merged_with_no_adapter_layers_left(engines, key):
    engine = engines(key)
    denoiser = getattr(engine.pipe, engine.model.denoiser)
    assert type(denoiser).__module__.startswith("diffusers."), type(denoiser)  # not a PeftModel wrapper
    assert not any(isinstance(m, BaseTunerLayer) for c in engine.pipe.components.values()
                   if isinstance(c, torch.nn.Module) for m in c.modules())  # fmt: skip
    assert not getattr(denoiser, "peft_config", None)
    if engine.model.adapter_format == "lora":
        assert engine.pipe.get_list_adapters() == {}
        assert engine.pipe.num_fused_loras == 1


@pytest.mark.parametrize("runtime", [CPU32, CPU16], ids=["fp32", "fp16"])
def test_sdxl_vae_runs_in_the_pipeline_dtype(tiny_weights, runtime):
    engine = Engine.load(MODELS["sdxl"], tiny_weights, runtime)
    pipe = engine.pipe
    assert pipe.vae.dtype == pipe.unet.dtype == runtime.dtype
    assert pipe.vae.config.force_upcast is False  # the fp16-fix VAE: the pipeline never upcasts it
    with Calls(pipe.vae.decoder) as decoder:
        engine.generate(request("sdxl", num_outputs=2))
    assert decoder.dtypes == [runtime.dtype] and decoder.batches == [2]  # one decode, whole batch, no upcast
    assert pipe.vae.dtype == runtime.dtype


@pytest.mark.parametrize("key", ALL)
@pytest.mark.parametrize("steps, outputs", [(4, 1), (4, 3), (2, 2), (8, 1)])
def test_exactly_num_inference_steps_batched_denoiser_calls(engines, key, steps, outputs):
    engine = engines(key)
    denoiser = getattr(engine.pipe, engine.model.denoiser)
    with Calls(denoiser) as calls, Calls(engine.pipe.vae.decoder) as decodes:
        images = engine.generate(request(key, num_inference_steps=steps, num_outputs=outputs))
    assert len(images) == outputs
    assert calls.batches == [outputs] * steps  # one call per step, the whole batch in it, no guidance pass
    assert decodes.batches == [outputs]


@pytest.mark.parametrize("key", ["sdxl", "sd15"])
def test_guidance_runs_both_branches_in_one_call_per_step(engines, key):
    engine = engines(key)
    with Calls(engine.pipe.unet) as calls:
        engine.generate(request(key, num_outputs=2, guidance_scale=3.0))
    assert calls.batches == [4] * 4


@pytest.mark.parametrize("key", ALL)
def test_the_prompt_is_encoded_once_for_the_whole_batch(engines, key):
    engine = engines(key)
    encoders = [getattr(engine.pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(engine.pipe, n, None)]
    spies = [Calls(e) for e in encoders]
    try:
        engine.generate(request(key, num_outputs=3))
    finally:
        for spy in spies:
            spy.handle.remove()
    for spy in spies:
        assert spy.batches == [1]  # tokenised and encoded once, repeated by diffusers


# --- compiled mode (opt-in) --------------------------------------------------------------------------


def test_compile_settings_keep_the_cache_beside_the_weights_per_torch_build_and_device(tmp_path):
    on = speed.compile_settings(tmp_path, CPU32, enabled=True, mode="max-autotune-no-cudagraphs")
    assert on.enabled and on.mode == "max-autotune-no-cudagraphs" and on.backend == "inductor"
    assert on.cache_dir.parent == tmp_path / ".torch-compile-cache"
    assert torch.__version__.split("+")[0] in on.cache_dir.name and on.cache_dir.name.endswith("cpu")


@pytest.mark.parametrize("key", ALL)
def test_warm_up_covers_every_size_of_the_aspect_ratio_table(key):
    model = MODELS[key]
    sizes = distinct_sizes(model)
    assert set(sizes) == set(size_table(model).values()) and len(sizes) == len(set(sizes))
    assert sizes[0] == (model.native_size, model.native_size)
    assert speed.WARM_UP_BATCHES == (1, 2)  # dynamic graphs specialise on size-1 dimensions


def test_engine_load_compiles_only_when_asked(tiny_weights, monkeypatch):
    seen = []

    def compile_and_warm_up(pipe, model, settings, warm_up, sizes, batches):
        seen.append(settings)
        return speed.SpeedState(compiled=True)

    monkeypatch.setattr(speed, "compile_and_warm_up", compile_and_warm_up)
    assert not Engine.load(MODELS["sd15"], tiny_weights, CPU32).speed.compiled and seen == []
    compiled = Settings.from_environ({"FLASHSD_COMPILE": "1"})
    assert Engine.load(MODELS["sd15"], tiny_weights, CPU32, compiled).speed.compiled
    assert [s.enabled for s in seen] == [True] and seen[0].cache_dir.is_relative_to(tiny_weights)


@pytest.fixture
def inductor_cache(monkeypatch):
    """Whatever compile_and_warm_up writes into TORCHINDUCTOR_CACHE_DIR is undone after the test."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("key", ALL)
def test_compiled_mode_captures_whole_regions_and_keeps_the_images(tiny_weights, tmp_path, inductor_cache, key):
    """Dynamo only (backend "eager": no code generation, seconds on a CPU): every region traces as one
    graph (fullgraph=True would raise otherwise), the warm-up runs, the compile cache goes beside the
    weights, and the images equal eager's."""
    engine = Engine.load(MODELS[key], tiny_weights, CPU32)
    eager = engine.generate(request(key, num_outputs=2))
    settings = dataclasses.replace(speed.compile_settings(tmp_path, CPU32, enabled=True), backend="eager")
    state = engine.compile(settings, sizes=[(64, 96)], batches=(2,))
    assert state.error is None and state.compiled and state.warm_up_calls == 1
    assert state.compiled_modules[-1] == "vae.decoder" and len(state.compiled_modules) > 1
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == state.cache_dir == str(settings.cache_dir)
    denoiser = getattr(engine.pipe, engine.model.denoiser)
    regions = {type(m).__name__ for m in denoiser.modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert regions and denoiser._compiled_call_impl is None  # regional, not the whole model
    if engine.model.denoiser == "unet":  # diffusers' _repeated_blocks, and the resnets
        assert regions == {"BasicTransformerBlock", "ResnetBlock2D"}
    else:
        assert regions == set(speed.REPEATED_BLOCKS[type(denoiser).__name__])
    with Calls(denoiser) as calls:
        compiled = engine.generate(request(key, num_outputs=2))
    assert calls.batches == [2] * 4
    for a, b in zip(eager, compiled):
        assert max_difference(a.image, b.image) <= 1


@pytest.mark.slow
def test_a_failed_compile_falls_back_to_eager(tiny_weights, tmp_path, inductor_cache, monkeypatch):
    engine = Engine.load(MODELS["sdxl"], tiny_weights, CPU32)
    eager = engine.generate(request("sdxl"))[0].image
    processors = {type(p).__name__ for p in engine.pipe.unet.attn_processors.values()}

    def broken_warm_up(*args, **kwargs):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(engine, "warm_up", broken_warm_up)
    settings = dataclasses.replace(speed.compile_settings(tmp_path, CPU32, enabled=True), backend="eager")
    state = engine.compile(settings)
    assert not state.compiled and "compiler exploded" in state.error
    assert {type(p).__name__ for p in engine.pipe.unet.attn_processors.values()} == processors  # QKV unfused
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in engine.pipe.unet.modules())
    assert speed.fast_path_problems(engine.pipe, engine.model, CPU32.dtype) == []
    assert max_difference(engine.generate(request("sdxl"))[0].image, eager) == 0


@pytest.mark.slow
def test_inductor_compile_and_its_cache_beside_the_weights(tiny_weights, tmp_path, inductor_cache):
    """The real compiler (inductor, C++ code generation: ~1 min on 2 cores) and a restart reusing its cache."""
    engine = Engine.load(MODELS["sd15"], tiny_weights, CPU32)
    eager = engine.generate(request("sd15"))[0].image
    settings = speed.compile_settings(tmp_path, CPU32, enabled=True)
    state = engine.compile(settings, sizes=[(64, 96)], batches=(1,))
    assert state.error is None and state.graphs_compiled > 0
    assert max_difference(engine.generate(request("sd15"))[0].image, eager) <= 2
    assert (settings.cache_dir / "sd15.megacache").is_file()
    assert any(settings.cache_dir.rglob("*.py")) or any(settings.cache_dir.rglob("*.so"))
    again = Engine.load(MODELS["sd15"], tiny_weights, CPU32)
    assert again.compile(settings, sizes=[(64, 96)], batches=(1,)).mega_cache_loaded


# --- the benchmarks still run (structure only, no timing) ----------------------------------------------


@pytest.mark.slow
def test_the_pipeline_benchmarks_run_on_tiny_weights(tiny_weights, tmp_path):
    """python -m bench.run as a user runs it (its own process), on the tiny weights: structure only, no timing."""
    sections = ["evaluations", "stages", "throughput", "layout"]
    command = [sys.executable, "-m", "bench.run", "--sections", ",".join(sections), "--weights", str(tiny_weights),
               "--model", "sdxl", "--models", "sdxl", "--size", "64", "--repeats", "1", "--no-grid", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (written,) = tmp_path.glob("*.json")
    document = json.loads(written.read_text())
    results = document["results"]
    assert document["errors"] == {} and set(results) >= set(sections)
    evaluations = results["evaluations"]
    assert evaluations["flash"]["rows_per_image"] == 4
    assert (
        evaluations["base"]["rows_per_image"] == 2 * 25 and evaluations["evaluations_ratio"] == 12.5
    )  # 25 guided steps
    assert {"text encoders", "denoising", "VAE decode", "encoding (webp q80)", "total"} <= set(
        results["stages"]["sdxl"]["ms"]
    )
    assert set(results["throughput"]["sdxl"]["images_per_s"]) == {"1", "4"}
    assert set(results["layout"]["sdxl"]) == {"size", "denoiser", "vae_decoder"}


def test_predictor_inputs_are_every_input_of_predict_at_its_default():
    import inspect

    from predict import Predictor

    inputs = predictor_inputs(Predictor, prompt="x")
    assert set(inputs) == set(inspect.signature(Predictor.predict).parameters) - {"self"}
    assert inputs["prompt"] == "x" and inputs["num_outputs"] == 1 and inputs["output_format"] == "webp"
    assert inputs["seed"] is None  # a cog Input() resolved to its default, not the FieldInfo
