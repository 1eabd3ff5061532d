"""Turning raw inputs into one validated generation request, with errors meant for a person."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TYPE_CHECKING

from .control import Control, ControlInputs, controls_from_inputs
from .errors import InputError
from .input_images import fit_image, fit_mask, load_image, load_mask, repainted_fraction
from .loras.sources import StyleLora, TrainedLora, parse_lora_source
from .models import MODELS, FlashModel, lora_models

if TYPE_CHECKING:
    from PIL import Image

ASPECT_RATIOS = ("1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4", "5:4", "4:5", "21:9", "9:21")
CUSTOM = "custom"
# The default: with an image (else a control's photo), the output keeps its aspect ratio; without either it is square.
MATCH_INPUT = "match_input_image"
DEFAULT_PROMPT_STRENGTH = 0.8
OUTPUT_FORMATS = ("webp", "jpg", "png")

SIZE_MULTIPLE = 16  # latents are 1/8 of the image and the denoisers downsample them once more
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_OUTPUTS = 4
MAX_STEPS = 8
MAX_GUIDANCE = 10.0
RANDOM_SEED_BOUND = 2**32  # an omitted seed is drawn from [0, 2³²)
# Image i uses seed + i, up to seed + MAX_OUTPUTS - 1: that must stay at most 2**53 - 1, so the bound (and every seed
# reported back) is exact in float64 and in JavaScript numbers, as Cog's schema and its clients hold them.
MAX_SEED = 2**53 - 1 - (MAX_OUTPUTS - 1)
# Far beyond what prompts need (CLIP reads them in 75-token chunks, PixArt's T5 its first 120 tokens), and small
# enough that prompt and negative prompt fit in a JPEG's 64 kB EXIF metadata in any script.
MAX_PROMPT_CHARS = 5000
# Style LoRAs (flashsd.loras): scales as cog-flux allows them (its predict.py: lora_scale ge=-1, le=3); distilled
# models can weaken a style (diffusers #6156), hence room above 1.
MIN_LORA_SCALE, MAX_LORA_SCALE = -1.0, 3.0

# A ratio's size may differ from its name by at most this much; the table stays well inside the
# 2 % the README promises.
RATIO_TOLERANCE = 0.01


@cache
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


@lru_cache(maxsize=1024)
def matching_size(width: int, height: int, native_size: int) -> tuple[int, int]:
    """The output size for an input image of `width` x `height`: multiples of 16 at about the model's native
    area, with the input's aspect ratio (within RATIO_TOLERANCE where the 64-2048 px sides allow it; beyond
    that, the nearest ratio they allow). Portrait sizes are the landscape ones swapped."""
    if width < height:
        h, w = matching_size(height, width, native_size)
        return w, h
    target, area = width / height, native_size * native_size
    tolerance = math.log1p(RATIO_TOLERANCE)
    best: tuple[tuple[float, float, float], tuple[int, int]] | None = None
    for side in range(MIN_SIDE, MAX_SIDE + SIZE_MULTIPLE, SIZE_MULTIPLE):
        long = min(MAX_SIDE, max(MIN_SIDE, round(side * target / SIZE_MULTIPLE) * SIZE_MULTIPLE))
        ratio_error = abs(math.log(long / side / target))
        key = (max(0.0, ratio_error - tolerance), abs(math.log(long * side / area)), ratio_error)
        if best is None or key < best[0]:
            best = (key, (long, side))
    assert best is not None
    return best[1]


def steps_run(num_inference_steps: int, prompt_strength: float) -> int:
    """How many denoising steps image-to-image and inpainting run: the last floor(steps x strength) steps of
    the schedule, and at least one. (The epsilon guards strengths such as 2/7 whose float product with the
    steps lands just below the whole number it stands for.)"""
    return max(1, min(num_inference_steps, math.floor(num_inference_steps * prompt_strength + 1e-9)))


def size_table(model: FlashModel) -> dict[str, tuple[int, int]]:
    return {ratio: aspect_ratio_size(ratio, model.native_size) for ratio in ASPECT_RATIOS}


def distinct_sizes(model: FlashModel) -> list[tuple[int, int]]:
    """(width, height) of every aspect ratio of the table, each once, in table order (1:1 first)."""
    return list(dict.fromkeys(size_table(model).values()))


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
    image: Image.Image | None = None  # RGB, already width x height: image-to-image / inpainting start from it
    mask: Image.Image | None = None  # "L", width x height, 255 = repaint, 0 = keep: inpainting
    prompt_strength: float = DEFAULT_PROMPT_STRENGTH  # used only with an image
    check_safety: bool = True  # the safety checker screens the images (disable_safety_checker=false)
    loras: tuple[StyleLora, ...] = ()  # style LoRAs, fused on top of the Flash adapter (flashsd.loras)
    # ControlNet controls (flashsd.control), in slot order, their photos already width x height
    controls: tuple[Control, ...] = ()

    @property
    def seeds(self) -> list[int]:
        """Image i is generated from seed + i, so any image is reproduced alone by its own seed."""
        return [self.seed + i for i in range(self.num_outputs)]

    @property
    def mode(self) -> str:
        """ "text-to-image", "image-to-image" or "inpainting"."""
        if self.image is None:
            return "text-to-image"
        return "inpainting" if self.mask is not None else "image-to-image"

    @property
    def steps_run(self) -> int:
        """Denoising steps that actually run (see steps_run())."""
        if self.image is None:
            return self.num_inference_steps
        return steps_run(self.num_inference_steps, self.prompt_strength)


def _nearest_multiples(value: int) -> str:
    low = max(MIN_SIDE, min(MAX_SIDE, value // SIZE_MULTIPLE * SIZE_MULTIPLE))
    high = max(MIN_SIDE, min(MAX_SIDE, low + SIZE_MULTIPLE))
    return f"{low}" if low == high or low == value else f"{low} or {high}"


def _side(name: str, value: int | None) -> int:
    if value is None:
        raise InputError(
            f"{name} is required when aspect_ratio is '{CUSTOM}' ({MIN_SIDE}–{MAX_SIDE}, a multiple of {SIZE_MULTIPLE})."
        )
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
        raise InputError(
            f"{name} must be {'a number' if kind is float else 'a whole number'} from {low} to {high}, got {value!r}."
        )
    if not low <= value <= high or (kind is float and not math.isfinite(value)):
        raise InputError(f"{name}={value} is out of range: allowed {low} to {high}.")
    return kind(value)


def build_request(
    model: FlashModel,
    *,
    prompt: str,
    negative_prompt: str = "",
    image=None,
    mask=None,
    prompt_strength: float = DEFAULT_PROMPT_STRENGTH,
    aspect_ratio: str = MATCH_INPUT,
    width: int | None = None,
    height: int | None = None,
    num_outputs: int = 1,
    num_inference_steps: int = 4,
    guidance_scale: float = 0.0,
    seed: int | None = None,
    output_format: str = "webp",
    output_quality: int = 80,
    disable_safety_checker: bool = False,
    lora_weights: str | None = "",
    lora_scale: float = 1.0,
    extra_lora: str | None = "",
    extra_lora_scale: float = 1.0,
    controls: Sequence[ControlInputs] = (),
    controlnets: Sequence[str] = (),
    default_lora: TrainedLora | None = None,
) -> GenerationRequest:
    """Validate everything the user sent; the first problem found is raised as InputError.

    `image` and `mask` are paths (or PIL images): `image` alone is image-to-image, both are inpainting. `controls`:
    the controlnet_1.. slots' inputs; `controlnets`: the control types this build holds (FLASHSD_CONTROLNETS).
    `default_lora`: what an empty `lora_weights` stands for (at `lora_scale`): the LoRA of the training a model version
    was made from (flashsd.loras.trained).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt is empty: describe the image to generate.")
    negative_prompt = negative_prompt or ""
    if not isinstance(negative_prompt, str):
        raise InputError(f"negative_prompt must be text, got {negative_prompt!r}.")
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:
            raise InputError(
                f"{name} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are accepted: shorten it."
            )

    source = mask_source = None
    if mask is not None and image is None:
        raise InputError(
            "mask was given without image: inpainting repaints the white areas of the mask in image, so send "
            "both (or leave mask out for text-to-image)."
        )
    if image is not None:
        _check_image_modes(model, "inpainting" if mask is not None else "image-to-image")
        source = load_image(image, "image")
        if mask is not None:
            mask_source = load_mask(mask, "mask")
            if mask_source.size != source.size:
                raise InputError(
                    f"mask is {mask_source.width}x{mask_source.height} but image is {source.width}x{source.height} "
                    "(both as displayed, after their EXIF orientation): the mask must have the image's size, white "
                    "where to repaint, black where to keep."
                )

    checked_controls = controls_from_inputs(model, controlnets, controls)

    if aspect_ratio == CUSTOM:
        width, height = _side("width", width), _side("height", height)
    elif aspect_ratio in ASPECT_RATIOS or aspect_ratio == MATCH_INPUT:
        if aspect_ratio != MATCH_INPUT:
            named = aspect_ratio_size(aspect_ratio, model.native_size)
        elif source is not None:
            named = matching_size(*source.size, model.native_size)
        elif checked_controls:  # no image: the first control's photo gives the shape
            named = matching_size(*checked_controls[0].image.size, model.native_size)
        else:
            named = aspect_ratio_size("1:1", model.native_size)
        if width is not None or height is not None:
            raise InputError(
                f"width and height are only used with aspect_ratio='{CUSTOM}'; aspect_ratio='{aspect_ratio}' "
                f"gives {'x'.join(map(str, named))}. "
                f"Leave width/height out or set aspect_ratio to '{CUSTOM}'."
            )
        width, height = named
    else:
        raise InputError(
            f"aspect_ratio={aspect_ratio!r} is not one of: {', '.join((MATCH_INPUT,) + ASPECT_RATIOS + (CUSTOM,))}."
        )

    num_outputs = _in_range("num_outputs", num_outputs, 1, MAX_OUTPUTS, int)
    num_inference_steps = _in_range("num_inference_steps", num_inference_steps, 1, MAX_STEPS, int)
    guidance_scale = _in_range("guidance_scale", guidance_scale, 0, MAX_GUIDANCE, float)
    # A negative prompt with guidance_scale <= 1 is accepted and not used (diffusers runs classifier-free guidance
    # only above 1): API clients send a default one with every request. The engine logs that it was ignored.
    if seed is None:
        seed = secrets.randbelow(RANDOM_SEED_BOUND)
    seed = _in_range("seed", seed, 0, MAX_SEED, int)
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"output_format={output_format!r} is not one of: {', '.join(OUTPUT_FORMATS)}.")
    output_quality = _in_range("output_quality", output_quality, 1, 100, int)
    # Without an image prompt_strength has nothing to act on (every step runs); it is documented as such
    # rather than refused, since Cog always sends its default.
    prompt_strength = _in_range("prompt_strength", prompt_strength, 0, 1, float)
    if not isinstance(disable_safety_checker, bool):
        raise InputError(f"disable_safety_checker must be true or false, got {disable_safety_checker!r}.")
    loras = style_loras(model, (("lora_weights", lora_weights, "lora_scale", lora_scale),
                                ("extra_lora", extra_lora, "extra_lora_scale", extra_lora_scale)), default_lora)  # fmt: skip

    fitted = fitted_mask = None
    if source is not None:
        fitted = fit_image(source, (width, height))
        if mask_source is not None:
            fitted_mask = fit_mask(mask_source, (width, height))
            if repainted_fraction(fitted_mask) == 0:
                where = (
                    ""
                    if repainted_fraction(fit_mask(mask_source, mask_source.size)) == 0
                    else (f" left once it is resized to the output's {width}x{height}")
                )
                raise InputError(
                    f"mask has no white area{where}, so inpainting would return image unchanged: paint what to "
                    "repaint white (pixels at least 50% grey count as white), or leave mask out for image-to-image."
                )

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
        image=fitted,
        mask=fitted_mask,
        prompt_strength=prompt_strength,
        check_safety=not disable_safety_checker,
        loras=loras,
        controls=tuple(control.fitted((width, height)) for control in checked_controls),
    )


