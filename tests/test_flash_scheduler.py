"""The Flash SD3 scheduler: its grid, its step, per-image noise, loading, and the stock SD3 pipelines."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from flashsd.schedulers import FlashFlowMatchEulerDiscreteScheduler

T = 1000
SD3_MEDIUM_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}


def expected_sigmas(n, shift, train_steps=T):
    """REFERENCE §2 in exact rational arithmetic, independent of the scheduler's code."""
    shift = Fraction(shift)

    def sigma(s):
        return shift * s / (1 + (shift - 1) * s)

    top, bottom = Fraction(train_steps), sigma(Fraction(1, train_steps)) * train_steps
    u = [top] if n == 1 else [top + (bottom - top) * i / (n - 1) for i in range(n)]
    return [sigma(x / train_steps) for x in u]


def flash(shift=3.0, steps=None):
    scheduler = FlashFlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# --- the grid ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_timesteps_and_sigmas_follow_the_flash_formula(shift, steps):
    scheduler = flash(shift, steps)
    want = expected_sigmas(steps, shift)

    assert scheduler.timesteps.dtype == torch.float32
    assert scheduler.sigmas.tolist()[-1] == 0.0
    assert len(scheduler.timesteps) == steps and len(scheduler.sigmas) == steps + 1
    for got_sigma, got_t, w in zip(scheduler.sigmas.tolist(), scheduler.timesteps.tolist(), want):
        assert math.isclose(got_sigma, float(w), rel_tol=1e-6, abs_tol=1e-7)
        assert math.isclose(got_t, float(w) * T, rel_tol=1e-6)
    assert scheduler.timesteps[0].item() == T  # always starts from pure noise


def test_grid_ends_on_the_shift_applied_to_the_already_shifted_sigma_min():
    # §2 read literally: u ends at T·σ(1/T), which is shifted again. With shift 3: σ(σ(1/T)) ≈ 0.00893,
    # not σ(1/T) ≈ 0.00299.
    scheduler = flash(3.0, 4)
    once = 3 * (1 / T) / (1 + 2 * (1 / T))
    twice = 3 * once / (1 + 2 * once)
    assert math.isclose(scheduler.sigmas[-2].item(), twice, rel_tol=1e-6)
    assert [round(t, 2) for t in scheduler.timesteps.tolist()] == [1000.0, 857.69, 602.15, 8.93]


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 28])
def test_grid_is_the_one_the_stock_flow_match_scheduler_builds(steps):
    stock = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    stock.set_timesteps(steps)
    ours = flash(3.0, steps)
    torch.testing.assert_close(ours.sigmas, stock.sigmas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.timesteps, stock.timesteps, rtol=1e-6, atol=1e-4)


def test_custom_sigmas_are_shifted_like_the_stock_scheduler_and_mu_is_refused():
    ours, stock = flash(3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours.set_timesteps(sigmas=[1.0, 0.5, 0.25])
    stock.set_timesteps(sigmas=[1.0, 0.5, 0.25])
    torch.testing.assert_close(ours.sigmas, stock.sigmas)
    with pytest.raises(ValueError, match="mu"):
        ours.set_timesteps(4, mu=0.5)


# --- the step ---------------------------------------------------------------------------------------


def test_middle_step_renoises_the_predicted_clean_sample_with_fresh_noise():
    scheduler = flash(3.0, 4)
    x = torch.randn(2, 16, 4, 4, generator=seeded(0))
    v = torch.randn(2, 16, 4, 4, generator=seeded(1))
    scheduler.step(v, scheduler.timesteps[0], x)  # step 0, to stand at step 1

    out = scheduler.step(v, scheduler.timesteps[1], x, generator=[seeded(7), seeded(8)]).prev_sample

    s1, s2 = (float(f) for f in expected_sigmas(4, 3.0)[1:3])
    eps = torch.stack([torch.randn(16, 4, 4, generator=seeded(seed)) for seed in (7, 8)])
    x0 = x - s1 * v
    torch.testing.assert_close(out, s2 * eps + (1 - s2) * x0, rtol=1e-5, atol=1e-6)


def test_last_step_returns_the_predicted_clean_sample_and_draws_no_noise():
    scheduler = flash(3.0, 4)
    scheduler.set_begin_index(3)
    x = torch.randn(1, 16, 4, 4, generator=seeded(0))
    v = torch.randn(1, 16, 4, 4, generator=seeded(1))
    generator = seeded(7)
    state = generator.get_state()

    (out,) = scheduler.step(v, scheduler.timesteps[3], x, generator=generator, return_dict=False)

    s3 = float(expected_sigmas(4, 3.0)[3])
    torch.testing.assert_close(out, x - s3 * v, rtol=1e-6, atol=1e-6)
    assert torch.equal(generator.get_state(), state)


def test_step_computes_in_float32_and_returns_the_sample_dtype():
    scheduler = flash(3.0, 4)
    x = torch.randn(1, 16, 4, 4, generator=seeded(0)).to(torch.bfloat16)
    v = torch.randn(1, 16, 4, 4, generator=seeded(1)).to(torch.bfloat16)
    out = scheduler.step(v, scheduler.timesteps[0], x, generator=seeded(3)).prev_sample
    s1 = scheduler.sigmas[1].item()
    eps = torch.randn(16, 4, 4, generator=seeded(3))
    want = (s1 * eps + (1 - s1) * (x.float() - 1.0 * v.float())).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)


