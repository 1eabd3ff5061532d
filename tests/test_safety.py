"""The safety checker on its tiny random checkpoint: loaded from the real layout, diffusers' own rule, and what
the engine does with flagged images (left out, counted in the logs; all flagged fails; disable skips it). Its second
opinion (Falconsai/nsfw_image_detection, a tiny ViT in the real layout): only flagged images reach it, and an image
it calls `normal` is returned as if never flagged."""

import contextlib
import json
import logging

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from PIL import Image
from safetensors import safe_open

from flashsd.engine import Engine
from flashsd.images import write_outputs
from flashsd.models import MODELS, SAFETY_CHECKER, SAFETY_SECOND_OPINION
from flashsd.request import build_request
from flashsd.runtime import Runtime
from flashsd.safety import FIRST_CHECKER, ImagesFlagged, SafetyChecker, SecondOpinion
from testkit.real_size import safetensors_header
from testkit.tiny_repos import (
    SECOND_OPINION_CONFIG,
    SECOND_OPINION_PREPROCESSOR,
    SECOND_OPINION_TINY,
    second_opinion_config,
)

CPU32 = Runtime(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def engine(tiny_weights):
    return Engine.load(MODELS["sd15"], tiny_weights, CPU32)


def request(**inputs):
    return build_request(
        MODELS["sd15"], **{"prompt": "a cat", "aspect_ratio": "custom", "width": 64, "height": 64, "seed": 10, **inputs}
    )


@contextlib.contextmanager
def thresholds(checker: SafetyChecker, concept: float | torch.Tensor, special: float | torch.Tensor | None = None):
    """Forces flags through the checker's own thresholds (the real code path, other numbers): every concept's
    threshold, and the special-care concepts' too when `special` is given."""
    settings = [(checker.model.concept_embeds_weights, concept)]
    if special is not None:
        settings.append((checker.model.special_care_embeds_weights, special))
    saved = [weights.detach().clone() for weights, _ in settings]
    try:
        with torch.no_grad():
            for weights, value in settings:
                weights.copy_(torch.as_tensor(value, dtype=weights.dtype).expand_as(weights))
        yield
    finally:
        with torch.no_grad():
            for (weights, _), before in zip(settings, saved):
                weights.copy_(before)


def max_similarity(checker: SafetyChecker, images, embeddings: str = "concept_embeds") -> list[float]:
    """Each image's highest cosine similarity to the checker's concept (or special-care) embeddings."""
    with torch.no_grad():
        pixels = checker.processor(images=images, return_tensors="pt").pixel_values
        embeds = checker.model.visual_projection(checker.model.vision_model(pixels)[1])
        return cosine_distance(embeds, getattr(checker.model, embeddings)).max(dim=1).values.tolist()


def max_concept_similarity(checker: SafetyChecker, images) -> list[float]:
    return max_similarity(checker, images, "concept_embeds")


def noise_images(count: int) -> list[Image.Image]:
    return [
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (48, 64, 3), dtype=np.uint8)) for i in range(count)
    ]


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
    images = noise_images(6)
    similarity = sorted(max_concept_similarity(checker, images))
    pixels = checker.processor(images=images, return_tensors="pt").pixel_values
    for concept in (-1.0, similarity[2] + 1e-3, 2.0):
        with thresholds(checker, concept):
            _, reference = checker.model(pixels, np.zeros((6, 1, 1, 3)))
            assert checker.compvis_flags(images) == list(reference)
    assert checker.compvis_flags(images) == [False] * 6  # the tiny checker's own thresholds never flag


def test_special_care_raises_concept_scores_as_diffusers_does(engine):
    """An image close to a special-care concept gets every concept score raised by 0.01: with a concept threshold
    just above an image's similarity (inside that 0.01), the image is flagged exactly when it needs special care.
    diffusers' own StableDiffusionSafetyChecker.forward is the reference, for every image."""
    checker = engine.safety_checker
    images = noise_images(8)
    pixels = checker.processor(images=images, return_tensors="pt").pixel_values
    special, concept = max_similarity(checker, images, "special_care_embeds"), max_concept_similarity(checker, images)
    ranked = sorted(special)
    special_threshold = (ranked[3] + ranked[4]) / 2  # half the images need special care, with a margin
    needs_care = [s > special_threshold for s in special]
    assert any(needs_care) and not all(needs_care)
    for i in range(len(images)):
        concept_threshold = concept[i] + 0.004  # image i: 0.004 short of a concept, unless raised by 0.01
        with thresholds(checker, concept_threshold, special_threshold):
            _, reference = checker.model(pixels, np.zeros((len(images), 1, 1, 3)))
            assert reference[i] == needs_care[i], i  # the reference itself: the band decides image i
            assert checker.compvis_flags(images) == list(reference), i
        with thresholds(checker, concept_threshold, 2.0):  # no special care: image i is not flagged
            _, reference = checker.model(pixels, np.zeros((len(images), 1, 1, 3)))
            assert reference[i] is False and checker.compvis_flags(images) == list(reference), i


