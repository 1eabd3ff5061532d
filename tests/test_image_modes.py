"""Image-to-image and inpainting on the tiny checkpoints: what changes, what is kept, how many steps run, the
seeds contract, and that every mode runs on the one set of loaded weights."""

import re

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from flashsd.engine import Engine
from flashsd.images import write_outputs
from flashsd.models import MODELS
from flashsd.request import build_request
from flashsd.runtime import Runtime
from testkit.pixels import max_difference, pixels

CPU32 = Runtime(torch.device("cpu"), torch.float32)
IMAGE_MODELS = [key for key, model in MODELS.items() if model.img2img_pipeline and model.inpaint_pipeline]
SIZE = dict(aspect_ratio="custom", width=96, height=64)


def source_image() -> Image.Image:
    """A smooth picture (gradients and a disc), so a changed pixel is not noise in the input itself."""
    y, x = np.mgrid[0:64, 0:96]
    rgb = np.stack([x * 255 / 95, y * 255 / 63, 255 - x * 255 / 95], axis=-1)
    rgb[(x - 48) ** 2 + (y - 32) ** 2 < 15**2] = (250, 220, 40)
    return Image.fromarray(rgb.astype(np.uint8))


def box_mask() -> Image.Image:
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (32, 16, 80, 48))
    return mask


MASK_AREA = (slice(16, 48), slice(32, 80))  # rows, columns of box_mask's white box


def request(key, mode, **inputs):
    images = {
        "text": {},
        "img2img": {"image": source_image()},
        "inpaint": {"image": source_image(), "mask": box_mask()},
    }
    return build_request(
        MODELS[key], **{"prompt": "a lighthouse at dawn", "seed": 1234, **SIZE, **images[mode], **inputs}
    )


