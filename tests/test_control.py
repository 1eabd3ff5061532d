"""Structure control against the recipes it promises: jasperai/flash-sdxl's card ("Combining Flash Diffusion with
Existing ControlNets"), diffusers' multi-ControlNet call and control_guidance_start/end, on tiny random-weight
checkpoints in the real layouts. The references are written with plain diffusers, transformers and OpenCV."""

import cv2
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image
from transformers import DepthAnythingForDepthEstimation, DPTImageProcessorPil

from flashsd import control
from flashsd.control import Control, ControlInputs, ControlNets, controls_from_inputs
from flashsd.control_maps import canny_map
from flashsd.errors import InputError
from flashsd.models import MODELS
from flashsd.request import build_request
from flashsd.runtime import Runtime

CPU32 = Runtime(torch.device("cpu"), torch.float32)
WIDTH, HEIGHT = 128, 96
SEEDS = [1234, 1235]
PROMPT = "a lighthouse at dawn"
BASE = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
LORA = {"sdxl": "jasperai/flash-sdxl", "sd15": "jasperai/flash-sd"}


def photo(width=WIDTH, height=HEIGHT, seed=0) -> Image.Image:
    """A photo with structure for edges and depth: shapes on a gradient, a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=2)
    pixels[height // 4 : height * 3 // 4, width // 5 : width // 2] = (220, 40, 40)
    pixels[(x - width * 0.7) ** 2 + (y - height * 0.5) ** 2 < (height * 0.25) ** 2] = (30, 200, 90)
    pixels = pixels + rng.integers(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def difference(a, b) -> int:
    return int(np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16)).max())


@pytest.fixture(scope="session")
def controlnets(tiny_weights):
    loaded = {}

    def get(key):
        if key not in loaded:
            loaded[key] = ControlNets.load(MODELS[key], tiny_weights, CPU32, control.CONTROL_TYPES)
        return loaded[key]

    return get


def flashsd_images(engines, controlnets, key, controls, *, mode="text-to-image", **inputs):
    """What flashsd makes of a request with `controls`: the engine's arguments plus the control module's."""
    engine, nets = engines(key), controlnets(key)
    request = build_request(
        MODELS[key], prompt=PROMPT, seed=SEEDS[0], num_outputs=len(SEEDS), aspect_ratio="custom", width=WIDTH,
        height=HEIGHT, **inputs,
    )  # fmt: skip
    maps = nets.maps(controls, (WIDTH, HEIGHT))
    pipe = nets.pipeline(engine.pipe, mode, [c.kind for c in controls])
    arguments = engine.pipeline_arguments(request) | nets.call_arguments(mode, controls, maps)
    return pipe(**arguments).images


# -- the references, written independently of flashsd -------------------------------------------------------------


def card_canny(image: Image.Image) -> Image.Image:
    """The card's canny map, as its code makes it."""
    image = np.array(image)
    image = cv2.Canny(image, 100, 200)
    image = image[:, :, None]
    image = np.concatenate([image, image, image], axis=2)
    return Image.fromarray(image)


