"""The safety checker on its tiny random checkpoint: loaded from the real layout, diffusers' own rule, and what
the engine does with flagged images (left out, counted in the logs; all flagged fails; disable skips it)."""
import contextlib
import logging

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from PIL import Image
from safetensors import safe_open

from flashsd.engine import Engine, Runtime
from flashsd.images import write_outputs
from flashsd.models import MODELS, SAFETY_CHECKER
from flashsd.request import build_request
from flashsd.safety import ImagesFlagged, SafetyChecker

CPU32 = Runtime(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def engine(tiny_weights):
    return Engine.load(MODELS["sd15"], tiny_weights, CPU32)


def request(**inputs):
    return build_request(
        MODELS["sd15"], **{"prompt": "a cat", "aspect_ratio": "custom", "width": 64, "height": 64, "seed": 10, **inputs}
    )


@contextlib.contextmanager
def thresholds(checker: SafetyChecker, concept: float | torch.Tensor):
    """Forces flags through the checker's own thresholds (the real code path, other numbers)."""
    weights = checker.model.concept_embeds_weights
    saved = weights.detach().clone()
    with torch.no_grad():
        weights.copy_(torch.as_tensor(concept, dtype=weights.dtype).expand_as(weights))
    try:
        yield
    finally:
        with torch.no_grad():
            weights.copy_(saved)


def max_concept_similarity(checker: SafetyChecker, images) -> list[float]:
    with torch.no_grad():
        pixels = checker.processor(images=images, return_tensors="pt").pixel_values
        embeds = checker.model.visual_projection(checker.model.vision_model(pixels)[1])
        return cosine_distance(embeds, checker.model.concept_embeds).max(dim=1).values.tolist()


def test_every_model_fetches_the_checker_as_safetensors_into_the_sd15_folder():
    assert SAFETY_CHECKER.id == MODELS["sd15"].base.id and SAFETY_CHECKER.revision == MODELS["sd15"].base.revision
    for model in MODELS.values():
        assert model.safety_checker == SAFETY_CHECKER
        (folder,) = [r for r in model.repos if r.id == SAFETY_CHECKER.id]  # one row per folder
        assert set(SAFETY_CHECKER.files) <= set(folder.files)
    assert not any(name.endswith((".bin", ".ckpt", ".pt")) for name in SAFETY_CHECKER.files)


def test_the_tiny_checker_has_the_real_layout_and_loads_once_with_the_engine(engine, tiny_weights):
    folder = tiny_weights / SAFETY_CHECKER.id
    with safe_open(folder / "safety_checker" / "model.fp16.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert isinstance(engine.safety_checker.model, StableDiffusionSafetyChecker)
    assert engine.safety_checker.model.dtype == torch.float32 == engine.runtime.dtype
    assert engine.pipe.safety_checker is None  # the pipelines never black anything out themselves
    assert engine.pipeline_for("inpainting").safety_checker is None


def test_flags_follow_diffusers_rule(engine):
    checker = engine.safety_checker
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (48, 64, 3), dtype=np.uint8)) for i in range(6)]
    similarity = sorted(max_concept_similarity(checker, images))
    pixels = checker.processor(images=images, return_tensors="pt").pixel_values
    for concept in (-1.0, similarity[2] + 1e-3, 2.0):
        with thresholds(checker, concept):
            _, reference = checker.model(pixels, np.zeros((6, 1, 1, 3)))
            assert checker.flags(images) == list(reference)
    assert checker.flags(images) == [False] * 6  # the tiny checker's own thresholds never flag


def test_flagged_images_are_left_out_counted_and_the_rest_keep_their_seeds(engine, caplog, tmp_path):
    checker = engine.safety_checker
    unchecked = engine.generate(request(num_outputs=3, disable_safety_checker=True))
    similarity = max_concept_similarity(checker, [g.image for g in unchecked])
    worst = int(np.argmax(similarity))
    with thresholds(checker, (sorted(similarity)[-1] + sorted(similarity)[-2]) / 2), caplog.at_level(logging.INFO):
        kept = engine.generate(request(num_outputs=3))
    assert [g.seed for g in kept] == [10 + i for i in range(3) if i != worst]
    for item in kept:  # the very images, not black placeholders
        assert np.array_equal(np.asarray(item.image), np.asarray(unchecked[item.seed - 10].image))
        assert np.asarray(item.image).std() > 1
    assert f"Safety checker: 1 of 3 image(s) flagged as potentially NSFW and left out (seeds {10 + worst})" in caplog.text
    req = request(num_outputs=3, output_format="png")
    names = sorted(p.name.split("-")[2] for p in write_outputs(kept, req, MODELS["sd15"], tmp_path))
    assert names == sorted(str(g.seed) for g in kept)


@pytest.mark.parametrize("count, message", [(1, "The generated image was flagged"), (2, "All 2 generated images were flagged")])
def test_when_every_image_is_flagged_the_prediction_fails_saying_so(engine, count, message):
    with thresholds(engine.safety_checker, -1.0), pytest.raises(ImagesFlagged) as e:
        engine.generate(request(num_outputs=count))
    assert str(e.value).startswith(message)
    assert "potentially NSFW" in str(e.value) and "disable_safety_checker" in str(e.value)


def test_disable_safety_checker_returns_every_image_unchecked(engine, caplog, monkeypatch):
    with thresholds(engine.safety_checker, -1.0), caplog.at_level(logging.INFO):
        monkeypatch.setattr(engine.safety_checker, "flags", lambda images: pytest.fail("checker ran"))
        generated = engine.generate(request(num_outputs=2, disable_safety_checker=True))
    assert [g.seed for g in generated] == [10, 11]
    assert "Safety checker disabled for this prediction" in caplog.text


def test_image_modes_are_checked_too(engine, tmp_path):
    source = Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8))
    with thresholds(engine.safety_checker, -1.0), pytest.raises(ImagesFlagged):
        engine.generate(request(image=source))