class StepCounter:
    """Counts the denoiser's forward calls (one per step at guidance 0)."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("key", IMAGE_MODELS)
def test_image_to_image_differs_from_text_to_image_and_follows_the_input(engines, key):
    engine = engines(key)
    (text,) = engine.generate(request(key, "text"))
    (low,) = engine.generate(request(key, "img2img", prompt_strength=0.3))
    (high,) = engine.generate(request(key, "img2img", prompt_strength=1.0))
    assert low.image.size == (96, 64) and low.seed == 1234
    assert max_difference(low.image, text.image) > 10
    assert max_difference(low.image, high.image) > 10
    # The output depends on the input image (random weights say nothing about how much of it survives).
    flipped = source_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    (other,) = engine.generate(request(key, "img2img", prompt_strength=0.3, image=flipped))
    assert max_difference(low.image, other.image) > 10


@pytest.mark.parametrize("key", IMAGE_MODELS)
def test_inpainting_repaints_the_mask_and_keeps_every_other_pixel(engines, key):
    engine = engines(key)
    req = request(key, "inpaint", prompt_strength=1.0)
    (inpainted,) = engine.generate(req)
    (img2img,) = engine.generate(request(key, "img2img", prompt_strength=1.0))
    out, source, mask = pixels(inpainted.image), pixels(req.image), np.asarray(req.mask) > 0
    assert np.array_equal(out[~mask], source[~mask])  # unmasked: the input's own pixels
    assert np.abs(out[mask] - source[mask]).mean() > 10  # masked: repainted
    assert max_difference(inpainted.image, img2img.image) > 10


@pytest.mark.parametrize("key", IMAGE_MODELS)
@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_prompt_strength_decides_how_many_steps_run(engines, key, mode):
    engine = engines(key)
    denoiser = getattr(engine.pipe, MODELS[key].denoiser)
    outputs = []
    sweep = [(0.0, 1), (0.5, 2), (0.8, 3), (1.0, 4)] if key == "sd15" else [(0.3, 1), (0.8, 3)]
    for strength, expected in sweep:
        req = request(key, mode, prompt_strength=strength)
        assert req.steps_run == expected
        with StepCounter(denoiser) as counter:
            (generated,) = engine.generate(req)
        assert counter.calls == expected, (strength, counter.calls)
        outputs.append(generated.image)
    assert all(max_difference(a, b) > 0 for a, b in zip(outputs, outputs[1:]))


@pytest.mark.parametrize("key", IMAGE_MODELS)
@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_batch_image_i_equals_a_single_run_with_seed_plus_i_and_seeds_repeat(engines, key, mode):
    engine = engines(key)
    batch = engine.generate(request(key, mode, num_outputs=2, seed=50))
    alone = engine.generate(request(key, mode, seed=51))
    again = engine.generate(request(key, mode, seed=51))
    assert [g.seed for g in batch] == [50, 51]
    assert max_difference(batch[1].image, alone[0].image) <= 1
    assert max_difference(alone[0].image, again[0].image) == 0
    assert max_difference(batch[0].image, batch[1].image) > 0


def _storages(engine) -> dict[str, tuple[int, torch.dtype]]:
    return {
        f"{name}.{p}": (t.data_ptr(), t.dtype)
        for name, module in engine.pipe.components.items() if isinstance(module, torch.nn.Module)
        for p, t in module.state_dict().items()
    }  # fmt: skip


@pytest.mark.parametrize("key", IMAGE_MODELS)
def test_every_mode_runs_on_the_same_loaded_components(engines, key):
    engine = engines(key)
    assert engine.modes == ("text-to-image", "image-to-image", "inpainting")
    before = _storages(engine)
    for mode, name in [("image-to-image", MODELS[key].img2img_pipeline), ("inpainting", MODELS[key].inpaint_pipeline)]:
        derived = engine.pipeline_for(mode)
        assert type(derived).__name__ == name
        shared = {n: m for n, m in engine.pipe.components.items() if isinstance(m, torch.nn.Module)}
        assert shared and all(getattr(derived, n) is m for n, m in shared.items())
        assert derived.scheduler is engine.pipe.scheduler
        assert engine.pipeline_for(mode) is derived  # built once
    for mode in ("img2img", "inpaint", "text"):
        engine.generate(request(key, mode))
    assert _storages(engine) == before  # no tensor moved, copied or cast


@pytest.mark.parametrize("key", IMAGE_MODELS)
def test_the_mode_pipelines_have_the_configuration_from_pipe_gives(engines, key):
    engine = engines(key)
    for mode, name in [("image-to-image", MODELS[key].img2img_pipeline), ("inpainting", MODELS[key].inpaint_pipeline)]:
        reference = getattr(diffusers, name).from_pipe(engine.pipe, dtype=CPU32.dtype)
        public = lambda pipe: {k: v for k, v in pipe.config.items() if not k.startswith("_")}  # noqa: E731
        assert public(engine.pipeline_for(mode)) == public(reference)


def test_a_replaced_component_is_picked_up_by_the_mode_pipelines(engines):
    engine = engines("sd15")
    derived = engine.pipeline_for("image-to-image")
    original = engine.pipe.scheduler
    try:
        engine.pipe.scheduler = diffusers.LCMScheduler.from_config(original.config)
        rebuilt = engine.pipeline_for("image-to-image")
        assert rebuilt is not derived and rebuilt.scheduler is engine.pipe.scheduler and rebuilt.unet is derived.unet
    finally:
        engine.pipe.scheduler = original


def test_half_precision_modes_keep_every_weight_in_place(tiny_weights):
    """The CUDA set-up (fp16): switching modes casts and copies nothing (from_pipe's default would cast to
    fp32), and the images are not flat."""
    engine = Engine.load(MODELS["sdxl"], tiny_weights, Runtime(torch.device("cpu"), torch.float16))
    before = _storages(engine)
    assert {dtype for _, dtype in before.values()} == {torch.float16}
    for mode in ("img2img", "inpaint"):
        (generated,) = engine.generate(request("sdxl", mode))
        assert pixels(generated.image).std() > 1
    assert _storages(engine) == before
    assert engine.safety_checker.model.dtype == torch.float16


def test_models_without_image_pipelines_have_text_to_image_only():
    assert Engine(MODELS["pixart"], None, CPU32).modes == ("text-to-image",)
    with pytest.raises(ValueError, match="no image-to-image pipeline"):
        Engine(MODELS["pixart"], None, CPU32).pipeline_for("image-to-image")


def test_outputs_carry_the_denoising_strength_in_their_metadata(engines, tmp_path):
    engine = engines("sd15")
    req = request("sd15", "img2img", prompt_strength=0.5, num_outputs=2, seed=7, output_format="png")
    paths = write_outputs(engine.generate(req), req, MODELS["sd15"], tmp_path)
    for path, seed in zip(paths, (7, 8)):
        text = Image.open(path).text["parameters"]
        assert re.search(rf"Steps: 4, .*Seed: {seed}, Size: 96x64, Model: Flash SD, Denoising strength: 0.5$", text)
    (text_path,) = write_outputs(
        engine.generate(request("sd15", "text")), request("sd15", "text"), MODELS["sd15"], tmp_path
    )
    assert "Denoising strength" not in Image.open(text_path).info.get("parameters", "")
