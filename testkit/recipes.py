"""The model cards' recipes, written out with plain diffusers and peft: the reference flashsd's images are compared
with. Nothing here calls flashsd's engine or adapter code; the only flashsd import is the SD3 scheduler, which the
card imports from a diffusers fork (REFERENCE §2). Repo ids and calls are the cards' (REFERENCE §1); the style LoRA
combination is Jasper's README's (REFERENCE §6).

    pipe = card_pipeline("sdxl", root)                     # base + card scheduler + Flash LoRA, fused
    images = run_card(pipe, "sdxl", [1234, 1235])          # the card's call: 4 steps, guidance 0, a seed per image
    styled = card_pipeline("sdxl", root, fuse=False, styles=[(lora_file, 0.8)])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    LCMScheduler,
    PixArtAlphaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from peft import PeftModel
from safetensors.torch import load_file

from flashsd.models import MODELS
from flashsd.request import build_request
from flashsd.schedulers import FlashFlowMatchEulerDiscreteScheduler

# The model cards' repos (REFERENCE §1), as folders of a weights root (`root / repo id`).
BASE = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "pixart": "PixArt-alpha/PixArt-XL-2-1024-MS",
}
FLASH = {"sdxl": "jasperai/flash-sdxl", "sd15": "jasperai/flash-sd", "sd3": "jasperai/flash-sd3", "pixart": "jasperai/flash-pixart"}  # fmt: skip
SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"

PROMPT = "a lighthouse at dawn"
SEED = 1234
WIDTH, HEIGHT = 128, 96


def base_pipeline(key: str, root: Path):
    """The base pipeline as each card loads it (fp32 here, for the CPU), with its own scheduler, from local files."""
    common = dict(dtype=torch.float32, local_files_only=True)
    base = root / BASE[key]
    if key == "sdxl":
        vae = AutoencoderKL.from_pretrained(root / SDXL_VAE, **common)
        pipe = StableDiffusionXLPipeline.from_pretrained(base, vae=vae, variant="fp16", **common)
    elif key == "sd15":
        pipe = StableDiffusionPipeline.from_pretrained(
            base, variant="fp16", safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            **common,
        )  # fmt: skip
    elif key == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(base, text_encoder_3=None, tokenizer_3=None, **common)
    else:
        pipe = PixArtAlphaPipeline.from_pretrained(base, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def card_scheduler(key: str, root: Path):
    """LCM with trailing spacing (SDXL, SD1.5, PixArt); the Flash flow-match scheduler (SD3)."""
    if key == "sd3":
        return FlashFlowMatchEulerDiscreteScheduler.from_pretrained(root / BASE[key], subfolder="scheduler")
    return LCMScheduler.from_pretrained(root / BASE[key], subfolder="scheduler", timestep_spacing="trailing")


def card_pipeline(key: str, root: Path, *, flash: bool = True, fuse: bool = True, styles: Sequence[tuple[Path, float]] = ()):  # fmt: skip
    """The card's recipe: the base pipeline, the card's scheduler and (with `flash`) the Flash adapter: a LoRA loaded
    and, with `fuse`, fused (SDXL, SD1.5); a PEFT adapter wrapping the transformer (SD3, PixArt).

    `styles`: (file, scale) style LoRAs combined as Jasper's README does, unfused: the Flash adapter and each style
    loaded as adapters of their own, weighted with set_adapters(["flash", "style0", ...], [1.0, scale, ...])."""
    if styles and fuse:
        raise ValueError("Jasper's README combines style LoRAs unfused: pass fuse=False with styles")
    pipe = base_pipeline(key, root)
    pipe.scheduler = card_scheduler(key, root)
    adapter = root / FLASH[key]
    weights: dict[str, float] = {}  # adapter name: weight
    if flash and key in ("sdxl", "sd15"):
        pipe.load_lora_weights(adapter, adapter_name="flash")
        weights["flash"] = 1.0
    elif flash and styles:  # SD3's PEFT adapter as a diffusers adapter, so that set_adapters weighs it with the styles
        config = json.loads((adapter / "adapter_config.json").read_text())
        tensors = load_file(adapter / "adapter_model.safetensors")
        state = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}  # without peft's prefix
        metadata = {name: config[name] for name in ("r", "lora_alpha", "target_modules")}
        pipe.transformer.load_lora_adapter(state, prefix=None, adapter_name="flash", metadata=metadata)
        weights["flash"] = 1.0
    elif flash:
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, adapter)
    for i, (path, scale) in enumerate(styles):
        pipe.load_lora_weights(str(path), adapter_name=f"style{i}")
        weights[f"style{i}"] = scale
    if styles:
        pipe.set_adapters(list(weights), list(weights.values()))
    elif weights and fuse:
        pipe.fuse_lora()
    return pipe


def run_card(pipe, key: str, seeds: Sequence[int], *, width: int = WIDTH, height: int = HEIGHT, **call) -> list:
    """The card's call (4 steps, guidance 0, `call` overriding), image i from a generator seeded seeds[i]: the
    images."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    extra = {"use_resolution_binning": False, "clean_caption": False} if key == "pixart" else {}
    arguments = dict(
        prompt=PROMPT, width=width, height=height, num_inference_steps=4, guidance_scale=0.0,
        num_images_per_prompt=len(seeds), generator=generators, **extra,
    ) | call  # fmt: skip
    if key == "sd3":  # the Flash scheduler re-noises each image from its own generator (REFERENCE §2)
        with pipe.scheduler.noise_generators(generators):
            return pipe(**arguments).images
    return pipe(**arguments).images


def a1111_emphasis(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis, as its modules/sd_emphasis.py "Original" (the default) states it: the hidden states times
    each token's weight, then scaled so that their mean is the unweighted mean."""
    weighted = states.double() * weights.double()[:, None]
    return weighted * (states.double().mean() / weighted.mean())


def card_request(key: str, **inputs):
    """flashsd's request for what run_card asks by default (prompt, seed, size), `inputs` overriding."""
    return build_request(MODELS[key], **{"prompt": PROMPT, "seed": SEED, "aspect_ratio": "custom", "width": WIDTH,
                                         "height": HEIGHT, **inputs})  # fmt: skip
