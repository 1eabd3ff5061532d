"""Structure control against the recipes it promises: jasperai/flash-sdxl's card ("Combining Flash Diffusion with
Existing ControlNets"), diffusers' multi-ControlNet call and control_guidance_start/end, the image modes' ControlNet
pipelines, on tiny random-weight checkpoints in the real layouts, through the engine's one generation path. The
references are written with plain diffusers, transformers and OpenCV (testkit/control_recipes.py)."""

import numpy as np
import pytest
from PIL import Image

from flashsd import control
from flashsd.control import ControlInputs, controls_from_inputs
from flashsd.control_maps import canny_map
from flashsd.errors import InputError
from flashsd.models import MODELS
from flashsd.request import build_request, matching_size
from testkit.control_recipes import (
    SEEDS,
    card_canny,
    card_depth,
    control_card_pipeline,
    control_request,
    photo,
)
from testkit.pixels import max_difference as difference
from testkit.recipes import HEIGHT, PROMPT, WIDTH, run_card


def flashsd_images(control_engines, key, slots, **inputs):
    """What flashsd makes of a request with the controls `slots`: the engine's one generation path."""
    return [g.image for g in control_engines(key).generate(control_request(key, slots, **inputs))]


def card(key, root, kinds, pipeline=None, **call):
    """The card's recipe's images for SEEDS (testkit/control_recipes.py)."""
    return run_card(control_card_pipeline(key, root, kinds, pipeline), key, SEEDS, **call)


# -- maps ------------------------------------------------------------------------------------------------------


def test_the_canny_map_is_the_cards():
    picture = photo()
    ours, theirs = canny_map(picture), card_canny(picture)
    assert ours.mode == "RGB" and ours.size == picture.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert 0 < np.asarray(ours).mean() < 255  # edges found, not everything


def test_the_depth_map_is_the_depth_cards_normalisation_of_depth_anything(control_engines, tiny_weights):
    picture = photo()
    (ours,) = control_engines("sdxl").control_maps(control_request("sdxl", [("depth", picture)]))
    values = np.asarray(ours)
    assert ours.size == picture.size and values.min() == 0 and values.max() == 255  # min-max normalised
    assert difference(ours, card_depth(tiny_weights, picture)) <= 1


def test_maps_are_made_from_the_photo_fitted_to_the_output_size(control_engines):
    wide = photo(256, 96)
    request = control_request("sdxl", [("canny", wide)])
    (ours,) = control_engines("sdxl").control_maps(request)
    centre = wide.crop((64, 0, 192, 96))  # scaled to cover 128x96 (it already does), centre-cropped
    assert request.controls[0].image.size == ours.size == (WIDTH, HEIGHT)  # the request keeps only the fitted photo
    assert np.array_equal(np.asarray(ours), np.asarray(card_canny(centre)))


# -- the card's recipe, multi-ControlNet, start/end, the image modes ------------------------------------------------


def test_text_to_image_with_a_canny_control_equals_the_cards_recipe(control_engines, tiny_weights):
    picture = photo()
    ours = flashsd_images(control_engines, "sdxl", [("canny", picture, 0.5)])
    theirs = card("sdxl", tiny_weights, ["canny"], image=card_canny(picture), controlnet_conditioning_scale=0.5)
    without = flashsd_images(control_engines, "sdxl", [])
    assert difference(theirs[0], without[0]) > 10  # the control matters to the recipe
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.size == (WIDTH, HEIGHT)
        assert difference(mine, reference) <= 1


def test_several_controls_equal_diffusers_multi_controlnet_call(control_engines, tiny_weights):
    first, second = photo(seed=1), photo(seed=2).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    ours = flashsd_images(control_engines, "sdxl", [("canny", first, 0.8), ("none",), ("depth", second, 1.3)])
    theirs = card(
        "sdxl", tiny_weights, ["canny", "depth"], image=[card_canny(first), card_depth(tiny_weights, second)],
        controlnet_conditioning_scale=[0.8, 1.3],
    )  # fmt: skip
    for mine, reference in zip(ours, theirs, strict=True):
        assert difference(mine, reference) <= 1


def test_start_and_end_equal_diffusers_control_guidance_start_and_end(control_engines, tiny_weights):
    picture = photo()
    ours = flashsd_images(control_engines, "sdxl", [("canny", picture, 1.0, 0.3, 0.6)])
    pipe = control_card_pipeline("sdxl", tiny_weights, ["canny"])
    theirs = run_card(pipe, "sdxl", SEEDS, image=card_canny(picture), controlnet_conditioning_scale=1.0,
                      control_guidance_start=0.3, control_guidance_end=0.6)  # fmt: skip
    whole = run_card(pipe, "sdxl", SEEDS, image=card_canny(picture), controlnet_conditioning_scale=1.0)
    assert difference(theirs[0], whole[0]) > 1  # start/end change the recipe's image
    for mine, reference in zip(ours, theirs, strict=True):
        assert difference(mine, reference) <= 1


@pytest.mark.parametrize("kind", ["canny", "depth"])
def test_flash_sd_with_a_control_equals_diffusers_controlnet_pipeline(control_engines, tiny_weights, kind):
    picture = photo(seed=3)
    ours = flashsd_images(control_engines, "sd15", [(kind, picture)])
    control_map = card_canny(picture) if kind == "canny" else card_depth(tiny_weights, picture)
    theirs = card("sd15", tiny_weights, [kind], image=control_map, controlnet_conditioning_scale=0.75)
    for mine, reference in zip(ours, theirs, strict=True):
        assert difference(mine, reference) <= 1


