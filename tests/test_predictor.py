"""The Cog Predictor in-process: setup from a weights root, predict() end to end, missing weights."""

import asyncio
import inspect
import logging
import time

import pytest
from PIL import Image

import predict
from flashsd.errors import InputError, SettingsError, WeightsError


def all_inputs(**overrides):
    """predict() called directly does not resolve Input() defaults: pass every argument."""
    defaults = {
        name: parameter.default.default
        for name, parameter in inspect.signature(predict.Predictor.predict).parameters.items()
        if name != "self"
    }
    return {**defaults, **overrides}


def run(predictor, **inputs):
    """predict() as coglet calls it: a coroutine on an event loop."""
    return asyncio.run(predictor.predict(**inputs))


@pytest.fixture(scope="module")
def predictor(tiny_weights, monkeypatch_module):
    monkeypatch_module.setenv("FLASHSD_WEIGHTS", str(tiny_weights))
    monkeypatch_module.setenv("FLASHSD_MODEL", "sdxl")
    p = predict.Predictor()
    p.setup()
    return p


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_setup_loads_the_model_named_by_the_environment(predictor):
    assert predictor.model.key == "sdxl"
    assert type(predictor.engine.pipe).__name__ == "StableDiffusionXLPipeline"


def test_predict_returns_one_file_per_image_with_seeds_in_logs_and_metadata(predictor, caplog):
    with caplog.at_level(logging.INFO, logger="flashsd"):
        paths = run(
            predictor,
            **all_inputs(
                prompt="a cat",
                aspect_ratio="custom",
                width=96,
                height=64,
                num_outputs=2,
                seed=5,
                output_format="png",
            ),
        )
    assert len(paths) == 2 and len({p.name for p in paths}) == 2
    for path, seed in zip(paths, (5, 6)):
        with Image.open(path) as image:
            assert image.size == (96, 64)
            assert f"Seed: {seed}" in image.text["parameters"]
    assert "seeds 5, 6" in caplog.text


def test_the_previous_predictions_files_are_removed_when_the_next_starts(predictor):
    first = run(predictor, **all_inputs(prompt="a", aspect_ratio="custom", width=64, height=64, seed=1))
    second = run(predictor, **all_inputs(prompt="a", aspect_ratio="custom", width=64, height=64, seed=1))
    assert not first[0].exists() and second[0].exists()
    assert first[0].name != second[0].name


def test_bad_input_raises_a_readable_error_before_any_work(predictor):
    with pytest.raises(InputError, match="nearest valid width is 96 or 112"):
        run(predictor, **all_inputs(prompt="a", aspect_ratio="custom", width=100, height=64))


def test_every_input_has_a_description():
    for name, parameter in inspect.signature(predict.Predictor.predict).parameters.items():
        if name != "self":
            assert parameter.default.description, name


def test_missing_weights_without_a_hub_name_the_folder_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHSD_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("FLASHSD_MODEL", "sdxl")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the hub is unreachable
    started = time.monotonic()
    with pytest.raises(WeightsError) as error:
        predict.Predictor().setup()
    assert time.monotonic() - started < 30
    message = str(error.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message
    assert "scripts/download-weights" in message


def test_an_unknown_model_name_lists_the_choices(monkeypatch):
    monkeypatch.setenv("FLASHSD_MODEL", "sd4")
    with pytest.raises(SettingsError, match="FLASHSD_MODEL='sd4' is not allowed: one of sdxl, sd3, sd15, pixart"):
        predict.Predictor().setup()
