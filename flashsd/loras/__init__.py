"""Style LoRAs at run time: any LoRA trained for the base model, applied on top of the merged Flash adapter.

Flash Diffusion's "training-free LoRA acceleration" (Jasper's README: the Flash LoRA and a style LoRA loaded as two
adapters, combined unfused with `set_adapters(["flash", "style"], [1.0, scale])`). flashsd gives the same images
but runs the forward pass fused, so a prediction with a LoRA costs what one without costs. One concern a module:

- `sources`: what `lora_weights` / `extra_lora` may name: an http(s) URL of a safetensors file (CivitAI download
  links carry no extension) or of a trainer's tar holding `lora.safetensors`, a Hugging Face repo `owner/name` (its
  single .safetensors file) or `owner/name/file.safetensors`.
- `fetch`: the download (httpx2, or huggingface_hub with HF_TOKEN, never said), at most FLASHSD_LORA_MAX_GB per file
  (refused from Content-Length or the hub's size before a byte is fetched, and while streaming); a URL's query
  (where CivitAI keys go) is never logged. Of a tar only its `lora.safetensors` is read.
- `header`: only safetensors (a pickle gets a message saying so); the header's layers are parsed by
  flashsd.adapter's key parser, so that `fuse` checks them against the very modules they target (a LoRA of another
  family is refused naming both families) before anything is loaded.
- `cache`: files on disk and state dicts in memory, least recently used evicted.
- `fuse`: fused with exact restore (`StyleLoras.apply`).
- `trained`: a model version made from a training: the training's tar, given to setup (COG_WEIGHTS), is every
  prediction's LoRA unless it names its own.
"""

from ..models import lora_models as able_models
from .sources import LoraError, LoraSource, StyleLora, TrainedLora, parse_lora_source

__all__ = [
    "AppliedLora", "LoraError", "LoraSource", "StyleLora", "StyleLoras", "TrainedLora", "able_models", "parse_lora_source",
]  # fmt: skip


def __getattr__(name: str):
    """The fusing side (torch, the caches, the downloads) loads on first use, so that request.py's import of
    .sources brings no more than the parsing."""
    if name in ("AppliedLora", "StyleLoras"):
        from . import fuse

        return getattr(fuse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