def test_integer_timesteps_and_steps_past_the_end_are_refused():
    scheduler = flash(3.0, 1)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="integer"):
        scheduler.step(x, 0, x)
    scheduler.step(x, scheduler.timesteps[0], x)
    with pytest.raises(IndexError):
        scheduler.step(x, scheduler.timesteps[0], x)


def test_scale_noise_mixes_with_the_sigma_of_the_timestep():
    scheduler = flash(3.0, 4)
    x, noise = torch.randn(2, 16, 4, 4, generator=seeded(0)), torch.randn(2, 16, 4, 4, generator=seeded(1))
    t = scheduler.timesteps[2]
    s = scheduler.sigmas[2].item()
    torch.testing.assert_close(scheduler.scale_noise(x, t[None], noise), s * noise + (1 - s) * x)
    # A batch may mix timesteps; an off-grid timestep uses σ = t/T.
    mixed = scheduler.scale_noise(x, torch.tensor([t.item(), 250.0]), noise)
    torch.testing.assert_close(mixed[1], 0.25 * noise[1] + 0.75 * x[1])


# --- per-image noise ----------------------------------------------------------------------------------


def denoise(batch_seeds, steps=4):
    """A full sampling loop with a fake velocity model, each image on its own generator."""
    scheduler = flash(3.0, steps)
    generators = [seeded(s) for s in batch_seeds]
    x = torch.stack([torch.randn(16, 8, 8, generator=g) for g in generators])
    with scheduler.noise_generators(generators):
        for t in scheduler.timesteps:
            v = 0.5 * x + 0.01 * t  # depends on the sample, as a model would
            x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def test_image_in_a_batch_equals_the_single_image_run_with_its_seed():
    batch = denoise([41, 42])
    assert torch.equal(batch[1], denoise([42])[0])
    assert torch.equal(batch[0], denoise([41])[0])
    assert not torch.equal(batch[0], batch[1])


def test_without_generators_step_falls_back_to_the_global_rng_even_after_an_exception():
    scheduler = flash(3.0, 4)
    x = torch.zeros(1, 16, 4, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with scheduler.noise_generators([seeded(1)]):
            raise RuntimeError("boom")

    torch.manual_seed(5)
    out = scheduler.step(torch.zeros_like(x), scheduler.timesteps[0], x).prev_sample
    torch.manual_seed(5)
    s1 = scheduler.sigmas[1].item()
    torch.testing.assert_close(out, s1 * torch.randn(x.shape))


def test_generator_argument_wins_over_the_context_and_nested_contexts_restore():
    x = torch.zeros(1, 16, 4, 4)
    v = torch.zeros_like(x)

    def first_step(scheduler, **kwargs):
        scheduler.set_timesteps(4)
        return scheduler.step(v, scheduler.timesteps[0], x, **kwargs).prev_sample

    scheduler = flash(3.0)
    with scheduler.noise_generators([seeded(1)]):
        with scheduler.noise_generators(seeded(2)):
            inner = first_step(scheduler)
        outer = first_step(scheduler)
        explicit = first_step(scheduler, generator=[seeded(3)])
    assert torch.equal(inner, first_step(flash(3.0), generator=seeded(2)))
    assert torch.equal(outer, first_step(flash(3.0), generator=seeded(1)))
    assert torch.equal(explicit, first_step(flash(3.0), generator=seeded(3)))


def test_one_generator_per_image_is_required():
    scheduler = flash(3.0, 4)
    x = torch.zeros(2, 4, 2, 2)
    with scheduler.noise_generators([seeded(1)]):
        with pytest.raises(ValueError, match="one per image"):
            scheduler.step(x, scheduler.timesteps[0], x)


# --- loading ------------------------------------------------------------------------------------------


def write_scheduler_config(root, config):
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return root


def test_loads_from_the_sd3_medium_scheduler_config(tmp_path):
    base = write_scheduler_config(tmp_path, SD3_MEDIUM_SCHEDULER_CONFIG)
    scheduler = FlashFlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    assert (scheduler.config.num_train_timesteps, scheduler.config.shift) == (1000, 3.0)

    stock = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    swapped = FlashFlowMatchEulerDiscreteScheduler.from_config(stock.config)
    assert swapped.config.shift == 3.0
    swapped.set_timesteps(4)
    torch.testing.assert_close(swapped.sigmas, flash(3.0, 4).sigmas)

    scheduler.save_pretrained(tmp_path / "saved")
    again = FlashFlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "saved")
    assert again.config.shift == 3.0


