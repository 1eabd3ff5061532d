"""Turning raw inputs into one validated generation request, with errors meant for a person."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from functools import lru_cache

from .errors import InputError
from .models import FlashModel

ASPECT_RATIOS = ("1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4", "5:4", "4:5", "21:9", "9:21")
CUSTOM = "custom"
OUTPUT_FORMATS = ("webp", "jpg", "png")

SIZE_MULTIPLE = 16  # latents are 1/8 of the image and the denoisers downsample them once more
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_OUTPUTS = 4
MAX_STEPS = 8
MAX_GUIDANCE = 10.0
RANDOM_SEED_BOUND = 2**32  # an omitted seed is drawn from [0, 2³²)
MAX_SEED = 2**63 - 1 - MAX_OUTPUTS  # image i uses seed + i, which must stay a valid 64-bit seed

# A ratio's size may differ from its name by at most this much; the table stays well inside the
# 2 % the README promises.
RATIO_TOLERANCE = 0.01


@lru_cache(maxsize=None)
def aspect_ratio_size(ratio: str, native_size: int) -> tuple[int, int]:
    """(width, height) in multiples of 16 whose area is nearest the model's native area and whose
    ratio is within RATIO_TOLERANCE of the ratio named. Portrait sizes are the landscape ones swapped."""
    a, b = (int(part) for part in ratio.split(":"))
    if a < b:
        height, width = aspect_ratio_size(f"{b}:{a}", native_size)
        return width, height
    target, area = a / b, native_size * native_size
    best: tuple[tuple[float, float], tuple[int, int]] | None = None
    for height in range(SIZE_MULTIPLE, native_size + SIZE_MULTIPLE, SIZE_MULTIPLE):
        width = round(height * target / SIZE_MULTIPLE) * SIZE_MULTIPLE
        ratio_error = abs(width / height / target - 1)
        if ratio_error > RATIO_TOLERANCE:
            continue
        key = (abs(math.log(width * height / area)), ratio_error)
        if best is None or key < best[0]:
            best = (key, (width, height))
    assert best is not None, ratio
    return best[1]


def size_table(model: FlashModel) -> dict[str, tuple[int, int]]:
    return {ratio: aspect_ratio_size(ratio, model.native_size) for ratio in ASPECT_RATIOS}


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    output_format: str
    output_quality: int

    @property
    def seeds(self) -> list[int]:
        """Image i is generated from seed + i, so any image is reproduced alone by its own seed."""
        return [self.seed + i for i in range(self.num_outputs)]


def _nearest_multiples(value: int) -> str:
    low = max(MIN_SIDE, min(MAX_SIDE, value // SIZE_MULTIPLE * SIZE_MULTIPLE))
    high = max(MIN_SIDE, min(MAX_SIDE, low + SIZE_MULTIPLE))
    return f"{low}" if low == high or low == value else f"{low} or {high}"


def _side(name: str, value: int | None) -> int:
    if value is None:
        raise InputError(f"{name} is required when aspect_ratio is '{CUSTOM}' ({MIN_SIDE}–{MAX_SIDE}, a multiple of {SIZE_MULTIPLE}).")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be a whole number of pixels, got {value!r}.")
    if not MIN_SIDE <= value <= MAX_SIDE or value % SIZE_MULTIPLE:
        raise InputError(
            f"{name}={value} is not allowed: use {MIN_SIDE}–{MAX_SIDE} in multiples of {SIZE_MULTIPLE}; "
            f"the nearest valid {name} is {_nearest_multiples(value)}."
        )
    return value


def _in_range(name: str, value, low, high, kind: type):
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise InputError(f"{name} must be {'a number' if kind is float else 'a whole number'} from {low} to {high}, got {value!r}.")
    if not low <= value <= high or (kind is float and not math.isfinite(value)):
        raise InputError(f"{name}={value} is out of range: allowed {low} to {high}.")
    return kind(value)


def build_request(
    model: FlashModel,
    *,
    prompt: str,
    negative_prompt: str = "",
    aspect_ratio: str = "1:1",
    width: int | None = None,
    height: int | None = None,
    num_outputs: int = 1,
    num_inference_steps: int = 4,
    guidance_scale: float = 0.0,
    seed: int | None = None,
    output_format: str = "webp",
    output_quality: int = 80,
) -> GenerationRequest:
    """Validate everything the user sent; the first problem found is raised as InputError."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt is empty: describe the image to generate.")
    negative_prompt = negative_prompt or ""
    if not isinstance(negative_prompt, str):
        raise InputError(f"negative_prompt must be text, got {negative_prompt!r}.")

    if aspect_ratio == CUSTOM:
        width, height = _side("width", width), _side("height", height)
    elif aspect_ratio in ASPECT_RATIOS:
        if width is not None or height is not None:
            raise InputError(
                f"width and height are only used with aspect_ratio='{CUSTOM}'; aspect_ratio='{aspect_ratio}' "
                f"gives {'x'.join(map(str, aspect_ratio_size(aspect_ratio, model.native_size)))}. "
                f"Leave width/height out or set aspect_ratio to '{CUSTOM}'."
            )
        width, height = aspect_ratio_size(aspect_ratio, model.native_size)
    else:
        raise InputError(f"aspect_ratio={aspect_ratio!r} is not one of: {', '.join(ASPECT_RATIOS + (CUSTOM,))}.")

    num_outputs = _in_range("num_outputs", num_outputs, 1, MAX_OUTPUTS, int)
    num_inference_steps = _in_range("num_inference_steps", num_inference_steps, 1, MAX_STEPS, int)
    guidance_scale = _in_range("guidance_scale", guidance_scale, 0, MAX_GUIDANCE, float)
    # diffusers runs classifier-free guidance only above 1; below it a negative prompt would be
    # dropped without a word, so say so instead.
    if negative_prompt.strip() and guidance_scale <= 1:
        raise InputError(
            f"negative_prompt only has an effect when guidance_scale is above 1 (it is {guidance_scale:g}); "
            "Flash models are distilled to run without guidance, so either leave negative_prompt empty "
            "or set guidance_scale above 1."
        )
    if seed is None:
        seed = secrets.randbelow(RANDOM_SEED_BOUND)
    seed = _in_range("seed", seed, 0, MAX_SEED, int)
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"output_format={output_format!r} is not one of: {', '.join(OUTPUT_FORMATS)}.")
    output_quality = _in_range("output_quality", output_quality, 1, 100, int)

    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_outputs=num_outputs,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        output_format=output_format,
        output_quality=output_quality,
    )
