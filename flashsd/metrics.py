"""What a prediction reports about itself: the images it returned (what Replicate bills per output) and where its
time went, for an operator reading a slow prediction. The predictor records them with Cog's `record_metric` (Cog >=
0.17; dotted keys nest), so the response's `metrics` holds, beside Cog's own `predict_time`:

    image_output_count      images returned (after the safety checker left any out), as Replicate's own models
                            (replicate/cog-flux) name it
    timing.queued_s         waiting for the model's thread (behind other predictions)
    timing.run_s            its call on the model's thread, until its images were handed back: style LoRAs, prompt
                            encoding, denoising, VAE decoding, safety checker
    timing.lora_s           of which putting the style LoRAs in place (or taking the last prediction's out)
    timing.encode_prompt_s  of which the text encoders' work
    timing.denoise_s        of which the denoising loop (ControlNets included)
    timing.encode_images_s  writing the output files (WebP/JPEG/PNG encoding), after the call
    batch.shared_with       other predictions that shared its pipeline call (0: it ran alone)
    batch.images            images its call generated, for all of them
    lora.cache_hit          with a style LoRA: whether every LoRA file came from a cache (or was fused already),
                            false when one was downloaded

Stage times of a shared call are the call's. They are measured with forward hooks on the text encoders, the
denoiser and any ControlNet, for the duration of one call (`StageClock`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

SECONDS_DIGITS = 4  # 0.1 ms: finer is noise


@dataclass(frozen=True)
class CallStats:
    """How one pipeline call went; shared by every prediction it served."""

    predictions: int
    images: int  # generated, before the safety checker
    lora_s: float
    encode_prompt_s: float
    denoise_s: float
    lora_cache_hit: bool | None = None  # None: no style LoRA asked for


class StageClock:
    """`with StageClock(pipe, denoiser_name, device) as clock:` the seconds the block spends in the text encoders
    (`encode_prompt_s`: every forward of every text encoder, flashsd's own for A1111 weights and long prompts as much
    as the pipeline's) and denoising (`denoise_s`: from the start of the first step, the denoiser's first call or a
    ControlNet's before it, to the end of the denoiser's last call), read once the block has ended. On CUDA the
    marks are events recorded in the stream, so that a stage is timed by its kernels, not by their launch, and
    nothing waits for the GPU (no synchronization); on the CPU, the clock."""

    def __init__(self, pipe, denoiser: str, device: torch.device):
        self.text_encoders = [
            module for name, module in pipe.components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
        ]  # fmt: skip
        self.denoiser = getattr(pipe, denoiser)
        self.controlnet = pipe.components.get("controlnet")  # a ControlNet pipeline's (it runs first in each step)
        self.device = device
        self._encodings: list[list] = []  # [start, end] marks of each text-encoder forward
        self._denoising: list = []  # [start, end] marks: the first call's start, the last call's end
        self._handles: list = []

    @property
    def encode_prompt_s(self) -> float:
        return sum(self._seconds(*marks) for marks in self._encodings if len(marks) == 2)

    @property
    def denoise_s(self) -> float:
        return self._seconds(*self._denoising) if len(self._denoising) == 2 else 0.0

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def _seconds(start, end) -> float:
        if isinstance(start, float):
            return end - start
        end.synchronize()  # done already once the pipeline has returned its images
        return start.elapsed_time(end) / 1000

    def _encoder_starts(self, module, args) -> None:
        self._encodings.append([self._mark()])

    def _encoder_ends(self, module, args, output) -> None:
        if self._encodings and len(self._encodings[-1]) == 1:
            self._encodings[-1].append(self._mark())

    def _step_starts(self, module, args) -> None:
        if not self._denoising:
            self._denoising.append(self._mark())

    def _denoiser_ends(self, module, args, output) -> None:
        self._denoising[1:] = [self._mark()]

    def __enter__(self) -> StageClock:
        for encoder in self.text_encoders:
            self._handles.append(encoder.register_forward_pre_hook(self._encoder_starts))
            self._handles.append(encoder.register_forward_hook(self._encoder_ends))
        for step_module in (self.controlnet, self.denoiser):
            if isinstance(step_module, torch.nn.Module):
                self._handles.append(step_module.register_forward_pre_hook(self._step_starts))
        self._handles.append(self.denoiser.register_forward_hook(self._denoiser_ends))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def prediction_metrics(
    call: CallStats, images_returned: int, queued_s: float, run_s: float, encode_images_s: float
) -> dict[str, float | int | bool]:
    """The metrics of one prediction (the module's docstring says what each is), by Cog metric key."""
    metrics: dict[str, float | int | bool] = {
        "image_output_count": images_returned,
        "timing.queued_s": queued_s,
        "timing.run_s": run_s,
        "timing.lora_s": call.lora_s,
        "timing.encode_prompt_s": call.encode_prompt_s,
        "timing.denoise_s": call.denoise_s,
        "timing.encode_images_s": encode_images_s,
        "batch.shared_with": call.predictions - 1,
        "batch.images": call.images,
    }
    if call.lora_cache_hit is not None:
        metrics["lora.cache_hit"] = call.lora_cache_hit
    return {key: round(value, SECONDS_DIGITS) if isinstance(value, float) else value for key, value in metrics.items()}
