"""Where a call's time goes, in process: the stage clock's prompt encoding covers flashsd's own encoding (A1111
weights, long prompts) as much as the pipeline's, the denoising loop is timed apart from it, the clock leaves no
hook behind, even when the call fails, and on CUDA it times by events without making the CPU wait for the GPU.
(The metrics as the server reports them: tests/test_metrics_http.py.)"""

from __future__ import annotations

import time

import pytest
import torch

from flashsd.models import MODELS
from flashsd.request import build_request

# Waits that tell the stages apart: each stage's own work on the tiny model (up to ~1.5 s for the denoiser on a busy
# 2-core machine) stays below the other stage's wait.
ENCODER_WAIT_S = 2.0
DENOISER_WAIT_S = 0.25


def request(prompt: str, **inputs):
    return build_request(MODELS["sd15"], **{"prompt": prompt, "aspect_ratio": "custom", "width": 64, "height": 64,
                                            "seed": 1, "disable_safety_checker": True, **inputs})  # fmt: skip


def hook_count(engine) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks)
        for component in engine.pipe.components.values() if isinstance(component, torch.nn.Module)
        for m in component.modules()
    )  # fmt: skip


class SlowModule:
    """A forward hook making `module` wait `seconds` after each forward (registered before the clock's own, so inside
    its window, as a slow kernel would be); counts the forwards."""

    def __init__(self, module, seconds: float):
        self.calls, self.seconds = 0, seconds
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        time.sleep(self.seconds)

    @property
    def waited(self) -> float:
        return self.calls * self.seconds


class Pipe:
    """What the stage clock reads of a pipeline: its components by name, the denoiser as an attribute."""

    def __init__(self, controlnet: bool = False):
        self.text_encoder, self.unet = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        self.components = {"text_encoder": self.text_encoder, "unet": self.unet, "scheduler": object()}
        if controlnet:
            self.controlnet = self.components["controlnet"] = torch.nn.Linear(2, 2)


@pytest.mark.parametrize(
    "prompt",
    ["a lighthouse on a cliff, number {n}", "a (lighthouse:1.4) on a [cliff], number {n}"],
    ids=["plain-the-pipeline-encodes", "weighted-flashsd-encodes"],
)
def test_prompt_encoding_and_denoising_are_each_timed_apart(engines, prompt):
    engine = engines("sd15")
    before = hook_count(engine)
    encoder = SlowModule(engine.pipe.text_encoder, ENCODER_WAIT_S)
    denoiser = SlowModule(engine.pipe.unet, DENOISER_WAIT_S)
    try:
        generation = engine.generate(request(prompt.format(n=time.monotonic_ns())))  # a new text: nothing reused
    finally:
        encoder.handle.remove()
        denoiser.handle.remove()
    call = generation.call
    assert encoder.calls >= 1 and denoiser.calls == 4
    # Each stage holds its own waits and not the other's.
    assert encoder.waited <= call.encode_prompt_s < encoder.waited + denoiser.waited
    assert denoiser.waited <= call.denoise_s < denoiser.waited + encoder.waited
    assert (call.predictions, call.images, call.lora_cache_hit) == (1, 1, None)
    assert hook_count(engine) == before  # the clock's hooks are gone


def test_the_clock_leaves_no_hook_behind_when_the_call_fails(engines):
    engine = engines("sd15")
    before = hook_count(engine)

    def fail(module, args):
        raise ValueError("a bug in the second step")

    calls = {"n": 0}

    def fail_second(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            fail(module, args)

    handle = engine.pipe.unet.register_forward_pre_hook(fail_second)
    try:
        with pytest.raises(ValueError, match="second step"):
            engine.generate(request("a harbour"))
    finally:
        handle.remove()
    assert hook_count(engine) == before


def test_on_cuda_the_stages_are_timed_by_events_in_the_stream_and_nothing_waits_for_the_gpu(monkeypatch):
    from flashsd.metrics import StageClock

    recorded = []

    class Event:
        """torch.cuda.Event's interface: record() in the current stream, synchronize(), elapsed_time(end) in ms."""

        def __init__(self, enable_timing: bool = False):
            assert enable_timing
            self.at, self.done = None, False

        def record(self, stream=None):
            self.at = time.perf_counter()
            recorded.append(self)

        def synchronize(self):
            self.done = True

        def elapsed_time(self, end) -> float:
            assert self.at is not None and end.done, "read before the end event completed"
            return (end.at - self.at) * 1000

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: pytest.fail("the clock made the CPU wait"))

    pipe, x = Pipe(), torch.zeros(1, 2)
    encoder, denoiser = SlowModule(pipe.text_encoder, 0.2), SlowModule(pipe.unet, 0.1)
    with StageClock(pipe, "unet", torch.device("cuda")) as clock:
        pipe.text_encoder(x)
        for _ in range(3):
            pipe.unet(x)
    assert len(recorded) == 2 + 1 + 3  # the encoder's start and end; the denoiser's first start and each end
    assert encoder.waited <= clock.encode_prompt_s < encoder.waited + 0.05
    assert denoiser.waited <= clock.denoise_s < denoiser.waited + 0.05


def test_with_a_controlnet_denoising_starts_with_its_first_call():
    from flashsd.metrics import StageClock

    pipe, x = Pipe(controlnet=True), torch.zeros(1, 2)
    controlnet, denoiser = SlowModule(pipe.controlnet, 0.2), SlowModule(pipe.unet, 0.1)
    with StageClock(pipe, "unet", torch.device("cpu")) as clock:
        pipe.text_encoder(x)
        for _ in range(2):  # each step: the ControlNet, then the denoiser
            pipe.controlnet(x)
            pipe.unet(x)
    assert controlnet.waited + denoiser.waited <= clock.denoise_s < controlnet.waited + denoiser.waited + 0.05