def test_newer_config_keys_that_keep_the_fixed_shift_are_accepted(tmp_path):
    newer = {
        **SD3_MEDIUM_SCHEDULER_CONFIG,
        "_diffusers_version": "0.32.0",
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "some_future_option": 1,
    }
    base = write_scheduler_config(tmp_path, newer)
    scheduler = FlashFlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    assert scheduler.config.shift == 3.0
    assert not scheduler.config.get("use_dynamic_shifting")  # what the SD3 pipelines ask


def test_a_config_asking_for_dynamic_shifting_is_refused(tmp_path):
    base = write_scheduler_config(tmp_path, {**SD3_MEDIUM_SCHEDULER_CONFIG, "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="use_dynamic_shifting=True"):
        FlashFlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="fixed shift"):
        FlashFlowMatchEulerDiscreteScheduler.from_config(stock.config)


# --- the stock SD3 pipelines on a tiny random model ---------------------------------------------------


def tiny_clip_tokenizer(max_length=16):
    """A CLIP tokenizer whose vocabulary is the letters (no merges): enough to run the text encoders."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_clip_encoder(seed):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def sd3_components():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
    )  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035, sample_size=32,
    )  # fmt: skip
    return dict(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=tiny_clip_encoder(1),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_encoder(2),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def make_pipeline(cls, components):
    scheduler = FlashFlowMatchEulerDiscreteScheduler.from_config(
        FlowMatchEulerDiscreteScheduler.from_config(SD3_MEDIUM_SCHEDULER_CONFIG).config
    )
    pipe = cls(scheduler=scheduler, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_transformer_calls(pipe):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def run_pipeline(kind, components, strength=1.0, seeds=(0,)):
    size = 32
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.fromarray(np.tile((np.arange(size) >= size // 2).astype(np.uint8) * 255, (size, 1)))
    cls, extra = {
        "text-to-image": (StableDiffusion3Pipeline, {}),
        "img2img": (StableDiffusion3Img2ImgPipeline, {"image": image, "strength": strength}),
        "inpaint": (StableDiffusion3InpaintPipeline, dict(image=image, mask_image=mask, strength=strength)),
    }[kind]
    pipe = make_pipeline(cls, components)
    generators = [seeded(s) for s in seeds]
    calls, handle = count_transformer_calls(pipe)
    try:
        with pipe.scheduler.noise_generators(generators), torch.no_grad():
            out = pipe(
                prompt="a cat", num_inference_steps=4, guidance_scale=0.0, height=size, width=size,
                num_images_per_prompt=len(seeds), generator=generators, output_type="np", **extra,
            )  # fmt: skip
    finally:
        handle.remove()
    return out.images, len(calls)


@pytest.mark.parametrize("kind", ["text-to-image", "img2img", "inpaint"])
def test_stock_sd3_pipelines_run_four_flash_steps(sd3_components, kind):
    images, calls = run_pipeline(kind, sd3_components)
    assert calls == 4
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()


def test_img2img_at_half_strength_runs_fewer_steps(sd3_components):
    images, calls = run_pipeline("img2img", sd3_components, strength=0.5)
    assert calls == 2
    assert np.isfinite(images).all()


def test_pipeline_image_in_a_batch_equals_its_single_image_run(sd3_components):
    batch, _ = run_pipeline("text-to-image", sd3_components, seeds=(10, 11))
    single, _ = run_pipeline("text-to-image", sd3_components, seeds=(11,))
    # Same noise stream; only the batched matmuls may round differently.
    np.testing.assert_allclose(batch[1], single[0], atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-3)
