"""Images as inputs: decoding, orientation, colour modes, sizes, masks, and every bad case's message."""

import math

import numpy as np
import pytest
from PIL import Image

from flashsd import input_images
from flashsd.errors import InputError
from flashsd.models import MODELS
from flashsd.request import (
    ASPECT_RATIOS,
    MAX_STEPS,
    MIN_SIDE,
    aspect_ratio_size,
    build_request,
    matching_size,
    steps_run,
)

SD15 = MODELS["sd15"]


def photo(width=120, height=80, seed=0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def save(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


def box_mask(width=120, height=80, box=(30, 20, 90, 60)) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def req(**inputs):
    return build_request(SD15, **{"prompt": "a cat", "seed": 1, **inputs})


# --- modes and the inputs that select them --------------------------------------------------------------


def test_image_alone_is_image_to_image_and_with_a_mask_inpainting(tmp_path):
    image = save(photo(), tmp_path / "in.png")
    mask = save(box_mask(), tmp_path / "mask.png")
    assert req().mode == "text-to-image"
    assert req(image=image).mode == "image-to-image"
    request = req(image=image, mask=mask)
    assert request.mode == "inpainting"
    assert request.image.mode == "RGB" and request.mask.mode == "L"
    assert request.image.size == request.mask.size == (request.width, request.height)
    assert set(np.unique(np.asarray(request.mask))) == {0, 255}


def test_mask_without_image_is_an_error(tmp_path):
    with pytest.raises(InputError, match="mask was given without image"):
        req(mask=save(box_mask(), tmp_path / "mask.png"))


def test_pixart_refuses_an_image_and_names_the_models_that_take_one(tmp_path):
    image = save(photo(), tmp_path / "in.png")
    for extra in ({}, {"mask": save(box_mask(), tmp_path / "mask.png")}):
        with pytest.raises(InputError) as e:
            build_request(MODELS["pixart"], prompt="a cat", image=image, **extra)
        message = str(e.value)
        assert "Flash PixArt supports text-to-image only" in message
        assert "Flash SDXL (sdxl)" in message and "Flash SD3 (sd3)" in message and "Flash SD (sd15)" in message


def test_the_model_table_names_real_diffusers_pipelines():
    import diffusers

    for model in MODELS.values():
        for name in (model.img2img_pipeline, model.inpaint_pipeline):
            assert name is None or hasattr(diffusers, name), name
    assert MODELS["pixart"].img2img_pipeline is None and MODELS["pixart"].inpaint_pipeline is None
    assert not any("PixArt" in name and ("Img2Img" in name or "Inpaint" in name) for name in dir(diffusers))


# --- strength and steps ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, strength, expected",
    [(4, 0.8, 3), (4, 1.0, 4), (4, 0.5, 2), (4, 0.3, 1), (4, 0.2, 1), (4, 0.0, 1), (8, 0.8, 6), (1, 0.1, 1),
     (5, 0.6, 3), (3, 1 / 3, 1), (7, 2 / 7, 2)],
)  # fmt: skip
def test_steps_run_is_floor_of_steps_times_strength_and_at_least_one(steps, strength, expected):
    assert steps_run(steps, strength) == expected


def test_steps_run_applies_only_with_an_image(tmp_path):
    assert req(prompt_strength=0.3).steps_run == 4  # text-to-image: every step (documented)
    assert req(image=save(photo(), tmp_path / "in.png"), prompt_strength=0.3).steps_run == 1


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "high", True])
def test_prompt_strength_out_of_range_is_an_error(value):
    with pytest.raises(InputError, match="prompt_strength"):
        req(prompt_strength=value)


def test_disable_safety_checker_must_be_a_boolean():
    assert req().check_safety is True and req(disable_safety_checker=True).check_safety is False
    with pytest.raises(InputError, match="disable_safety_checker must be true or false"):
        req(disable_safety_checker="yes")


@pytest.mark.parametrize(
    "pipeline",
    [
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    ],
)
def test_the_strength_the_engine_passes_runs_exactly_steps_run_steps_in_diffusers(pipeline):
    """Engine passes strength = steps_run / steps; diffusers' own get_timesteps (SD floors, SD3 does not)
    must then keep exactly that many steps, for every step count flashsd allows."""
    import types

    import diffusers

    get_timesteps = getattr(diffusers, pipeline).get_timesteps
    for steps in range(1, MAX_STEPS + 1):
        scheduler = types.SimpleNamespace(timesteps=list(range(steps, 0, -1)), order=1, set_begin_index=lambda i: None)
        for wanted in range(1, steps + 1):
            _, kept = get_timesteps(types.SimpleNamespace(scheduler=scheduler), steps, wanted / steps, "cpu")
            assert kept == wanted, (steps, wanted)


