"""Every setting is read once, at setup; a bad value fails setup naming the variable, the value and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flashsd.errors import SettingsError
from flashsd.settings import GB, LoraSettings, Settings

PROJECT = Path(__file__).resolve().parent.parent


def test_an_empty_environment_gives_the_documented_defaults():
    settings = Settings.from_environ({})
    assert settings == Settings()
    assert settings.model == "sdxl" and settings.device == "auto" and not settings.compile
    assert settings.weights_root == PROJECT / "weights"
    assert settings.batch_megapixels == 4.2 and settings.max_concurrency == 1
    assert settings.loras == LoraSettings(int(10 * GB), int(2 * GB), int(2 * GB), 30.0)


def test_each_variable_is_read_into_its_setting(tmp_path):
    settings = Settings.from_environ(
        {
            "FLASHSD_MODEL": "sd15",
            "FLASHSD_WEIGHTS": str(tmp_path / "w"),
            "FLASHSD_DEVICE": " CPU ",
            "FLASHSD_COMPILE": "yes",
            "FLASHSD_COMPILE_MODE": "max-autotune-no-cudagraphs",
            "FLASHSD_BATCH_MEGAPIXELS": "8.4",
            "FLASHSD_LORA_CACHE_GB": "1",
            "FLASHSD_LORA_MAX_GB": "0.5",
            "FLASHSD_LORA_MEMORY_GB": "0.25",
            "FLASHSD_LORA_TIMEOUT_S": "2",
            "COG_MAX_CONCURRENCY": "4",
        }
    )
    assert settings.model == "sd15" and settings.weights_root == tmp_path / "w"
    assert settings.device == "cpu" and settings.compile and settings.compile_mode == "max-autotune-no-cudagraphs"
    assert settings.batch_megapixels == 8.4 and settings.max_concurrency == 4
    assert settings.loras == LoraSettings(10**9, 5 * 10**8, 25 * 10**7, 2.0)


@pytest.mark.parametrize(
    "variable, value, allowed",
    [
        ("FLASHSD_MODEL", "sd4", "one of sdxl, sd3, sd15, pixart"),
        ("FLASHSD_DEVICE", "gpu", "one of auto, cuda, cpu"),
        ("FLASHSD_COMPILE", "fast", "1 for compiled mode, 0 or unset for eager"),
        ("FLASHSD_BATCH_MEGAPIXELS", "abc", "a number of megapixels above 0"),
        ("FLASHSD_BATCH_MEGAPIXELS", "0", "a number of megapixels above 0"),
        ("FLASHSD_BATCH_MEGAPIXELS", "nan", "a number of megapixels above 0"),
        ("FLASHSD_LORA_CACHE_GB", "-1", "a number of gigabytes above 0"),
        ("FLASHSD_LORA_TIMEOUT_S", "soon", "a number of seconds above 0"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable_the_value_and_what_is_allowed(variable, value, allowed):
    with pytest.raises(SettingsError) as error:
        Settings.from_environ({variable: value})
    assert f"{variable}={value!r} is not allowed: {allowed}" in str(error.value)


def test_every_bad_value_is_named_at_once():
    with pytest.raises(SettingsError) as error:
        Settings.from_environ({"FLASHSD_BATCH_MEGAPIXELS": "abc", "FLASHSD_DEVICE": "tpu"})
    assert "FLASHSD_BATCH_MEGAPIXELS='abc'" in str(error.value) and "FLASHSD_DEVICE='tpu'" in str(error.value)


@pytest.mark.parametrize("value", ["", "0", "-2", "four", "2.5"])
def test_cog_max_concurrency_is_read_as_coglet_reads_it(value):
    # coglet runs one prediction at a time unless the value is a whole number of at least 1: never an error here,
    # or the predictor would refuse a container that coglet runs.
    assert Settings.from_environ({"COG_MAX_CONCURRENCY": value}).max_concurrency == 1


def test_nothing_but_the_settings_reads_a_flashsd_variable():
    read = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*["'](FLASHSD_|COG_MAX_CONCURRENCY)""")
    sources = [*(PROJECT / "flashsd").rglob("*.py"), PROJECT / "predict.py", PROJECT / "scripts" / "download-weights"]
    assert len(sources) > 10 and (PROJECT / "flashsd" / "settings.py") in sources
    readers = [path.name for path in sources if path.name != "settings.py" and read.search(path.read_text())]
    assert readers == []


def test_controlnets_are_a_comma_list_of_control_types():
    assert Settings.from_environ({}).controlnets == ()
    assert Settings.from_environ({"FLASHSD_CONTROLNETS": " Canny, depth,canny "}).controlnets == ("canny", "depth")
    assert Settings.from_environ({"FLASHSD_MODEL": "sd15", "FLASHSD_CONTROLNETS": "depth"}).controlnets == ("depth",)


@pytest.mark.parametrize(
    "environ, said",
    [
        ({"FLASHSD_CONTROLNETS": "canny,pose"}, "FLASHSD_CONTROLNETS='canny,pose' is not allowed: a comma list of "
         "control types from canny, depth"),
        ({"FLASHSD_MODEL": "pixart", "FLASHSD_CONTROLNETS": "canny"}, "FLASHSD_CONTROLNETS=canny is not allowed: "
         "Flash PixArt takes no ControlNet (diffusers has no ControlNet pipeline for PixArt-α)"),
        ({"FLASHSD_MODEL": "sd3", "FLASHSD_CONTROLNETS": "depth"}, "Flash SD3 takes no ControlNet"),
    ],
)  # fmt: skip
def test_controlnets_a_build_cannot_hold_fail_setup_naming_the_variable(environ, said):
    with pytest.raises(SettingsError) as error:
        Settings.from_environ(environ)
    assert said in str(error.value)
