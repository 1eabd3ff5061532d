"""The engine on tiny random-weight checkpoints of all four families, against the model cards' recipes."""

import pytest
import torch
from diffusers import LCMScheduler

from flashsd.engine import Engine
from flashsd.models import MODELS
from flashsd.runtime import Runtime
from flashsd.schedulers import FlashFlowMatchEulerDiscreteScheduler
from testkit.pixels import max_difference, pixels
from testkit.recipes import card_pipeline, card_request, run_card

ALL = list(MODELS)


@pytest.mark.parametrize("key", ALL)
def test_output_equals_the_model_cards_recipe_within_one_level(engines, tiny_weights, key):
    ours = engines(key).generate(card_request(key, num_outputs=2))
    reference = run_card(card_pipeline(key, tiny_weights), key, [1234, 1235])
    for mine, theirs in zip(ours, reference):
        assert mine.image.size == (128, 96)
        assert max_difference(mine.image, theirs) <= 1


@pytest.mark.parametrize("key", ALL)
def test_the_flash_adapter_changes_the_image(engines, tiny_weights, key):
    ours = engines(key).generate(card_request(key))[0].image
    without = run_card(card_pipeline(key, tiny_weights, flash=False), key, [1234])[0]
    assert max_difference(ours, without) > 10


@pytest.mark.parametrize("key", ["sdxl", "sd15"])
def test_fused_lora_equals_unfused_lora(engines, tiny_weights, key):
    ours = engines(key).generate(card_request(key))[0].image
    unfused = run_card(card_pipeline(key, tiny_weights, fuse=False), key, [1234])[0]
    assert max_difference(ours, unfused) <= 1


@pytest.mark.parametrize("key", ALL)
def test_batch_image_i_equals_a_single_run_with_seed_plus_i(engines, key):
    batch = engines(key).generate(card_request(key, num_outputs=3, seed=50))
    alone = engines(key).generate(card_request(key, num_outputs=1, seed=52))
    assert [g.seed for g in batch] == [50, 51, 52]
    assert max_difference(batch[2].image, alone[0].image) <= 1
    assert max_difference(batch[0].image, batch[1].image) > 10


@pytest.mark.parametrize("key", ALL)
def test_same_seed_gives_the_same_image(engines, key):
    first, second = (engines(key).generate(card_request(key, seed=9))[0].image for _ in range(2))
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
    plain = engine.generate(card_request("sdxl", guidance_scale=3))[0].image
    negative = engine.generate(card_request("sdxl", guidance_scale=3, negative_prompt="fog"))[0].image
    assert max_difference(plain, negative) > 0


@pytest.mark.parametrize("key", ALL)
def test_guidance_with_a_negative_prompt_equals_the_model_cards_recipe_within_one_level(engines, tiny_weights, key):
    ours = engines(key).generate(card_request(key, num_outputs=2, guidance_scale=3, negative_prompt="fog"))
    card = card_pipeline(key, tiny_weights)
    reference = run_card(card, key, [1234, 1235], guidance_scale=3, negative_prompt="fog")
    without_negative = run_card(card, key, [1234], guidance_scale=3)[0]
    assert max_difference(reference[0], without_negative) > 1  # the negative prompt matters to the recipe
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.image.size == (128, 96)
        assert max_difference(mine.image, theirs) <= 1


def test_sizes_are_honoured_as_asked(engines):
    for key in ALL:
        (generated,) = engines(key).generate(card_request(key, width=64, height=160))
        assert generated.image.size == (64, 160), key


def test_half_precision_setup_runs_on_cpu(tiny_weights):
    """The set-up CUDA uses (fp16 weights, fp16-fix VAE, same pipeline), run here so dtype slips show."""
    engine = Engine.load(MODELS["sdxl"], tiny_weights, Runtime(torch.device("cpu"), torch.float16))
    pipe = engine.pipe
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.float16}
    assert pipe.vae.config.force_upcast is False
    (generated,) = engine.generate(card_request("sdxl"))
    values = pixels(generated.image)
    assert values.std() > 1  # not a flat (black / NaN) image