def style_loras(model: FlashModel, inputs, default: TrainedLora | None = None) -> tuple[StyleLora, ...]:
    """The style LoRAs of (input, source, scale input, scale) rows: an empty source is no LoRA (its scale is still
    checked, as Cog always sends one), but for the first row, which `default` then stands in for."""
    found = []
    for row, (name, source, scale_name, scale) in enumerate(inputs):
        scale = _in_range(scale_name, scale, MIN_LORA_SCALE, MAX_LORA_SCALE, float)
        if source is None or (isinstance(source, str) and not source.strip()):
            if row == 0 and default is not None:
                found.append(default.at(scale))
            continue
        if not isinstance(source, str):
            raise InputError(f"{name} must be text (a URL or a Hugging Face repo), got {type(source).__name__}.")
        if model.lora_family is None:
            raise InputError(
                f"{model.title} takes no style LoRA: diffusers has no LoRA loader for its pipeline, so {name} cannot "
                f"be used with this model. Style LoRAs work on {lora_models()}; leave {name} empty here."
            )
        found.append(StyleLora(name, parse_lora_source(source, name), scale))
    return tuple(found)


def _check_image_modes(model: FlashModel, mode: str) -> None:
    """Image-to-image and inpainting exist only where diffusers has the pipeline (the model table says)."""
    pipeline = model.img2img_pipeline if mode == "image-to-image" else model.inpaint_pipeline
    if pipeline is not None:
        return
    able = [f"{m.title} ({m.key})" for m in MODELS.values() if m.img2img_pipeline and m.inpaint_pipeline]
    raise InputError(
        f"{model.title} supports text-to-image only: diffusers has no {mode} pipeline for it, so image and mask "
        f"cannot be used with this model. Image-to-image and inpainting are supported by {', '.join(able)}; "
        "leave image and mask out here."
    )