# --- sizes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
def test_an_input_of_a_named_ratio_gets_that_ratios_size(ratio):
    a, b = map(int, ratio.split(":"))
    for native in (512, 1024):
        assert matching_size(a * 97, b * 97, native) == aspect_ratio_size(ratio, native)


@pytest.mark.parametrize("size", [(4032, 3024), (3024, 4032), (1080, 1920), (1000, 1001), (777, 333), (64, 64)])
def test_match_input_keeps_the_ratio_at_the_native_area_in_multiples_of_16(size):
    for native in (512, 1024):
        width, height = matching_size(*size, native)
        assert width % 16 == 0 and height % 16 == 0
        assert abs(width / height / (size[0] / size[1]) - 1) <= 0.01
        assert abs(math.log(width * height / native**2)) < 0.1


def test_an_extreme_ratio_is_limited_by_the_side_limits():
    assert matching_size(10000, 10, 1024) == (2048, MIN_SIDE)
    assert matching_size(10, 10000, 512) == (MIN_SIDE, 2048)


def test_output_follows_the_input_ratio_unless_aspect_ratio_says_otherwise(tmp_path):
    image = save(photo(300, 200), tmp_path / "in.png")
    assert (req(image=image).width, req(image=image).height) == matching_size(300, 200, 512) == (624, 416)
    assert (req().width, req().height) == (512, 512)  # match_input_image without an image: 1:1
    square = req(image=image, aspect_ratio="1:1")
    assert (square.width, square.height) == (512, 512)
    custom = req(image=image, aspect_ratio="custom", width=64, height=128)
    assert custom.image.size == (64, 128)
    with pytest.raises(InputError, match="only used with aspect_ratio='custom'"):
        req(image=image, width=64)


def test_another_ratio_centre_crops_the_image_and_the_mask_alike(tmp_path):
    # Left third red, middle green, right third blue: a square crop keeps only the green middle.
    stripes = Image.new("RGB", (300, 100))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        stripes.paste(colour, (100 * i, 0, 100 * (i + 1), 100))
    mask = Image.new("L", (300, 100), 0)
    mask.paste(255, (100, 0, 200, 100))  # exactly the green third
    request = req(image=save(stripes, tmp_path / "s.png"), mask=save(mask, tmp_path / "m.png"), aspect_ratio="1:1")
    pixels = np.asarray(request.image).astype(int)[:, 20:-20]  # Lanczos reaches ~3 source px past the crop
    assert np.abs(pixels - [0, 255, 0]).max() <= 2  # no stretching: no red or blue left
    assert np.asarray(request.mask).min() == 255


def test_mask_pixels_from_128_up_are_repainted_and_below_128_kept(tmp_path):
    """The mask is binarised at half grey as diffusers does (0.5 of 255): 127 keeps, 128 repaints."""
    levels = [0, 1, 127, 128, 129, 254, 255, 128]
    mask = Image.fromarray(np.repeat(np.array(levels, dtype=np.uint8), 8)[None, :].repeat(64, axis=0), mode="L")
    request = req(
        image=save(photo(64, 64), tmp_path / "in.png"),
        mask=save(mask, tmp_path / "m.png"),
        aspect_ratio="custom",
        width=64,
        height=64,
    )  # the output's size: no resampling, every pixel keeps its level
    binary = np.asarray(request.mask)
    assert binary.shape == (64, 64)
    for band, level in enumerate(levels):
        assert set(np.unique(binary[:, 8 * band : 8 * band + 8])) == {255 if level >= 128 else 0}, level


# --- decoding and conversion ----------------------------------------------------------------------------