def card_depth(root, image: Image.Image) -> Image.Image:
    """diffusers/controlnet-depth-sdxl-1.0's card's depth map, with Depth Anything V2 Small as the estimator."""
    folder = root / "depth-anything/Depth-Anything-V2-Small-hf"
    estimator = DepthAnythingForDepthEstimation.from_pretrained(folder)
    processor = DPTImageProcessorPil.from_pretrained(folder)
    pixels = processor(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        depth_map = estimator(pixels).predicted_depth
    depth_map = torch.nn.functional.interpolate(
        depth_map.unsqueeze(1), size=(image.height, image.width), mode="bicubic", align_corners=False
    )
    depth_min = torch.amin(depth_map, dim=[1, 2, 3], keepdim=True)
    depth_max = torch.amax(depth_map, dim=[1, 2, 3], keepdim=True)
    depth_map = (depth_map - depth_min) / (depth_max - depth_min)
    image = torch.cat([depth_map] * 3, dim=1)
    image = image.permute(0, 2, 3, 1).cpu().numpy()[0]
    return Image.fromarray((image * 255.0).clip(0, 255).astype(np.uint8))


def card_pipeline(root, key, kinds, pipeline_class=None):
    """The card's recipe: the ControlNet pipeline from the base repo with the ControlNet(s), Flash LoRA loaded and
    fused, LCM trailing."""
    nets = [
        ControlNetModel.from_pretrained(root / control.FAMILIES[key].controlnets[kind].id, variant="fp16")
        for kind in kinds
    ]
    base = root / BASE[key]
    extra = {"vae": AutoencoderKL.from_pretrained(root / "madebyollin/sdxl-vae-fp16-fix")} if key == "sdxl" else {}
    if key == "sd15":
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipeline_class = pipeline_class or (
        StableDiffusionXLControlNetPipeline if key == "sdxl" else StableDiffusionControlNetPipeline
    )
    pipe = pipeline_class.from_pretrained(
        base, controlnet=nets[0] if len(nets) == 1 else nets, variant="fp16", torch_dtype=torch.float32, **extra
    )
    pipe.scheduler = LCMScheduler.from_pretrained(base, subfolder="scheduler", timestep_spacing="trailing")
    pipe.load_lora_weights(root / LORA[key])
    pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_card(pipe, **call):
    return pipe(
        prompt=PROMPT, num_inference_steps=4, guidance_scale=0.0, num_images_per_prompt=len(SEEDS),
        generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS], **call,
    ).images  # fmt: skip


# -- maps ------------------------------------------------------------------------------------------------------


def test_the_canny_map_is_the_cards():
    picture = photo()
    ours, card = canny_map(picture), card_canny(picture)
    assert ours.mode == "RGB" and ours.size == picture.size
    assert np.array_equal(np.asarray(ours), np.asarray(card))
    assert 0 < np.asarray(ours).mean() < 255  # edges found, not everything


def test_the_depth_map_is_the_depth_cards_normalisation_of_depth_anything(controlnets, tiny_weights):
    picture = photo()
    (ours,) = controlnets("sdxl").maps([Control("controlnet_1", "depth", picture)], picture.size)
    card = card_depth(tiny_weights, picture)
    values = np.asarray(ours)
    assert ours.size == picture.size and values.min() == 0 and values.max() == 255  # min-max normalised
    assert difference(ours, card) <= 1


def test_maps_are_made_from_the_photo_fitted_to_the_output_size(controlnets):
    wide = photo(256, 96)
    (ours,) = controlnets("sdxl").maps([Control("controlnet_1", "canny", wide)], (WIDTH, HEIGHT))
    centre = wide.crop((64, 0, 192, 96))  # scaled to cover 128x96 (it already does), centre-cropped
    assert ours.size == (WIDTH, HEIGHT)
    assert np.array_equal(np.asarray(ours), np.asarray(card_canny(centre)))


# -- the card's recipe, multi-ControlNet, start/end -------------------------------------------------------------


def test_text_to_image_with_a_canny_control_equals_the_cards_recipe(engines, controlnets, tiny_weights):
    picture = photo()
    ours = flashsd_images(engines, controlnets, "sdxl", [Control("controlnet_1", "canny", picture, 0.5)])
    card = run_card(card_pipeline(tiny_weights, "sdxl", ["canny"]), image=card_canny(picture),
                    controlnet_conditioning_scale=0.5)  # fmt: skip
    without = (
        engines("sdxl")
        .generate(
            build_request(
                MODELS["sdxl"], prompt=PROMPT, seed=SEEDS[0], aspect_ratio="custom", width=WIDTH, height=HEIGHT
            )
        )[0]
        .image
    )
    assert difference(card[0], without) > 10  # the control matters to the recipe
    for mine, theirs in zip(ours, card, strict=True):
        assert mine.size == (WIDTH, HEIGHT)
        assert difference(mine, theirs) <= 1


