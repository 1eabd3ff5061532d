"""The Cog adapter: declares the inputs, turns them into one request, calls the engine, returns files.

The model is chosen by FLASHSD_MODEL (sdxl, sd3, sd15, pixart) and the weights are read from
FLASHSD_WEIGHTS (default: weights/ beside this file).
"""
import logging
import shutil
import tempfile
from pathlib import Path as _Path
from typing import List, Optional

from cog import BasePredictor, Input, Path

from flashsd.engine import Engine
from flashsd.images import write_outputs
from flashsd.models import selected_model
from flashsd.request import build_request
from flashsd.weights import default_root, ensure_weights


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load the Flash pipeline once: base model, Flash adapter merged, Flash scheduler."""
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.model = selected_model()
        root = default_root()
        ensure_weights(self.model, root)
        self.engine = Engine.load(self.model, root)
        self.output_dir: Optional[_Path] = None

    # Input declarations use literal values only: `cog build` reads them from this file's text, not by
    # running it. tests/test_schema.py checks they agree with flashsd.request.
    def predict(
        self,
        prompt: str = Input(description="What the image shows."),
        negative_prompt: str = Input(
            description="What the image should not show. Only has an effect when guidance_scale is above 1.",
            default="",
        ),
        aspect_ratio: str = Input(
            description="Width:height of the image, at about the model's native area (1024x1024 for SDXL, SD3 and PixArt; 512x512 for SD1.5). 'custom' uses width and height.",
            choices=["1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4", "5:4", "4:5", "21:9", "9:21", "custom"],
            default="1:1",
        ),
        width: Optional[int] = Input(
            description="Image width in pixels, with aspect_ratio 'custom': 64-2048, a multiple of 16.",
            ge=64, le=2048, default=None,
        ),
        height: Optional[int] = Input(
            description="Image height in pixels, with aspect_ratio 'custom': 64-2048, a multiple of 16.",
            ge=64, le=2048, default=None,
        ),
        num_outputs: int = Input(description="How many images to generate.", ge=1, le=4, default=1),
        num_inference_steps: int = Input(
            description="Denoising steps. Flash models are distilled for 4.", ge=1, le=8, default=4
        ),
        guidance_scale: float = Input(
            description="Classifier-free guidance. Flash models are distilled for 0 (off); above 1 it doubles the work and enables negative_prompt.",
            ge=0, le=10, default=0,
        ),
        seed: Optional[int] = Input(
            description="Random seed; image i of the batch uses seed + i. Leave empty for a random seed.",
            ge=0, le=9223372036854775803, default=None,
        ),
        output_format: str = Input(
            description="Image file format.", choices=["webp", "jpg", "png"], default="webp"
        ),
        output_quality: int = Input(
            description="Quality of webp and jpg images, 1-100 (ignored for png).", ge=1, le=100, default=80
        ),
    ) -> List[Path]:
        request = build_request(
            self.model,
            prompt=prompt,
            negative_prompt=negative_prompt,
            aspect_ratio=aspect_ratio,
            width=width,
            height=height,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
        )
        generated = self.engine.generate(request)
        return [Path(path) for path in write_outputs(generated, request, self.model, self._fresh_output_dir())]

    def _fresh_output_dir(self) -> _Path:
        # Cog has sent the previous prediction's files by the time the next one starts.
        if self.output_dir is not None:
            shutil.rmtree(self.output_dir, ignore_errors=True)
        self.output_dir = _Path(tempfile.mkdtemp(prefix="flashsd-"))
        return self.output_dir
