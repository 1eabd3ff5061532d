"""Logs a Replicate user can read: one tqdm-format progress line per denoising step, and setup logs without
known-harmless library noise while real warnings still show."""

from __future__ import annotations

import logging
import re

import pytest
from PIL import Image

from flashsd import logs
from flashsd.engine import Engine
from flashsd.models import MODELS
from flashsd.request import build_request

# What Replicate's clients read progress from (replicate-python #152, replicate-javascript #207).
REPLICATE_PROGRESS = re.compile(r"^\s*(\d+)%\s*\|.+?\|\s*(\d+)/(\d+)")


def progress_lines(caplog) -> list[tuple[int, int, int]]:
    found = []
    for record in caplog.records:
        match = REPLICATE_PROGRESS.match(record.getMessage())
        if match and record.name == "flashsd":
            found.append(tuple(int(g) for g in match.groups()))
    return found


@pytest.mark.parametrize("key", list(MODELS))  # pixart's pipeline reports steps through the older `callback`
def test_each_denoising_step_logs_one_progress_line_replicate_reads_ending_at_n_of_n(engines, caplog, key):
    caplog.set_level(logging.INFO, logger="flashsd")
    request = build_request(MODELS[key], prompt="a lighthouse", seed=1, aspect_ratio="custom", width=64, height=64,
                            num_inference_steps=3, guidance_scale=2)  # fmt: skip
    engines(key).generate(request)
    lines = progress_lines(caplog)
    assert [(done, total) for _, done, total in lines] == [(1, 3), (2, 3), (3, 3)]
    assert [percent for percent, _, _ in lines] == sorted(percent for percent, _, _ in lines) and lines[-1][0] == 100


def test_image_to_image_counts_the_steps_that_run(engines, caplog):
    caplog.set_level(logging.INFO, logger="flashsd")
    image = Image.new("RGB", (64, 64), (120, 80, 40))
    request = build_request(MODELS["sd15"], prompt="a lighthouse", image=image, prompt_strength=0.5, seed=1,
                            aspect_ratio="custom", width=64, height=64)  # fmt: skip
    engines("sd15").generate(request)
    assert [line[1:] for line in progress_lines(caplog)] == [(1, 2), (2, 2)]


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_known_library_noise_is_left_out_of_setup_logs_and_real_warnings_still_show(tiny_weights):
    """diffusers logs through its own handler on its library logger (it does not propagate to the root): a
    handler there sees what a Replicate user reads."""
    import torch

    from flashsd.runtime import Runtime

    collect = Collect()
    library = logging.getLogger("diffusers")
    library.addHandler(collect)
    try:
        Engine.load(MODELS["sdxl"], tiny_weights, Runtime(torch.device("cpu"), torch.float32))
        logging.getLogger("diffusers.configuration_utils").warning("A real warning about a VAE config")
        logging.getLogger("diffusers.loaders.lora_base").warning(
            "No LoRA keys associated to UNet2DConditionModel found"
        )
    finally:
        library.removeHandler(collect)
    err = "\n".join(collect.lines)
    assert "No LoRA keys associated to CLIPTextModel" not in err
    assert "were passed to LCMScheduler, but are not expected" not in err
    assert "A real warning about a VAE config" in err
    assert "No LoRA keys associated to UNet2DConditionModel" in err


def test_the_noise_filter_is_installed_once():
    logs.leave_out_known_noise()
    logs.leave_out_known_noise()
    for name, _ in logs.KNOWN_NOISE:
        assert sum(isinstance(f, logs._LeaveOut) for f in logging.getLogger(name).filters) == 1
