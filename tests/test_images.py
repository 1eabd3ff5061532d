"""Output files: formats, quality, metadata in the places image tools read, unique names."""

import numpy as np
import pytest
from PIL import Image

from flashsd.engine import GeneratedImage
from flashsd.images import write_outputs
from flashsd.models import MODELS
from flashsd.request import build_request

SDXL = MODELS["sdxl"]


def noisy_image(seed=0, size=(96, 64)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def read_settings(path):
    """Read the generation settings back the way Automatic1111-aware tools do, with Pillow alone."""
    with Image.open(path) as image:
        if image.format == "PNG":
            return image.text["parameters"]
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment[:8] == b"UNICODE\x00"
    return comment[8:].decode("utf-16-be")


@pytest.mark.parametrize("fmt, pil_format", [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_each_format_is_written_with_its_settings_in_the_metadata(tmp_path, fmt, pil_format):
    request = build_request(
        SDXL,
        prompt="a red fox, 雪",
        seed=41,
        num_outputs=2,
        output_format=fmt,
        guidance_scale=2.5,
        negative_prompt="blurry",
    )
    generated = [GeneratedImage(noisy_image(i), seed) for i, seed in enumerate(request.seeds)]
    paths = write_outputs(generated, request, SDXL, tmp_path)
    assert len(paths) == 2
    for path, seed in zip(paths, (41, 42)):
        assert path.suffix == f".{fmt}"
        with Image.open(path) as image:
            assert image.format == pil_format and image.size == (96, 64)
        settings = read_settings(path)
        assert settings.splitlines()[0] == "a red fox, 雪"
        assert "Negative prompt: blurry" in settings
        for field in (f"Seed: {seed}", "Steps: 4", "CFG scale: 2.5", "Size: 96x64", "Model: Flash SDXL"):
            assert field in settings


def test_png_is_lossless_and_ignores_quality(tmp_path):
    request = build_request(SDXL, prompt="x", seed=1, output_format="png", output_quality=1)
    original = noisy_image()
    (path,) = write_outputs([GeneratedImage(original, 1)], request, SDXL, tmp_path)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(original))


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_quality_changes_lossy_files(tmp_path, fmt):
    sizes = []
    for quality in (10, 95):
        request = build_request(SDXL, prompt="x", seed=1, output_format=fmt, output_quality=quality)
        (tmp_path / str(quality)).mkdir()
        (path,) = write_outputs([GeneratedImage(noisy_image(), 1)], request, SDXL, tmp_path / str(quality))
        sizes.append(path.stat().st_size)
    assert sizes[0] < sizes[1]


def test_without_guidance_no_negative_prompt_is_recorded(tmp_path):
    request = build_request(SDXL, prompt="x", negative_prompt="blurry", guidance_scale=1, seed=1, output_format="png")
    (path,) = write_outputs([GeneratedImage(noisy_image(), 1)], request, SDXL, tmp_path)
    assert "Negative prompt" not in read_settings(path)


def test_two_predictions_with_the_same_seed_never_share_a_file_name(tmp_path):
    request = build_request(SDXL, prompt="x", seed=7)
    first = write_outputs([GeneratedImage(noisy_image(), 7)], request, SDXL, tmp_path)
    second = write_outputs([GeneratedImage(noisy_image(), 7)], request, SDXL, tmp_path)
    assert first[0] != second[0] and first[0].exists() and second[0].exists()
