"""The engine on tiny random-weight checkpoints of all four families, against the model cards' recipes."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    LCMScheduler,
    PixArtAlphaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from peft import PeftModel

from flashsd.engine import Engine
from flashsd.models import MODELS
from flashsd.request import build_request
from flashsd.runtime import Runtime
from flashsd.schedulers import FlashFlowMatchEulerDiscreteScheduler

CPU32 = Runtime(torch.device("cpu"), torch.float32)
SIZE = dict(aspect_ratio="custom", width=128, height=96)
ALL = list(MODELS)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def max_difference(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def request(key, **inputs):
    return build_request(MODELS[key], **{"prompt": "a lighthouse at dawn", "seed": 1234, **SIZE, **inputs})


def card_pipeline(key, root, *, with_adapter=True, fuse=True):
    """Each model card's recipe, written out with plain diffusers and peft (no flashsd code but the SD3
    scheduler the card imports from a fork)."""

    def lcm(base):
        return LCMScheduler.from_pretrained(base, subfolder="scheduler", timestep_spacing="trailing")

    if key == "sdxl":
        base = root / "stabilityai/stable-diffusion-xl-base-1.0"
        vae = AutoencoderKL.from_pretrained(root / "madebyollin/sdxl-vae-fp16-fix")
        pipe = StableDiffusionXLPipeline.from_pretrained(base, vae=vae, variant="fp16", torch_dtype=torch.float32)
        pipe.scheduler = lcm(base)
        lora = root / "jasperai/flash-sdxl"
    elif key == "sd15":
        base = root / "stable-diffusion-v1-5/stable-diffusion-v1-5"
        pipe = StableDiffusionPipeline.from_pretrained(
            base,
            variant="fp16",
            torch_dtype=torch.float32,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.scheduler = lcm(base)
        lora = root / "jasperai/flash-sd"
    elif key == "sd3":
        base = root / "stabilityai/stable-diffusion-3-medium-diffusers"
        pipe = StableDiffusion3Pipeline.from_pretrained(
            base, text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
        )
        if with_adapter:
            pipe.transformer = PeftModel.from_pretrained(pipe.transformer, root / "jasperai/flash-sd3")
        pipe.scheduler = FlashFlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
        return pipe
    else:
        base = root / "PixArt-alpha/PixArt-XL-2-1024-MS"
        pipe = PixArtAlphaPipeline.from_pretrained(base, torch_dtype=torch.float32)
        if with_adapter:
            pipe.transformer = PeftModel.from_pretrained(pipe.transformer, root / "jasperai/flash-pixart")
        pipe.scheduler = lcm(base)
        return pipe
    if with_adapter:
        pipe.load_lora_weights(lora)
        if fuse:
            pipe.fuse_lora()
    return pipe


def run_card(pipe, key, seeds, **call):
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    extra = {"use_resolution_binning": False, "clean_caption": False} if key == "pixart" else {}
    arguments = (
        dict(
            prompt="a lighthouse at dawn",
            width=128,
            height=96,
            num_inference_steps=4,
            guidance_scale=0.0,
            num_images_per_prompt=len(seeds),
            generator=generators,
            **extra,
        )
        | call
    )
    if key == "sd3":
        with pipe.scheduler.noise_generators(generators):
            return pipe(**arguments).images
    return pipe(**arguments).images


@pytest.mark.parametrize("key", ALL)
def test_output_equals_the_model_cards_recipe_within_one_level(engines, tiny_weights, key):
    ours = engines(key).generate(request(key, num_outputs=2))
    reference = run_card(card_pipeline(key, tiny_weights), key, [1234, 1235])
    for mine, theirs in zip(ours, reference):
        assert mine.image.size == (128, 96)
        assert max_difference(mine.image, theirs) <= 1


@pytest.mark.parametrize("key", ALL)
def test_the_flash_adapter_changes_the_image(engines, tiny_weights, key):
    ours = engines(key).generate(request(key))[0].image
    without = run_card(card_pipeline(key, tiny_weights, with_adapter=False), key, [1234])[0]
    assert max_difference(ours, without) > 10


@pytest.mark.parametrize("key", ["sdxl", "sd15"])
def test_fused_lora_equals_unfused_lora(engines, tiny_weights, key):
    ours = engines(key).generate(request(key))[0].image
    unfused = run_card(card_pipeline(key, tiny_weights, fuse=False), key, [1234])[0]
    assert max_difference(ours, unfused) <= 1


@pytest.mark.parametrize("key", ALL)
def test_batch_image_i_equals_a_single_run_with_seed_plus_i(engines, key):
    batch = engines(key).generate(request(key, num_outputs=3, seed=50))
    alone = engines(key).generate(request(key, num_outputs=1, seed=52))
    assert [g.seed for g in batch] == [50, 51, 52]
    assert max_difference(batch[2].image, alone[0].image) <= 1
    assert max_difference(batch[0].image, batch[1].image) > 10


@pytest.mark.parametrize("key", ALL)
def test_same_seed_gives_the_same_image(engines, key):
    first, second = (engines(key).generate(request(key, seed=9))[0].image for _ in range(2))
    assert max_difference(first, second) == 0


@pytest.mark.parametrize("key", ["sdxl", "sd15", "pixart"])
def test_lcm_models_use_the_cards_four_step_schedule(engines, key):
    scheduler = engines(key).pipe.scheduler
    assert isinstance(scheduler, LCMScheduler)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]


def test_sd3_uses_the_flash_flow_match_scheduler_with_the_base_shift(engines):
    scheduler = engines("sd3").pipe.scheduler
    assert isinstance(scheduler, FlashFlowMatchEulerDiscreteScheduler)
    assert scheduler.config.shift == 3.0


def test_guidance_above_one_uses_the_negative_prompt(engines):
    engine = engines("sdxl")
    plain = engine.generate(request("sdxl", guidance_scale=3))[0].image
    negative = engine.generate(request("sdxl", guidance_scale=3, negative_prompt="fog"))[0].image
    assert max_difference(plain, negative) > 0


@pytest.mark.parametrize("key", ALL)
def test_guidance_with_a_negative_prompt_equals_the_model_cards_recipe_within_one_level(engines, tiny_weights, key):
    ours = engines(key).generate(request(key, num_outputs=2, guidance_scale=3, negative_prompt="fog"))
    card = card_pipeline(key, tiny_weights)
    reference = run_card(card, key, [1234, 1235], guidance_scale=3, negative_prompt="fog")
    without_negative = run_card(card, key, [1234], guidance_scale=3)[0]
    assert max_difference(reference[0], without_negative) > 1  # the negative prompt matters to the recipe
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.image.size == (128, 96)
        assert max_difference(mine.image, theirs) <= 1


def test_sizes_are_honoured_as_asked(engines):
    for key in ALL:
        (generated,) = engines(key).generate(request(key, width=64, height=160))
        assert generated.image.size == (64, 160), key


def test_half_precision_setup_runs_on_cpu(tiny_weights):
    """The set-up CUDA uses (fp16 weights, fp16-fix VAE, same pipeline), run here so dtype slips show."""
    engine = Engine.load(MODELS["sdxl"], tiny_weights, Runtime(torch.device("cpu"), torch.float16))
    pipe = engine.pipe
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.float16}
    assert pipe.vae.config.force_upcast is False
    (generated,) = engine.generate(request("sdxl"))
    values = pixels(generated.image)
    assert values.std() > 1  # not a flat (black / NaN) image
