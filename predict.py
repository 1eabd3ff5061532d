"""The Cog adapter: declares the inputs, turns them into one request, calls the engine, returns files.

The model is chosen by FLASHSD_MODEL (sdxl, sd3, sd15, pixart) and the weights are read from
FLASHSD_WEIGHTS (default: weights/ beside this file). Up to 4 predictions run at once (`@concurrent`, which
`cog build` writes into the image as COG_MAX_CONCURRENCY, the variable coglet reads; `make serve` sets it):
compatible ones share one pipeline call on the one thread that owns the model (flashsd.batching); the event loop
only awaits (decoding inputs and encoding outputs, which touch no model, run in asyncio's threads).
Each prediction records its metrics (flashsd.metrics); the health check says whether the instance can still serve
(flashsd.health).
"""

import asyncio
import logging
import time
from typing import List, Optional, Union

from cog import BasePredictor, Input, Path, concurrent

from flashsd.batching import ModelThread, engine_batcher
from flashsd.cog_files import OutputFolders, sweep_input_copies, use_private_tempdir
from flashsd.control import ControlInputs, with_controlnets
from flashsd.download import ensure_weights
from flashsd.engine import Engine
from flashsd.health import HealthCheck
from flashsd.images import write_outputs
from flashsd.loras.trained import apply_trained_lora, fetch_trained_lora
from flashsd.metrics import prediction_metrics
from flashsd.models import MODELS
from flashsd.request import build_request
from flashsd.runtime import select_runtime
from flashsd.settings import Settings