def test_several_controls_equal_diffusers_multi_controlnet_call(engines, controlnets, tiny_weights):
    first, second = photo(seed=1), photo(seed=2).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    controls = [Control("controlnet_1", "canny", first, 0.8), Control("controlnet_2", "depth", second, 1.3)]
    ours = flashsd_images(engines, controlnets, "sdxl", controls)
    card = run_card(
        card_pipeline(tiny_weights, "sdxl", ["canny", "depth"]),
        image=[card_canny(first), card_depth(tiny_weights, second)], controlnet_conditioning_scale=[0.8, 1.3],
    )  # fmt: skip
    for mine, theirs in zip(ours, card, strict=True):
        assert difference(mine, theirs) <= 1


def test_start_and_end_equal_diffusers_control_guidance_start_and_end(engines, controlnets, tiny_weights):
    picture = photo()
    ours = flashsd_images(engines, controlnets, "sdxl", [Control("controlnet_1", "canny", picture, 1.0, 0.3, 0.6)])
    pipe = card_pipeline(tiny_weights, "sdxl", ["canny"])
    card = run_card(pipe, image=card_canny(picture), control_guidance_start=0.3, control_guidance_end=0.6)
    whole = run_card(pipe, image=card_canny(picture))
    assert difference(card[0], whole[0]) > 1  # start/end change the recipe's image
    for mine, theirs in zip(ours, card, strict=True):
        assert difference(mine, theirs) <= 1


@pytest.mark.parametrize("kind", ["canny", "depth"])
def test_flash_sd_with_a_control_equals_diffusers_controlnet_pipeline(engines, controlnets, tiny_weights, kind):
    picture = photo(seed=3)
    ours = flashsd_images(engines, controlnets, "sd15", [Control("controlnet_1", kind, picture)])
    control_map = card_canny(picture) if kind == "canny" else card_depth(tiny_weights, picture)
    card = run_card(card_pipeline(tiny_weights, "sd15", [kind]), image=control_map, controlnet_conditioning_scale=0.75)
    for mine, theirs in zip(ours, card, strict=True):
        assert difference(mine, theirs) <= 1


def test_image_to_image_with_a_control_equals_diffusers_controlnet_img2img(engines, controlnets, tiny_weights):
    start, structure = photo(seed=4), photo(seed=5)
    controls = [Control("controlnet_1", "canny", structure)]
    ours = flashsd_images(
        engines, controlnets, "sdxl", controls, mode="image-to-image", image=start, prompt_strength=0.75
    )
    card = run_card(
        card_pipeline(tiny_weights, "sdxl", ["canny"], StableDiffusionXLControlNetImg2ImgPipeline),
        image=[start] * len(SEEDS), control_image=card_canny(structure), strength=0.75, width=WIDTH, height=HEIGHT,
        controlnet_conditioning_scale=0.75,
    )  # fmt: skip
    for mine, theirs in zip(ours, card, strict=True):
        assert difference(mine, theirs) <= 1


def test_conditioning_scale_zero_gives_the_image_without_control(engines, controlnets):
    (ours, _) = flashsd_images(engines, controlnets, "sdxl", [Control("controlnet_1", "canny", photo(), 0.0)])
    request = build_request(
        MODELS["sdxl"], prompt=PROMPT, seed=SEEDS[0], aspect_ratio="custom", width=WIDTH, height=HEIGHT
    )
    assert difference(ours, engines("sdxl").generate(request)[0].image) <= 1


def test_control_pipelines_share_the_engines_weights(engines, controlnets):
    engine, nets = engines("sdxl"), controlnets("sdxl")
    pipe = nets.pipeline(engine.pipe, "text-to-image", ["canny", "depth"])
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        assert getattr(pipe, name) is getattr(engine.pipe, name), name
    assert list(pipe.controlnet.nets) == [nets.nets["canny"], nets.nets["depth"]]
    assert nets.pipeline(engine.pipe, "text-to-image", ["canny", "depth"]) is pipe  # built once


# -- the user's controls --------------------------------------------------------------------------------------


def validate(*slots, model="sdxl", held=("canny", "depth")):
    return controls_from_inputs(MODELS[model], held, [ControlInputs(*slot) for slot in slots])


