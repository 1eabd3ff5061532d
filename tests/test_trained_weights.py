"""A model version made from a training (flashsd.loras.trained): the training's tar, given to setup as Cog gives it
(COG_WEIGHTS: a URL, or a path), is every prediction's LoRA unless the prediction names its own; a tar trained for
another family fails setup, saying so, before the model loads.

The in-process Predictor on tiny SD1.5 at 64 px; the tar is a real training's output (flashsd.training, 10 steps).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import predict
from flashsd.__main__ import main
from flashsd.engine import Engine
from flashsd.loras import LoraError
from flashsd.loras.cache import DiskCache
from flashsd.loras.fetch import RECORD_MEMBER
from flashsd.loras.trained import RECORD_FORMAT_PREFIX, fetch_trained_lora, weights_source
from flashsd.models import MODELS
from flashsd.request import build_request
from flashsd.runtime import Runtime
from flashsd.settings import LoraSettings
from flashsd.training import RECORD_FILE, TrainingOptions, run_training
from flashsd.training.export import RECORD_FORMAT
from testkit.lora_server import LoraServer
from testkit.pixels import max_difference
from testkit.training_sets import make_zip, png

CPU32 = Runtime(torch.device("cpu"), torch.float32)
PROMPT = "a photo of sks"  # the training's trigger word, as the README's example uses it
IMAGE = dict(aspect_ratio="custom", width=64, height=64, seed=1234, disable_safety_checker=True)


@pytest.fixture(scope="module")
def trained_tar(tiny_weights, tmp_path_factory) -> Path:
    """What a training of tiny SD1.5 returns (trained_model.tar): 10 steps at the smallest resolution a training
    takes, at a rate that moves the image."""
    folder = tmp_path_factory.mktemp("trained")
    archive = make_zip(
        folder / "set.zip", {"a.png": png((160, 160), 1), "a.txt": b"a lighthouse at dawn", "b.png": png((192, 160), 2)}
    )
    options = TrainingOptions(
        trigger_word="sks", steps=10, learning_rate=1e-2, lora_rank=16, resolution=256, seed=1234,
        train_text_encoder=True,
    )  # fmt: skip
    return run_training(archive, options, MODELS["sd15"], tiny_weights, CPU32, folder / "out")


@pytest.fixture(scope="module")
def files(trained_tar, lora_file):
    """An HTTP host serving the tar (as Replicate serves a training's output) and another SD1.5 LoRA."""
    with LoraServer() as server:
        server.tar_url = server.add("/trainings/abc/trained_model.tar", trained_tar.read_bytes())
        server.other_url = server.add("/other.safetensors", lora_file("sd15-diffusers").read_bytes())
        yield server


@pytest.fixture(scope="module")
def environment(tiny_weights):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLASHSD_WEIGHTS", str(tiny_weights))
        patch.setenv("FLASHSD_MODEL", "sd15")
        yield patch


def set_up(weights) -> predict.Predictor:
    predictor = predict.Predictor()
    predictor.setup(weights=weights)
    return predictor


@pytest.fixture(scope="module")
def from_path(environment, trained_tar) -> predict.Predictor:
    """A model version made from the training, given the tar's path (as a local COG_WEIGHTS gives it: text)."""
    return set_up(str(trained_tar))


def image(predictor: predict.Predictor, **inputs) -> Image.Image:
    """One prediction's image, as png (lossless), every input not named at predict()'s default."""
    parameters = inspect.signature(predict.Predictor.predict).parameters
    defaults = {name: p.default.default for name, p in parameters.items() if name != "self"}
    arguments = defaults | {"prompt": PROMPT, "output_format": "png", **IMAGE} | inputs
    (path,) = asyncio.run(predictor.predict(**arguments))
    with Image.open(path) as opened:
        return opened.convert("RGB")


def base_image(engines, **inputs) -> Image.Image:
    """The same image from the Flash model alone (the session's engine, no LoRA)."""
    (generated,) = engines("sd15").generate(build_request(MODELS["sd15"], prompt=PROMPT, **IMAGE, **inputs))
    return generated.image


def test_a_prediction_without_lora_weights_gets_the_trained_lora_as_if_named(from_path, files, engines):
    default = image(from_path)
    named = image(from_path, lora_weights=files.tar_url)  # the same tar, by URL, as any flashsd model takes it
    assert max_difference(default, base_image(engines)) > 10  # the LoRA is on: the next check bites
    assert max_difference(default, named) == 0
    assert from_path.trained.trigger_word == "sks" and from_path.trained.example_prompt == "a photo of sks"


def test_lora_scale_scales_the_trained_lora_and_0_turns_it_off(from_path, engines):
    assert max_difference(image(from_path, lora_scale=0.0), base_image(engines)) == 0
    assert max_difference(image(from_path, lora_scale=0.5), image(from_path)) > 0


def test_a_prediction_naming_lora_weights_gets_that_lora_alone_and_the_next_the_trained_one_again(
    from_path, files, engines
):
    trained = image(from_path)
    other = image(from_path, lora_weights=files.other_url)
    engine = engines("sd15")
    try:
        (alone,) = engine.generate(build_request(MODELS["sd15"], prompt=PROMPT, lora_weights=files.other_url, **IMAGE))
    finally:
        engine.loras.apply(())  # the session engine goes back to the Flash model alone
    assert max_difference(other, alone.image) == 0 and max_difference(other, trained) > 10
    assert max_difference(image(from_path), trained) == 0
    # extra_lora adds to the trained LoRA, as it adds to a named one
    both = image(from_path, extra_lora=files.other_url)
    assert max_difference(both, image(from_path, lora_weights=files.tar_url, extra_lora=files.other_url)) == 0
    assert max_difference(both, trained) > 10


def test_setup_fetches_the_tar_from_a_url_once_then_finds_it_in_the_cache(from_path, files, tiny_weights):
    gets = files.gets("/trainings/abc/trained_model.tar")  # the tests above fetched it once, by lora_weights
    from_url = set_up(files.tar_url)
    assert max_difference(image(from_url), image(from_path)) == 0
    assert from_url.trained.trigger_word == "sks"
    again = fetch_trained_lora(files.tar_url, MODELS["sd15"], tiny_weights, LoraSettings())
    assert again.trigger_word == "sks"  # the record comes back from the cache too
    assert files.gets("/trainings/abc/trained_model.tar") == max(gets, 1)


def test_the_command_line_applies_a_trained_tar_as_a_model_made_from_the_training_does(
    from_path, trained_tar, tiny_weights, tmp_path
):
    inputs = [f"prompt={PROMPT}", "output_format=png"] + [f"{k}={str(v).lower()}" for k, v in IMAGE.items()]
    arguments = ["--model", "sd15", "--weights", str(tiny_weights), "--trained-weights", str(trained_tar)]
    assert main(["predict", *arguments, "--output-dir", str(tmp_path), *(f"--input={i}" for i in inputs)]) == 0
    (written,) = tmp_path.glob("*.png")
    with Image.open(written) as opened:
        assert max_difference(opened, image(from_path)) == 0


def test_the_trained_loras_file_is_never_evicted_from_the_cache(from_path, tmp_path):
    assert from_path.engine.loras.disk.pinned == {from_path.trained.source.key}
    disk = DiskCache(tmp_path, LoraSettings(cache_bytes=0))  # every file is over the bound
    for key in ("trained", "other"):
        for path in disk.files(key):
            path.write_text("{}")
    disk.pinned.add("trained")
    assert disk.evict() == ["other"] and all(path.exists() for path in disk.files("trained"))


def test_a_tar_rewritten_at_the_same_path_is_read_again(tmp_path):
    tar = tmp_path / "trained_model.tar"
    tar.write_bytes(b"one")
    first = weights_source(tar)
    tar.write_bytes(b"other")
    assert weights_source(tar).key != first.key and weights_source(str(tar)).key == weights_source(tar).key
    assert weights_source(f"file://{tar}").key == weights_source(tar).key
    assert weights_source(None) is None and weights_source("") is None


@pytest.mark.parametrize("model", ["sdxl", "pixart"])
def test_a_tar_for_another_family_fails_setup_before_the_model_loads(environment, trained_tar, monkeypatch, model):
    monkeypatch.setenv("FLASHSD_MODEL", model)
    monkeypatch.setattr(Engine, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(LoraError) as caught:
        set_up(trained_tar)
    expected = {
        "sdxl": "is a LoRA trained for SD1.5 (Flash SD, stable-diffusion-v1-5/stable-diffusion-v1-5); this container "
        "serves Flash SDXL, which takes SDXL LoRAs. Serve it with FLASHSD_MODEL=sd15, or train on this model "
        "(FLASHSD_MODEL=sdxl).",
        "pixart": "Flash PixArt takes no style LoRA",
    }[model]
    assert str(caught.value).startswith("weights: ") and expected in str(caught.value)


def test_a_bare_lora_of_another_family_fails_setup_saying_what_the_model_takes(environment, lora_file, monkeypatch):
    """No training.json to read: its layers are checked against the model's when it is fused, at setup. (The tiny
    models' widths are not the real ones the family is told by, so the message says what does not fit.)"""
    monkeypatch.setenv("FLASHSD_MODEL", "sdxl")
    with pytest.raises(LoraError) as caught:
        set_up(lora_file("sd15-diffusers"))
    message = str(caught.value)
    assert message.startswith("weights: sd15-diffusers does not fit Flash SDXL (")
    assert message.endswith("This model takes LoRAs trained for SDXL.")


@pytest.mark.parametrize(
    "weights, message",
    [("/nowhere/trained_model.tar", "weights: /nowhere/trained_model.tar cannot be read (No such file or directory)"),
     ("s3://bucket/trained_model.tar", "weights=s3://… is neither an http(s) URL nor a file"),
     (".", "is not a file")],
)  # fmt: skip
def test_weights_that_name_no_file_fail_setup_saying_what_is_taken(environment, monkeypatch, weights, message):
    monkeypatch.setattr(Engine, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(LoraError, match="give the URL of a training's output") as caught:
        set_up(weights)
    assert message in str(caught.value)


def test_the_record_the_loras_package_reads_is_the_one_trainings_write():
    assert RECORD_MEMBER == RECORD_FILE and os.path.basename(RECORD_FILE) == RECORD_FILE
    assert RECORD_FORMAT.startswith(RECORD_FORMAT_PREFIX)
