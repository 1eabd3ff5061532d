"""What a LoRA file is, read from its safetensors header without loading a tensor: its layers (by flashsd.adapter's
key parser), the base model family it was trained for, the name and short hash A1111 gives it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from tqdm import tqdm

from .. import adapter
from .sources import LoraError, pickle_message

if TYPE_CHECKING:
    from ..adapter import LoraLayer

# The text-embedding width each family's UNet cross-attends to (`cross_attention_dim` in their UNet configs:
# SD1.5's CLIP ViT-L 768, SD2's OpenCLIP ViT-H 1024, SDXL's two encoders concatenated 768 + 1280).
_CROSS_ATTENTION_FAMILY = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}
# kohya's `ss_base_model_version` metadata (sd-scripts library/train_util.py), by prefix.
_BASE_VERSIONS = (("sdxl", "SDXL"), ("sd_v1", "SD1.5"), ("sd_v2", "SD2"), ("sd3", "SD3"), ("flux", "Flux"))
# diffusers' own LoRA metadata key (LORA_ADAPTER_METADATA_KEY in diffusers/loaders/lora_base.py): rank and alpha
# per layer, read only when diffusers loads the file itself.
DIFFUSERS_METADATA = "lora_adapter_metadata"


@dataclass(frozen=True)
class Header:
    """What a LoRA file's safetensors header says, read without loading a tensor."""

    layers: dict[tuple[str, str], LoraLayer]
    metadata: dict[str, str]


def read_header(path: Path, input_name: str, shown: str) -> Header:
    """The layers and metadata of a safetensors LoRA file; LoraError for anything else (a pickle, a web page, a
    damaged or truncated file)."""
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    # safetensors: an 8-byte little-endian header length, then the JSON header. Anything else is said for what it is:
    # a pickle (protocol 2-5 opcode 0x80 0x02..0x05) or torch.save's zip container ("PK\x03\x04"), a web page.
    # (safetensors' own error for these, "header too large", says neither what the file is nor what to do.)
    length = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not (2 <= length <= size - 8 and head[8:9] == b"{"):
        if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04":
            raise LoraError(pickle_message(input_name, shown))
        if head.lstrip()[:1] == b"<":
            raise LoraError(
                f"{input_name}: {shown} sent a web page, not a LoRA file: the link may need a login or an API key "
                "(CivitAI: add ?token=<your API key> to the URL), or it points at a page rather than at the file."
            )
        raise LoraError(
            f"{input_name}: {shown} is not a safetensors file ({tqdm.format_sizeof(size, 'B')} starting "
            f"{head[:8]!r}): give the address of a .safetensors LoRA file."
        )
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(
            f"{input_name}: {shown} is a damaged safetensors file ({str(e).strip()[:200]}): fetch it again, or use "
            "another copy."
        ) from e
    return Header(adapter.lora_layers(shapes), metadata)


def lora_family(header: Header) -> str | None:
    """The base model family a LoRA was trained for, from its layers (or kohya's metadata); None if unsure."""
    modules = [layer.module for (component, _), layer in header.layers.items() if component == "denoiser"]
    text = " ".join(modules)
    if any(s in text for s in ("single_transformer_blocks", "double_blocks", "single_blocks")):
        return "Flux"
    # Top-level transformer blocks are a DiT's: SD3's MMDiT attends jointly (`attn`, with `add_k_proj` for the text),
    # PixArt's blocks have self- and cross-attention (`attn1`, `attn2`), as diffusers' SD3Transformer2DModel and
    # PixArtTransformer2DModel name them; kohya's SD3 names are the MMDiT's `joint_blocks`.
    dit = [m for m in modules if m.startswith("transformer_blocks.")]
    if "joint_blocks" in text or "context_embedder" in text or any(".attn." in m for m in dit):
        return "SD3"
    if "adaln_single" in text or "caption_projection" in text or any(".attn2." in m for m in dit):
        return "PixArt"
    for (component, module), layer in header.layers.items():
        if component == "denoiser" and re.search(r"attn2[._]to_k$", module) and layer.down and len(layer.down) == 2:
            family = _CROSS_ATTENTION_FAMILY.get(layer.down[1])
            if family:
                return family
    version = str(header.metadata.get("ss_base_model_version", "")).lower()
    for prefix, family in _BASE_VERSIONS:
        if version.startswith(prefix):
            return family
    if any(component == "text_encoder_2" for component, _ in header.layers):
        return "SDXL"
    return None


def display_name(raw: str) -> str:
    """A LoRA's name as A1111's `<lora:name:scale>` can carry it: the file name without extension (.safetensors, or
    .tar for a trainer's output), letters, digits and `._-` kept, other characters `_` (A1111 itself strips `:` and
    `,` from the names in `Lora hashes`)."""
    stem = re.sub(r"\.(safetensors|tar)$", "", PurePosixPath(raw.replace("\\", "/")).name, flags=re.IGNORECASE)
    name = re.sub(r"[^\w.-]+", "_", stem, flags=re.ASCII).strip("._-")
    return name[:80] or "lora"


def a1111_hash(path: Path, metadata: Mapping[str, str]) -> str:
    """The short hash Automatic1111 writes in `Lora hashes` for this file: the first 12 hex digits of the kohya
    `sshs_model_hash` metadata, else of the sha256 of the file after its header (A1111's
    extensions-builtin/Lora/network.py, NetworkOnDisk: `set_hash(metadata.get('sshs_model_hash') or
    hashes.sha256_from_cache(..., use_addnet_hash=is_safetensors))`, `shorthash = hash[0:12]`; the hash is
    modules/hashes.py's addnet_hash_safetensors: sha256 of everything after the 8-byte length and the header)."""
    given = str(metadata.get("sshs_model_hash") or "").strip().lower()
    if re.fullmatch(r"[0-9a-f]{12,64}", given):
        return given[:12]
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]