def test_exif_orientation_is_honoured(tmp_path):
    upright = Image.new("RGB", (120, 80), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 40, 80))  # red on the left of the upright picture
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera stores it: 80x120
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(stored, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    loaded = input_images.load_image(path)
    assert loaded.size == (120, 80)
    assert np.asarray(loaded)[40, 10, 0] > 200 and np.asarray(loaded)[40, 110, 2] > 200
    mask = input_images.load_mask(save(stored.convert("L"), tmp_path / "m.jpg", exif=exif.tobytes()))
    assert mask.size == (120, 80)


def test_transparency_is_flattened_onto_white_for_the_image_and_black_for_the_mask(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (10, 20, 30, 0))
    rgba.paste((200, 0, 0, 255), (0, 0, 32, 64))
    image = input_images.load_image(save(rgba, tmp_path / "a.png"))
    assert image.mode == "RGB"
    assert tuple(np.asarray(image)[10, 50]) == (255, 255, 255) and tuple(np.asarray(image)[10, 10]) == (200, 0, 0)
    strokes = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    strokes.paste((255, 255, 255, 255), (0, 0, 32, 64))
    mask = input_images.load_mask(save(strokes, tmp_path / "strokes.png"))
    assert mask.mode == "L" and np.asarray(mask)[10, 10] == 255 and np.asarray(mask)[10, 50] == 0


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA", "I;16", "RGBA"])
def test_every_colour_mode_becomes_rgb_and_a_one_channel_mask(tmp_path, mode):
    source = photo(64, 48)
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(source.convert("L")).astype(np.uint16) * 257)
        assert converted.mode == "I;16"
    else:
        converted = source.convert(mode)
    path = save(converted, tmp_path / ("x.tif" if mode == "CMYK" else "x.png"))
    image, mask = input_images.load_image(path), input_images.load_mask(path)
    assert (image.mode, image.size, mask.mode, mask.size) == ("RGB", (64, 48), "L", (64, 48))
    if mode == "I;16":  # the full 16-bit range, not clipped to white
        assert np.abs(np.asarray(mask).astype(int) - np.asarray(source.convert("L"))).max() <= 1


def test_a_palette_image_with_a_transparent_colour_is_flattened(tmp_path):
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 16, 32))
    path = save(palette, tmp_path / "p.png", transparency=0)
    image = np.asarray(input_images.load_image(path))
    assert tuple(image[5, 5]) == (255, 0, 0) and tuple(image[5, 25]) == (255, 255, 255)


def test_the_first_frame_of_an_animation_is_used(tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.asarray(input_images.load_image(path))[0, 0, 0] > 200


# --- bad inputs -----------------------------------------------------------------------------------------


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"image could not be read \(No such file"):
        req(image=tmp_path / "nope.png")


@pytest.mark.parametrize("content, message", [
    (b"", "image is not an image: it is an empty file"),
    (b"hello, this is text and not a picture\n" * 4, "image is not an image: it is a 152-byte file"),
    (b"%PDF-1.4\n" + b"0" * 200, "not an image Pillow can read"),
])  # fmt: skip
def test_a_file_that_is_not_an_image_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "file.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        req(image=path)
    assert "PNG, JPEG, WebP" in str(e.value)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_a_truncated_image_is_a_clear_error(tmp_path, suffix):
    full = save(photo(200, 200), tmp_path / f"full.{suffix}")
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    with pytest.raises(InputError, match="image could not be decoded .* damaged or truncated"):
        req(image=cut)


def test_an_unreadable_mask_names_the_mask(tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="^mask is not an image"):
        req(image=save(photo(), tmp_path / "in.png"), mask=path)


def test_a_mask_of_another_size_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="mask is 60x40 but image is 120x80") as e:
        req(image=save(photo(), tmp_path / "in.png"), mask=save(box_mask(60, 40, (0, 0, 10, 10)), tmp_path / "m.png"))
    assert "white where to repaint, black where to keep" in str(e.value)


def test_an_all_black_mask_is_an_error_not_a_silent_no_op(tmp_path):
    image = save(photo(), tmp_path / "in.png")
    with pytest.raises(InputError, match="mask has no white area, so inpainting would return image unchanged"):
        req(image=image, mask=save(Image.new("L", (120, 80), 0), tmp_path / "black.png"))
    speck = box_mask(box=(0, 0, 1, 1))  # one white pixel in a corner: cropped away at 1:1
    with pytest.raises(InputError, match="no white area left once it is resized"):
        req(image=image, mask=save(speck, tmp_path / "speck.png"), aspect_ratio="1:1")


def test_too_many_pixels_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(input_images, "MAX_INPUT_PIXELS", 100 * 50)
    with pytest.raises(InputError, match=r"image is 120x80 .*the limit is"):
        req(image=save(photo(120, 80), tmp_path / "big.png"))


def test_something_that_is_not_a_path_is_a_clear_error():
    with pytest.raises(InputError, match="image must be an image file"):
        req(image=12)


def test_a_large_jpeg_is_decoded_reduced_but_never_below_the_largest_output(tmp_path):
    gradient = Image.linear_gradient("L").resize((4200, 4400)).convert("RGB")
    loaded = input_images.load_image(save(gradient, tmp_path / "big.jpg", quality=80))
    assert loaded.size == (2100, 2200)  # decoded at 1/2: both sides still above the largest output side
    assert min(loaded.size) >= input_images.DRAFT_MIN_SIDE