class Predictor(BasePredictor):
    def setup(self, weights: Optional[Union[Path, str]] = None) -> None:
        """Load the Flash pipeline once: base model, Flash adapter merged, Flash scheduler. `weights` (Cog's
        COG_WEIGHTS: a URL or a path) is the output of a training when this model version was made from one."""
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        use_private_tempdir()  # in the Cog worker: input copies and outputs in a folder of its own (see predict)
        settings = Settings.from_environ()  # every setting read and checked once: a bad one fails setup here
        runtime = select_runtime(settings.device)  # FLASHSD_DEVICE=cuda without a usable GPU fails before any download
        # The model with the ControlNets the build holds (FLASHSD_CONTROLNETS): fetched if missing, checked, loaded.
        self.model = with_controlnets(MODELS[settings.model], settings.controlnets)
        self.controlnets = settings.controlnets
        # A training's tar: its LoRA is every prediction's lora_weights unless it names its own. Fetched and checked
        # against the model here, before the model loads; fused once it is loaded (flashsd.loras.trained).
        self.trained = fetch_trained_lora(weights, self.model, settings.weights_root, settings.loras)
        ensure_weights(self.model, settings.weights_root)
        # One thread owns the model from its load on: every torch and tokenizer call runs there (flashsd.batching).
        thread = ModelThread()
        self.engine = thread.call(Engine.load, self.model, settings.weights_root, runtime, settings)
        if self.trained is not None:
            thread.call(apply_trained_lora, self.engine.loras, self.trained)
        self.batcher = engine_batcher(self.engine, thread)
        self.health = HealthCheck(
            self.engine.fault, worker_alive=lambda: thread.alive, worker_busy=lambda: thread.busy,
            run_on_worker=thread.run_if_idle, device=runtime.device,
        )  # fmt: skip
        in_flight = settings.max_concurrency
        self.outputs = OutputFolders(keep=in_flight)  # the folders of predictions still being delivered
        # Concurrent requests' input copies may be arriving: sweep only those older than any live request.
        self.stale_input_s = 0 if in_flight == 1 else 900

    async def healthcheck(self) -> bool:
        """Cog's health check (every GET /health-check once setup succeeded): True, or Unhealthy saying why."""
        return await self.health.check()

    # Input declarations use literal values only: `cog build` reads them from this file's text, not by
    # running it. tests/test_schema.py checks they agree with flashsd.request.
    @concurrent(max=4)
    async def predict(
        self,
        prompt: str = Input(description="What the image shows."),
        negative_prompt: str = Input(
            description="What the image should not show. Only has an effect when guidance_scale is above 1.",
            default="",
        ),
        image: Optional[Path] = Input(
            description="Image to start from (URL or upload): alone it is image-to-image, with mask it is inpainting. Not available with PixArt.",
            default=None,
        ),
        mask: Optional[Path] = Input(
            description="Inpainting mask, the size of image: white areas are repainted, black areas kept. Needs image.",
            default=None,
        ),
        prompt_strength: float = Input(
            description="With an image: how much of it is repainted, 0-1. The last floor(num_inference_steps x prompt_strength) steps run (at least one); 1 starts from pure noise. Ignored without image.",
            ge=0,
            le=1,
            default=0.8,
        ),
        aspect_ratio: str = Input(
            description="Width:height of the image, at about the model's native area (1024x1024 for SDXL, SD3 and PixArt; 512x512 for SD1.5). 'match_input_image' keeps the ratio of image (1:1 without one); 'custom' uses width and height. An image of another ratio is centre-cropped to it.",
            choices=[
                "match_input_image",
                "1:1",
                "16:9",
                "9:16",
                "3:2",
                "2:3",
                "4:3",
                "3:4",
                "5:4",
                "4:5",
                "21:9",
                "9:21",
                "custom",
            ],
            default="match_input_image",
        ),
        width: Optional[int] = Input(
            description="Image width in pixels, with aspect_ratio 'custom': 64-2048, a multiple of 16.",
            ge=64,
            le=2048,
            default=None,
        ),
        height: Optional[int] = Input(
            description="Image height in pixels, with aspect_ratio 'custom': 64-2048, a multiple of 16.",
            ge=64,
            le=2048,
            default=None,
        ),
        num_outputs: int = Input(description="How many images to generate.", ge=1, le=4, default=1),
        num_inference_steps: int = Input(
            description="Denoising steps. Flash models are distilled for 4.", ge=1, le=8, default=4
        ),
        guidance_scale: float = Input(
            description="Classifier-free guidance. Flash models are distilled for 0 (off); above 1 it doubles the work and enables negative_prompt.",
            ge=0,
            le=10,
            default=0,
        ),
        seed: Optional[int] = Input(
            description="Random seed; image i of the batch uses seed + i. Leave empty for a random seed.",
            ge=0,
            le=9007199254740988,
            default=None,
        ),
        output_format: str = Input(description="Image file format.", choices=["webp", "jpg", "png"], default="webp"),
        output_quality: int = Input(
            description="Quality of webp and jpg images, 1-100 (ignored for png).", ge=1, le=100, default=80
        ),
        disable_safety_checker: bool = Input(
            description="Skip the safety checker. When it runs, flagged images are left out of the output; the prediction fails only if every image is flagged.",
            default=False,
        ),
        lora_weights: str = Input(
            description="A style LoRA trained for the base model (SDXL, SD1.5 or SD3; not PixArt), applied at Flash speed: the URL of a .safetensors file (CivitAI download links included), a Hugging Face repo as owner/name (its single .safetensors file) or owner/name/file.safetensors. Downloaded once, then cached. Empty on a model made from a training: that training's LoRA.",
            default="",
        ),
        lora_scale: float = Input(
            description="Strength of lora_weights (or of the trained LoRA it stands for): 1 as trained, 0 off, negative to push away from its style. Distilled models can weaken a style: try values above 1.",
            ge=-1,
            le=3,
            default=1.0,
        ),
        extra_lora: str = Input(
            description="A second style LoRA, in the same forms as lora_weights, applied together with it.",
            default="",
        ),
        extra_lora_scale: float = Input(
            description="Strength of extra_lora, as lora_scale.",
            ge=-1,
            le=3,
            default=1.0,
        ),
        controlnet_1: str = Input(
            description="Structure control (ControlNet, SDXL and SD1.5): 'canny' follows the edges of controlnet_1_image, 'depth' its depth (estimated by Depth Anything V2). The build must hold that ControlNet (FLASHSD_CONTROLNETS). 'none': no control.",
            choices=["none", "canny", "depth"],
            default="none",
        ),
        controlnet_1_image: Optional[Path] = Input(
            description="The photo controlnet_1's map is made from (URL or upload), scaled and centre-cropped to the output size. With aspect_ratio 'match_input_image' and no image, it decides the output's aspect ratio.",
            default=None,
        ),
        controlnet_1_conditioning_scale: float = Input(
            description="How strongly controlnet_1 steers the image: 0 not at all, 1 as trained (the SDXL canny card recommends 0.5).",
            ge=0,
            le=4,
            default=0.75,
        ),
        controlnet_1_start: float = Input(
            description="When controlnet_1 starts acting, as a fraction of the denoising (0 = the first step).",
            ge=0,
            le=1,
            default=0,
        ),
        controlnet_1_end: float = Input(
            description="When controlnet_1 stops acting, as a fraction of the denoising (1 = the last step); above controlnet_1_start.",
            ge=0,
            le=1,
            default=1,
        ),
        controlnet_2: str = Input(
            description="A second structure control, as controlnet_1 (ControlNets act together).",
            choices=["none", "canny", "depth"],
            default="none",
        ),
        controlnet_2_image: Optional[Path] = Input(
            description="The photo controlnet_2's map is made from, as controlnet_1_image.",
            default=None,
        ),
        controlnet_2_conditioning_scale: float = Input(
            description="Strength of controlnet_2, as controlnet_1_conditioning_scale.",
            ge=0,
            le=4,
            default=0.75,
        ),
        controlnet_2_start: float = Input(
            description="When controlnet_2 starts acting, as controlnet_1_start.",
            ge=0,
            le=1,
            default=0,
        ),
        controlnet_2_end: float = Input(
            description="When controlnet_2 stops acting, as controlnet_1_end.",
            ge=0,
            le=1,
            default=1,
        ),
        controlnet_3: str = Input(
            description="A third structure control, as controlnet_1 (ControlNets act together).",
            choices=["none", "canny", "depth"],
            default="none",
        ),
        controlnet_3_image: Optional[Path] = Input(
            description="The photo controlnet_3's map is made from, as controlnet_1_image.",
            default=None,
        ),
        controlnet_3_conditioning_scale: float = Input(
            description="Strength of controlnet_3, as controlnet_1_conditioning_scale.",
            ge=0,
            le=4,
            default=0.75,
        ),
        controlnet_3_start: float = Input(
            description="When controlnet_3 starts acting, as controlnet_1_start.",
            ge=0,
            le=1,
            default=0,
        ),
        controlnet_3_end: float = Input(
            description="When controlnet_3 stops acting, as controlnet_1_end.",
            ge=0,
            le=1,
            default=1,
        ),
    ) -> List[Path]:
        controls = [
            ControlInputs(controlnet_1, controlnet_1_image, controlnet_1_conditioning_scale, controlnet_1_start, controlnet_1_end),
            ControlInputs(controlnet_2, controlnet_2_image, controlnet_2_conditioning_scale, controlnet_2_start, controlnet_2_end),
            ControlInputs(controlnet_3, controlnet_3_image, controlnet_3_conditioning_scale, controlnet_3_start, controlnet_3_end),
        ]  # fmt: skip
        # coglet leaves the input copies of a request it rejected after downloading part of them; remove them.
        sweep_input_copies(keep=(image, mask, *(c.image for c in controls)), older_than_s=self.stale_input_s)
        if self.engine.fault.error is not None:  # the GPU failed: every prediction would; say so before any work
            raise self.engine.fault.failure()
        request = await asyncio.to_thread(  # it decodes the images: off the event loop
            build_request,
            self.model,
            prompt=prompt,
            negative_prompt=negative_prompt,
            image=image,
            mask=mask,
            prompt_strength=prompt_strength,
            aspect_ratio=aspect_ratio,
            width=width,
            height=height,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            lora_weights=lora_weights,
            lora_scale=lora_scale,
            extra_lora=extra_lora,
            extra_lora_scale=extra_lora_scale,
            controls=controls,
            controlnets=self.controlnets,
            default_lora=self.trained,
        )
        served = await self.batcher.serve(request)  # alone, or in one call with compatible predictions
        folder = self.outputs.fresh()
        encoding = time.perf_counter()
        try:
            paths = await asyncio.to_thread(write_outputs, served.result, request, self.model, folder)
        except BaseException:  # failed or cancelled while writing: no partial files left behind
            self.outputs.discard(folder)
            raise
        measured = prediction_metrics(
            served.result.call, len(paths), served.queued_s, served.run_s, time.perf_counter() - encoding
        )
        for key, value in measured.items():
            self.record_metric(key, value)
        return [Path(path) for path in paths]