def test_a_flag_leaves_out_the_image_it_was_raised_for(engine, monkeypatch, caplog):
    """Flags that are not symmetric in the batch: the flagged seeds are the ones left out, whatever their place."""
    for count, flagged_seeds in [(3, {10}), (4, {10, 11}), (4, {13})]:
        unchecked = engine.generate(request(num_outputs=count, disable_safety_checker=True))
        by_seed = {g.seed: np.asarray(g.image) for g in unchecked}
        assert len({a.tobytes() for a in by_seed.values()}) == count  # every image tells its seed

        def flags(images, by_seed=by_seed, flagged_seeds=flagged_seeds):  # by content: the flagged seeds' images
            return [any(np.array_equal(np.asarray(image), by_seed[s]) for s in flagged_seeds) for image in images]

        monkeypatch.setattr(engine.safety_checker, "compvis_flags", flags)  # the second opinion confirms
        caplog.clear()
        with caplog.at_level(logging.INFO):
            kept = engine.generate(request(num_outputs=count))
        monkeypatch.undo()
        assert [g.seed for g in kept] == [10 + i for i in range(count) if 10 + i not in flagged_seeds]
        for item in kept:
            assert np.array_equal(np.asarray(item.image), by_seed[item.seed])
        seeds = ", ".join(map(str, sorted(flagged_seeds)))
        assert (
            f"{len(flagged_seeds)} of {count} image(s) flagged as potentially NSFW and left out (seeds {seeds})"
            in caplog.text
        )


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
    assert (
        f"Safety checker: 1 of 3 image(s) flagged as potentially NSFW and left out (seeds {10 + worst})" in caplog.text
    )
    req = request(num_outputs=3, output_format="png")
    names = sorted(p.name.split("-")[2] for p in write_outputs(kept, req, MODELS["sd15"], tmp_path))
    assert names == sorted(str(g.seed) for g in kept)


@pytest.mark.parametrize(
    "count, message", [(1, "The generated image was flagged"), (2, "All 2 generated images were flagged")]
)
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


# -- the second opinion ------------------------------------------------------------------------------------------

# The hub's model.safetensors of Falconsai/nsfw_image_detection at the pin: its LFS size (flashsd/models.py says
# where this comes from).
REAL_SECOND_OPINION_BYTES = 343_223_968


def vit_checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a ViTForImageClassification checkpoint of `config` as transformers writes it (its save-time
    key names, those of transformers 4.31 that made the real file), from a model on the meta device."""
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = ViTForImageClassification(ViTConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    return {key: tuple(t.shape) for key, t in revert_weight_conversion(model, model.state_dict()).items()}


@contextlib.contextmanager
def second_opinion_margin(second: SecondOpinion, shift: float):
    """Lowers the classifier's `nsfw` logit by `shift` (its own bias: the real code path, another number)."""
    bias = second.model.classifier.bias
    nsfw = int(second.model.config.label2id["nsfw"])
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias[nsfw] -= shift
        yield
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def nsfw_margins(second: SecondOpinion, images) -> list[float]:
    """Each image's `nsfw` logit minus its `normal` logit: above 0 the classifier says `nsfw`."""
    with torch.no_grad():
        pixels = second.processor(images=images, return_tensors="pt").pixel_values
        logits = second.model(pixel_values=pixels).logits
    labels = second.model.config.label2id
    return (logits[:, int(labels["nsfw"])] - logits[:, int(labels["normal"])]).tolist()


def parameters_of(path) -> str:
    return Image.open(path).text["parameters"]


def test_every_model_fetches_the_second_opinion_with_the_checker_as_safetensors():
    assert len(SAFETY_SECOND_OPINION.revision) == 40
    assert set(SAFETY_SECOND_OPINION.files) == {"config.json", "model.safetensors", "preprocessor_config.json"}
    for model in MODELS.values():
        assert model.safety_checker == SAFETY_CHECKER and model.safety_second_opinion == SAFETY_SECOND_OPINION
        assert SAFETY_SECOND_OPINION in model.repos


def test_the_tiny_second_opinion_has_the_real_files_layout(tiny_weights):
    folder = tiny_weights / SAFETY_SECOND_OPINION.id
    # The real configs, as transformers writes them, have the hub's sizes (724 and 325 bytes).
    assert len((json.dumps(SECOND_OPINION_CONFIG, indent=2, sort_keys=True) + "\n").encode()) == 724
    assert len((json.dumps(SECOND_OPINION_PREPROCESSOR, indent=2, sort_keys=True) + "\n").encode()) == 325
    # The real layout at the real config's sizes is the hub's file to the byte: keys, shapes, fp32, metadata.
    real = vit_checkpoint_shapes(SECOND_OPINION_CONFIG)
    data = 4 * sum(int(np.prod(shape)) for shape in real.values())
    assert len(safetensors_header(real, {"format": "pt"})) + data == REAL_SECOND_OPINION_BYTES
    # The tiny files: the real configs with only the sizes changed, and the real file's keys (of its first layers).
    tiny_config = json.loads((folder / "config.json").read_text())
    assert {k for k in tiny_config if tiny_config[k] != SECOND_OPINION_CONFIG[k]} == set(SECOND_OPINION_TINY)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor == {**SECOND_OPINION_PREPROCESSOR, "size": {"height": 32, "width": 32}}
    layers = tiny_config["num_hidden_layers"]
    in_tiny = {k for k in real if not k.startswith("vit.encoder.layer.") or int(k.split(".")[3]) < layers}
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == in_tiny
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"} and f.metadata() == {"format": "pt"}
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == vit_checkpoint_shapes(
            second_opinion_config()
        )