def test_controls_keep_their_slot_names_order_and_values():
    picture = photo()
    controls = validate(("none",), ("depth", picture, 1.5, 0.1, 0.9), ("canny", picture))
    assert [(c.input, c.kind, c.conditioning_scale, c.start, c.end) for c in controls] == [
        ("controlnet_2", "depth", 1.5, 0.1, 0.9),
        ("controlnet_3", "canny", 0.75, 0.0, 1.0),
    ]
    assert validate(("none",), ("none",)) == ()


@pytest.mark.parametrize(
    "slots, model, held, said",
    [
        ([("pose", "IMAGE")], "sdxl", ("canny",), "controlnet_1='pose' is not one of: none, canny, depth"),
        ([("none", "IMAGE")], "sdxl", ("canny",), "controlnet_1_image was given but controlnet_1 is 'none'"),
        ([("none",), ("canny",)], "sdxl", ("canny",), "controlnet_2='canny' needs controlnet_2_image"),
        ([("depth", "IMAGE")], "sdxl", ("canny",), "this model holds the canny ControlNet (FLASHSD_CONTROLNETS=canny)"),
        ([("canny", "IMAGE")], "sdxl", (), "holds no ControlNet (FLASHSD_CONTROLNETS was empty"),
        ([("canny", "IMAGE")], "pixart", (), "Flash PixArt takes no ControlNet (diffusers has no ControlNet pipeline"),
        ([("canny", "IMAGE", 4.5)], "sdxl", ("canny",), "controlnet_1_conditioning_scale=4.5 is out of range"),
        ([("canny", "IMAGE", 1.0, 0.6, 0.4)], "sdxl", ("canny",), "controlnet_1_start=0.6 must be below controlnet_1_end"),
        ([("canny", "IMAGE", 1.0, 0.0, 1.5)], "sdxl", ("canny",), "controlnet_1_end=1.5 is out of range: allowed 0 to 1"),
    ],
)  # fmt: skip
def test_a_control_that_cannot_run_is_refused_naming_the_input(slots, model, held, said):
    picture = photo()
    slots = [tuple(picture if part == "IMAGE" else part for part in slot) for slot in slots]
    with pytest.raises(InputError) as error:
        validate(*slots, model=model, held=held)
    assert said in str(error.value)


def test_an_undecodable_control_image_is_refused_naming_the_input(tmp_path):
    broken = tmp_path / "photo.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError) as error:
        validate(("canny", broken))
    assert str(error.value).startswith("controlnet_1_image ")


# -- which repos a build holds ----------------------------------------------------------------------------------


def test_a_build_holds_the_controlnets_it_names_and_the_depth_estimator_with_depth():
    sdxl = MODELS["sdxl"]
    assert control.with_controlnets(sdxl, ()).repos == sdxl.repos
    canny = control.with_controlnets(sdxl, ("canny",)).repos
    assert [r.id for r in canny if r not in sdxl.repos] == ["diffusers/controlnet-canny-sdxl-1.0"]
    both = control.with_controlnets(MODELS["sd15"], ("depth", "canny")).repos
    assert [r.id for r in both if r not in MODELS["sd15"].repos] == [
        "lllyasviel/control_v11f1p_sd15_depth", "lllyasviel/control_v11p_sd15_canny",
        "depth-anything/Depth-Anything-V2-Small-hf",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="Flash PixArt takes no ControlNet"):
        control.with_controlnets(MODELS["pixart"], ("canny",))


def test_every_controlnet_row_is_pinned_to_a_commit_and_lists_safetensors_only():
    repos = [r for family in control.FAMILIES.values() for r in family.controlnets.values()]
    for repo in [*repos, control.DEPTH_ESTIMATOR]:
        assert len(repo.revision) == 40 and int(repo.revision, 16) >= 0, repo.id
        weights = [f for f in repo.files if not f.endswith(".json")]
        assert weights and all(f.endswith(".safetensors") for f in weights), repo.id