def test_image_to_image_with_a_control_equals_diffusers_controlnet_img2img(control_engines, tiny_weights):
    start, structure = photo(seed=4), photo(seed=5)
    ours = flashsd_images(control_engines, "sdxl", [("canny", structure)], image=start, prompt_strength=0.75)
    theirs = card(
        "sdxl", tiny_weights, ["canny"], "StableDiffusionXLControlNetImg2ImgPipeline", image=[start] * len(SEEDS),
        control_image=card_canny(structure), strength=0.75, controlnet_conditioning_scale=0.75,
    )  # fmt: skip
    for mine, reference in zip(ours, theirs, strict=True):
        assert difference(mine, reference) <= 1


def test_inpainting_with_a_control_equals_diffusers_controlnet_inpainting(control_engines, tiny_weights):
    start, structure = photo(seed=6), photo(seed=7)
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    mask.paste(255, (32, 16, 96, 80))
    ours = flashsd_images(control_engines, "sd15", [("canny", structure)], image=start, mask=mask, prompt_strength=1)
    theirs = card(
        "sd15", tiny_weights, ["canny"], "StableDiffusionControlNetInpaintPipeline", image=[start] * len(SEEDS),
        mask_image=[mask] * len(SEEDS), control_image=card_canny(structure), strength=1.0,
        controlnet_conditioning_scale=0.75,
    )  # fmt: skip
    without = flashsd_images(control_engines, "sd15", [], image=start, mask=mask, prompt_strength=1)
    assert difference(ours[0], without[0]) > 10  # the control acts in the repainted area
    for mine, reference in zip(ours, theirs, strict=True):
        # flashsd keeps the input's own pixels outside the mask (README: inpainting); so is the reference read
        assert difference(mine, Image.composite(reference, start, mask)) <= 1


def test_conditioning_scale_zero_gives_the_image_without_control(control_engines):
    (ours, _) = flashsd_images(control_engines, "sdxl", [("canny", photo(), 0.0)])
    (without, _) = flashsd_images(control_engines, "sdxl", [])
    assert difference(ours, without) <= 1


def test_control_pipelines_share_the_engines_weights(control_engines):
    engine = control_engines("sdxl")
    nets = engine.controlnets
    pipe = engine.pipeline_of(control_request("sdxl", [("canny", photo()), ("depth", photo())]))
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


@pytest.mark.parametrize(
    "side, said",
    [(10_001, "controlnet_2_image is 10001x10001 (100 megapixels): the limit is 100 megapixels"),
     (13_400, "controlnet_2_image is too large")],  # past Pillow's own decompression-bomb bound: refused on opening
)  # fmt: skip
def test_a_huge_control_image_is_refused_before_it_is_decoded(tmp_path, side, said):
    huge = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(huge)  # one bit per pixel: a few MB to write, gigabytes to decode as RGB
    with pytest.raises(InputError) as error:
        control_request("sdxl", [("none",), ("canny", huge)])
    assert said in str(error.value)


def test_the_first_controls_photo_sets_the_size_under_match_input_image_when_there_is_no_image():
    wide, tall = photo(192, 96), photo(64, 128)
    match = dict(aspect_ratio="match_input_image", width=None, height=None)
    request = control_request("sdxl", [("none",), ("canny", wide), ("depth", tall)], **match)
    assert (request.width, request.height) == matching_size(192, 96, 1024)
    assert 1.98 < request.width / request.height < 2.02
    assert [c.image.size for c in request.controls] == [(request.width, request.height)] * 2  # both fitted to it
    # an image decides over the controls; a named ratio decides over both
    assert control_request("sdxl", [("canny", wide)], image=tall, **match).width < 1024
    named = control_request("sdxl", [("canny", wide)], aspect_ratio="9:16", width=None, height=None)
    assert (named.width, named.height) == (768, 1360)
    plain = build_request(MODELS["sdxl"], prompt=PROMPT)
    assert (plain.width, plain.height) == (1024, 1024)  # no image, no control: square


def test_the_command_lines_flat_inputs_become_the_three_slots():
    inputs = {"prompt": "x", "controlnet_2": "depth", "controlnet_2_image": "p.png", "controlnet_2_end": 0.5}
    slots = control.control_inputs(inputs)
    assert inputs == {"prompt": "x"}  # taken out, so build_request sees only its own inputs
    assert slots == [ControlInputs(), ControlInputs("depth", "p.png", end=0.5), ControlInputs()]


def test_flash_sd3_gets_a_clear_message_for_a_control():
    with pytest.raises(InputError, match="Flash SD3 takes no ControlNet .flashsd holds no ControlNet for it yet"):
        build_request(MODELS["sd3"], prompt=PROMPT, controls=[ControlInputs("canny", photo())], controlnets=())


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
    assert control.with_controlnets(control.with_controlnets(sdxl, ("canny",)), ("canny",)).extra_repos == (
        control.with_controlnets(sdxl, ("canny",)).extra_repos
    )  # as setup and Engine.load both apply it
    with pytest.raises(ValueError, match="Flash PixArt takes no ControlNet"):
        control.with_controlnets(MODELS["pixart"], ("canny",))


def test_every_controlnet_row_is_pinned_to_a_commit_and_lists_safetensors_only():
    repos = [r for family in control.FAMILIES.values() for r in family.controlnets.values()]
    for repo in [*repos, control.DEPTH_ESTIMATOR]:
        assert len(repo.revision) == 40 and int(repo.revision, 16) >= 0, repo.id
        weights = [f for f in repo.files if not f.endswith(".json")]
        assert weights and all(f.endswith(".safetensors") for f in weights), repo.id
