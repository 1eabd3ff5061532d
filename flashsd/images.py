"""Encoding generated images as webp/jpg/png, with their generation settings in the metadata."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, PngImagePlugin

from .control import infotext_fields

EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
# EXIF UserComment starts with an 8-byte character-code prefix; "UNICODE" means UTF-16 (big endian,
# as Automatic1111 and piexif write it).
UNICODE_PREFIX = b"UNICODE\x00"

PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
# Pillow's WebP effort (0 fastest … 6 smallest) and zlib level for PNG: chosen by bench/encode.py.
# At q80 on a 1024² photo-like image, method 0 encodes ~3.4x faster than Pillow's default 4 (~25 vs
# ~86 ms/MP on the team's CPU) for ~9 % more bytes at the same PSNR; level 1 writes PNG ~1.8x faster
# than 6 for ~7 % more bytes.
WEBP_METHOD = 0
PNG_COMPRESS_LEVEL = 1


def generation_parameters(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    denoising_strength: float | None = None,
    loras: Sequence[tuple[str, float, str]] = (),
    controlnets: Sequence[tuple[int, Sequence[tuple[str, object]]]] = (),
) -> str:
    """The settings in Automatic1111's 'parameters' text, which image tools already parse. Image-to-image and
    inpainting add A1111's 'Denoising strength' (flashsd's prompt_strength). Style LoRAs, (name, scale, short hash)
    each, are written as A1111 writes them: `<lora:name:scale>` in the prompt line (the syntax its users type) and
    `Lora hashes: "name: hash, ..."` (extensions-builtin/Lora: names without ':' and ','; quoted by
    modules/infotext_utils.py's quote(), as any value holding ':' or ','). ControlNets, (unit index, its fields)
    each, as A1111's ControlNet extension writes them: `ControlNet 0: "Module: canny, Model: ..., Weight: 0.75, ..."`
    (its scripts/infotext.py: one entry per unit, numbered from 0, "Field: value" pairs joined by ", ", quoted)."""
    tags = "".join(f" <lora:{name}:{scale:g}>" for name, scale, _ in loras)
    lines = [prompt + tags]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    strength = "" if denoising_strength is None else f", Denoising strength: {denoising_strength:g}"
    units = "".join(
        f", ControlNet {index}: {_quote(', '.join(f'{field}: {value}' for field, value in fields))}"
        for index, fields in controlnets
    )
    hashes = ", ".join(f"{name.replace(':', '').replace(',', '')}: {short}" for name, _, short in loras if short)
    lora_hashes = f", Lora hashes: {_quote(hashes)}" if hashes else ""
    lines.append(
        f"Steps: {steps}, Sampler: {sampler}, CFG scale: {guidance_scale:g}, Seed: {seed}, "
        f"Size: {width}x{height}, Model: {model}{strength}{units}{lora_hashes}"
    )
    return "\n".join(lines)


def _quote(text: str) -> str:
    """A value as A1111's infotext_utils.quote() writes it: JSON-quoted when it holds ',', ':' or a newline."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def encode_image(image: Image.Image, path: Path, output_format: str, quality: int, parameters: str) -> Path:
    """Write one image; `quality` is ignored for png (lossless)."""
    options: dict = {}
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        options.update(pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    else:
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = UNICODE_PREFIX + parameters.encode("utf-16-be")
        options.update(quality=quality, exif=exif.tobytes())
        if output_format == "webp":
            options.update(method=WEBP_METHOD)
    image.save(path, format=PIL_FORMATS[output_format], **options)
    return path


def encode_images(jobs: Sequence[tuple[Image.Image, Path, str, int, str]]) -> list[Path]:
    """Encode several images at once: Pillow's encoders release the GIL, so threads run in parallel."""
    if len(jobs) == 1:
        return [encode_image(*jobs[0])]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda job: encode_image(*job), jobs))


def write_outputs(generated, request, model, directory: Path) -> list[Path]:
    """One file per image, named uniquely (model, seed and a random tag), each carrying its settings."""
    tag = uuid.uuid4().hex[:8]
    jobs = []
    for item in generated:
        parameters = generation_parameters(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt if request.guidance_scale > 1 else "",
            steps=request.num_inference_steps,
            sampler=model.sampler_name,
            guidance_scale=request.guidance_scale,
            seed=item.seed,
            width=item.image.width,
            height=item.image.height,
            model=model.title,
            denoising_strength=request.prompt_strength if request.image is not None else None,
            loras=[(lora.name, lora.scale, lora.hash) for lora in item.loras],
            controlnets=[(c.slot - 1, infotext_fields(model, c)) for c in request.controls],
        )
        path = directory / f"flash-{model.key}-{item.seed}-{tag}.{request.output_format}"
        jobs.append((item.image, path, request.output_format, request.output_quality, parameters))
    return encode_images(jobs)
