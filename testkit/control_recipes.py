"""Structure control's references, written out with plain diffusers, transformers and OpenCV: jasperai/flash-sdxl's
card, section "Combining Flash Diffusion with Existing ControlNets" (the ControlNet pipeline, the Flash LoRA fused,
LCM trailing, 4 steps, guidance 0; its canny map), diffusers/controlnet-depth-sdxl-1.0's card's depth map with Depth
Anything V2 Small as the estimator (REFERENCE §9), and how A1111 reads a ControlNet unit back from an image's
parameters. Nothing here calls flashsd's control code.

    pipe = control_card_pipeline("sdxl", root, ["canny"])
    images = run_card(pipe, "sdxl", [1234, 1235], image=card_canny(photo()), controlnet_conditioning_scale=0.5)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import diffusers
import numpy as np
import torch
from PIL import Image
from transformers import DepthAnythingForDepthEstimation, DPTImageProcessorPil

from flashsd.control import CONTROL_TYPES, ControlInputs
from flashsd.models import MODELS
from flashsd.request import build_request
from testkit.recipes import BASE, FLASH, HEIGHT, PROMPT, SDXL_VAE, SEED, WIDTH, card_scheduler

# The ControlNet repos (REFERENCE §9), as folders of a weights root.
CONTROLNETS = {
    ("sdxl", "canny"): "diffusers/controlnet-canny-sdxl-1.0",
    ("sdxl", "depth"): "diffusers/controlnet-depth-sdxl-1.0",
    ("sd15", "canny"): "lllyasviel/control_v11p_sd15_canny",
    ("sd15", "depth"): "lllyasviel/control_v11f1p_sd15_depth",
}
DEPTH_ESTIMATOR = "depth-anything/Depth-Anything-V2-Small-hf"
PIPELINES = {"sdxl": "StableDiffusionXLControlNetPipeline", "sd15": "StableDiffusionControlNetPipeline"}
SEEDS = [SEED, SEED + 1]


def photo(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> Image.Image:
    """A photo with structure for edges and depth: shapes on a gradient, a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=2)
    pixels[height // 4 : height * 3 // 4, width // 5 : width // 2] = (220, 40, 40)
    pixels[(x - width * 0.7) ** 2 + (y - height * 0.5) ** 2 < (height * 0.25) ** 2] = (30, 200, 90)
    pixels = pixels + rng.integers(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def card_canny(image: Image.Image) -> Image.Image:
    """The card's canny map, as its code makes it."""
    image = np.array(image)
    image = cv2.Canny(image, 100, 200)
    image = image[:, :, None]
    image = np.concatenate([image, image, image], axis=2)
    return Image.fromarray(image)


def card_depth(root: Path, image: Image.Image) -> Image.Image:
    """diffusers/controlnet-depth-sdxl-1.0's card's depth map, with Depth Anything V2 Small as the estimator."""
    folder = root / DEPTH_ESTIMATOR
    estimator = DepthAnythingForDepthEstimation.from_pretrained(folder)
    processor = DPTImageProcessorPil.from_pretrained(folder)
    pixels = processor(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        depth_map = estimator(pixels).predicted_depth
    depth_map = torch.nn.functional.interpolate(
        depth_map.unsqueeze(1), size=(image.height, image.width), mode="bicubic", align_corners=False
    )
    depth_min = torch.amin(depth_map, dim=[1, 2, 3], keepdim=True)
    depth_max = torch.amax(depth_map, dim=[1, 2, 3], keepdim=True)
    depth_map = (depth_map - depth_min) / (depth_max - depth_min)
    image = torch.cat([depth_map] * 3, dim=1)
    image = image.permute(0, 2, 3, 1).cpu().numpy()[0]
    return Image.fromarray((image * 255.0).clip(0, 255).astype(np.uint8))


def control_card_pipeline(
    key: str, root: Path, kinds: Sequence[str], pipeline: str | None = None, styles: Sequence[tuple[Path, float]] = ()
):
    """The card's recipe: the ControlNet pipeline (`pipeline`, a diffusers class name: default text-to-image) from the
    base repo with the ControlNet(s) of `kinds` (a list: diffusers' multi-ControlNet), the Flash LoRA loaded and
    fused, LCM trailing. With style LoRAs `styles` ((file, scale) each), Jasper's recipe for them instead: every
    adapter loaded unfused and weighted with set_adapters (as testkit.recipes.card_pipeline)."""
    common = dict(dtype=torch.float32, local_files_only=True)
    nets = [diffusers.ControlNetModel.from_pretrained(root / CONTROLNETS[key, kind], variant="fp16", **common)
            for kind in kinds]  # fmt: skip
    extra = {"vae": diffusers.AutoencoderKL.from_pretrained(root / SDXL_VAE, **common)} if key == "sdxl" else {}
    if key == "sd15":
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipeline_class = getattr(diffusers, pipeline or PIPELINES[key])
    pipe = pipeline_class.from_pretrained(
        root / BASE[key], controlnet=nets[0] if len(nets) == 1 else nets, variant="fp16", **common, **extra
    )
    pipe.scheduler = card_scheduler(key, root)
    if styles:
        pipe.load_lora_weights(root / FLASH[key], adapter_name="flash")
        for number, (style, _) in enumerate(styles):
            pipe.load_lora_weights(str(style), adapter_name=f"style{number}")
        pipe.set_adapters(["flash"] + [f"style{n}" for n in range(len(styles))], [1.0] + [s for _, s in styles])
    else:
        pipe.load_lora_weights(root / FLASH[key])
        pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_request(key: str, slots, **inputs):
    """flashsd's request of model `key` with the controls `slots` ((type, photo, scale, start, end) each, as
    ControlInputs takes them), at what run_card asks by default (prompt, 128x96) with two images from SEED, on a
    build holding every ControlNet; `inputs` overriding (the tiny checker's verdicts are noise: skipped)."""
    inputs = dict(prompt=PROMPT, seed=SEED, num_outputs=len(SEEDS), aspect_ratio="custom", width=WIDTH,
                  height=HEIGHT, disable_safety_checker=True) | inputs  # fmt: skip
    controls = [ControlInputs(*slot) for slot in slots]
    return build_request(MODELS[key], **inputs, controls=controls, controlnets=CONTROL_TYPES)


# A1111's infotext parsing (modules/infotext_utils.py): `Key: value` pairs, a value JSON-quoted when it holds a comma.
A1111_PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_controlnet_units(parameters: str) -> dict[str, dict[str, str]]:
    """The ControlNet units of an image's parameters, read as A1111 and its ControlNet extension read them (the
    extension's scripts/infotext.py parse_unit: items split on ',', each split on ': ')."""
    found = {}
    for key, value in A1111_PARAMETER.findall(parameters.splitlines()[-1]):
        if key.startswith("ControlNet "):
            value = json.loads(value) if value.startswith('"') else value
            found[key] = dict(item.strip().split(": ") for item in value.split(","))
    return found
