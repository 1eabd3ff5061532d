"""Style-LoRA test support: the LoRA files the tests use (every format of each family, written by
testkit.lora_files from the tiny weights), a StyleLoras on a fresh tiny SD1.5, and weight comparisons."""

from __future__ import annotations

from pathlib import Path

import torch

from flashsd import loras
from flashsd.engine import Engine
from flashsd.loras import StyleLoras
from flashsd.models import MODELS
from flashsd.request import parse_lora_source
from flashsd.runtime import Runtime
from flashsd.settings import LoraSettings
from testkit.lora_files import write_lora

CPU32 = Runtime(torch.device("cpu"), torch.float32)
# (model, format, fixture seed): every format for the UNet families, with text-encoder layers.
FILES = {
    "sd15-kohya": ("sd15", "kohya", 0), "sd15-diffusers": ("sd15", "diffusers", 1),
    "sd15-diffusers-plain": ("sd15", "diffusers-plain", 2), "sd15-unet-only": ("sd15", "kohya", 3),
    "sdxl-kohya": ("sdxl", "kohya", 0), "sdxl-diffusers": ("sdxl", "diffusers", 1),
    "sd3-diffusers": ("sd3", "diffusers", 0), "sd3-diffusers-plain": ("sd3", "diffusers-plain", 1),
    # attention layers only (UNet and CLIP): cheaper to load, for the 1000 swaps
    "swap-kohya": ("sd15", "kohya", 4), "swap-diffusers": ("sd15", "diffusers", 5), "swap-plain": ("sd15", "diffusers-plain", 6),
}  # fmt: skip
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def lora_files(tiny_weights: Path, folder: Path):
    """lora_file(name): the LoRA file `name` of FILES, written into `folder` on first use."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            key, fmt, seed = FILES[name]
            made[name] = write_lora(folder / f"{name}.safetensors", tiny_weights, key, fmt, seed=seed,
                                    text_encoders=name != "sd15-unet-only",
                                    targets=ATTENTION if name.startswith("swap-") else None)  # fmt: skip
        return made[name]

    return get


def same_weights(a: dict, b: dict) -> list[str]:
    """The names whose values differ (bit for bit), or that only one side has."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def fresh_loras(root: Path, tiny_weights: Path, **settings) -> StyleLoras:
    """StyleLoras on a freshly loaded tiny SD1.5, its cache under `root`."""
    engine = Engine.load(MODELS["sd15"], tiny_weights, CPU32)
    values = dict(cache_bytes=10**9, max_file_bytes=10**9, memory_bytes=10**9, timeout_s=5.0) | settings
    return StyleLoras(engine.model, engine.pipe, root, LoraSettings(**values))


def style(source: str, scale: float = 1.0, input: str = "lora_weights") -> loras.StyleLora:
    return loras.StyleLora(input, parse_lora_source(source, input), scale)


def weights_of_manager(manager: StyleLoras) -> dict:
    return {f"{n}.{k}": v.detach().clone() for n, m in manager.components().items() for k, v in m.state_dict().items()}