def test_the_second_opinion_loads_with_the_checker_in_its_dtype_from_safetensors(engine, tiny_weights, unpickling):
    second = engine.safety_checker.second_opinion
    assert second.model.dtype == torch.float32 == engine.runtime.dtype
    assert second.model.config.id2label == {0: "normal", 1: "nsfw"}
    checker = SafetyChecker.load(
        tiny_weights, SAFETY_CHECKER, torch.device("cpu"), torch.float16, SAFETY_SECOND_OPINION
    )
    assert checker.second_opinion.model.dtype == torch.float16 == checker.model.dtype
    assert not unpickling


def test_an_image_flagged_by_the_checker_and_called_normal_by_the_second_opinion_is_returned(engine, caplog, tmp_path):
    checker = engine.safety_checker
    unchecked = engine.generate(request(num_outputs=2, disable_safety_checker=True))
    margins = nsfw_margins(checker.second_opinion, [g.image for g in unchecked])
    with thresholds(checker, -1.0), second_opinion_margin(checker.second_opinion, max(margins) + 1.0):
        with caplog.at_level(logging.INFO):
            kept = engine.generate(request(num_outputs=2, output_format="png"))
    assert [g.seed for g in kept] == [10, 11]
    for item, before in zip(kept, unchecked):
        assert np.array_equal(np.asarray(item.image), np.asarray(before.image)) and item.loras == before.loras
    assert (
        "Safety checker: 2 of 2 image(s) flagged by the CompVis safety checker were called normal by the second "
        "opinion (Falconsai/nsfw_image_detection) and kept (seeds 10, 11)" in caplog.text
    )
    assert "left out" not in caplog.text
    # The files carry exactly what an unchecked prediction's carry.
    req = request(num_outputs=2, output_format="png")
    (tmp_path / "cleared").mkdir(), (tmp_path / "plain").mkdir()
    cleared = write_outputs(kept, req, MODELS["sd15"], tmp_path / "cleared")
    plain = write_outputs(unchecked, req, MODELS["sd15"], tmp_path / "plain")
    assert [parameters_of(p) for p in cleared] == [parameters_of(p) for p in plain]


def test_an_image_flagged_by_both_is_left_out_and_the_log_says_which_checker_decided(engine, caplog):
    checker = engine.safety_checker
    unchecked = engine.generate(request(num_outputs=3, disable_safety_checker=True))
    margins = nsfw_margins(checker.second_opinion, [g.image for g in unchecked])
    worst = int(np.argmax(margins))
    top, second = sorted(margins)[-1], sorted(margins)[-2]
    with thresholds(checker, -1.0), second_opinion_margin(checker.second_opinion, (top + second) / 2):
        with caplog.at_level(logging.INFO):
            kept = engine.generate(request(num_outputs=3))
    assert [g.seed for g in kept] == [10 + i for i in range(3) if i != worst]
    assert (
        f"Safety checker: 1 of 3 image(s) flagged as potentially NSFW and left out (seeds {10 + worst}); decided by "
        "the CompVis safety checker, confirmed by the second opinion (Falconsai/nsfw_image_detection)" in caplog.text
    )
    assert "2 of 3 image(s) flagged by the CompVis safety checker were called normal" in caplog.text


def test_images_the_checker_does_not_flag_never_reach_the_second_opinion(engine, monkeypatch):
    checker = engine.safety_checker
    unchecked = engine.generate(request(num_outputs=3, disable_safety_checker=True))
    images = [g.image for g in unchecked]
    similarity = max_concept_similarity(checker, images)
    shown: list[list[bytes]] = []
    labels = checker.second_opinion.labels

    def spy(batch):
        shown.append([np.asarray(image).tobytes() for image in batch])
        return labels(batch)

    monkeypatch.setattr(checker.second_opinion, "labels", spy)
    verdicts = checker.flags(images)  # the tiny thresholds flag nothing
    assert shown == [] and not any(verdicts) and {v.decided_by for v in verdicts} == {FIRST_CHECKER}
    worst = int(np.argmax(similarity))
    with thresholds(checker, (sorted(similarity)[-1] + sorted(similarity)[-2]) / 2):
        verdicts = checker.flags(images)
    assert shown == [[np.asarray(images[worst]).tobytes()]]  # the flagged image alone, once
    assert [bool(v) for v in verdicts] == [i == worst for i in range(3)]  # the tiny second opinion says nsfw
    assert verdicts[worst].decided_by == "the second opinion (Falconsai/nsfw_image_detection)"
