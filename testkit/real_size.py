"""Real-size Flash adapters without their weights.

The four real denoisers are built from their committed configs (testkit/real_configs/, sources in SOURCES.md there)
on the meta device: every module at its real shape, no memory. From them the adapter files are written with the
real files' exact key set, shapes, dtype (fp32) and metadata, as *sparse* safetensors files: a valid header, then
the data region left as a hole (`truncate` to the full size), so a 372 MB file takes no disk and no time.
The loaders under test read the header (real keys and shapes) and attach meta tensors built from it.

The key sets follow the rules that made the real files (gojasper/flash-diffusion's training scripts, see
testkit/tiny_repos.py "the Flash adapters"): peft's suffix matching of the training LoraConfig's target names over
the trainer's model — diffusers' UNet for SDXL / SD1.5 (saved with old diffusers keys), diffusers' SD3
transformer, and for PixArt Jasper's wrapper (diffusers' PixArt with its own AdaLN) or, as the alternative,
diffusers' PixArt itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flashsd.models import MODELS
from testkit.tiny_repos import (
    ADAPTER_NAMINGS,
    FLASH_LORA_RANK,
    FLASH_PEFT_ALPHA,
    FLASH_PEFT_TARGETS,
    FLASH_UNET_LORA_TARGETS,
    _quiet,
    as_flash_pixart_wrapper,
    lora_file_key,
    peft_file_key,
    write_peft_adapter_config,
)

REAL_CONFIGS = Path(__file__).resolve().parent / "real_configs"
DENOISER_CONFIGS = {
    "sdxl": "sdxl/unet/config.json",
    "sd15": "sd15/unet/config.json",
    "sd3": "sd3/transformer/config.json",
    "pixart": "pixart/transformer/config.json",
}
# safetensors dtype names (the header's "dtype") and their torch types.
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def real_config(model_key: str) -> dict:
    """The real denoiser's config.json (committed copy)."""
    return json.loads((REAL_CONFIGS / DENOISER_CONFIGS[model_key]).read_text(encoding="utf-8"))


def meta_denoiser(model_key: str) -> torch.nn.Module:
    """The real denoiser built from its committed config on the meta device: real module tree and shapes, no
    memory. PixArt's config names the old class Transformer2DModel; diffusers' pipeline builds it as
    PixArtTransformer2DModel, and so does this."""
    from accelerate import init_empty_weights
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls = {"sdxl": UNet2DConditionModel, "sd15": UNet2DConditionModel, "sd3": SD3Transformer2DModel,
           "pixart": PixArtTransformer2DModel}[model_key]  # fmt: skip
    with init_empty_weights(), _quiet():
        model = cls.from_config(real_config(model_key))
    return model.eval()


def is_peft(model_key: str) -> bool:
    return MODELS[model_key].adapter_format == "peft"


def weights_name(model_key: str) -> str:
    """The adapter repo's weights file name (pytorch_lora_weights.safetensors / adapter_model.safetensors)."""
    return next(name for name in MODELS[model_key].adapter.files if name.endswith(".safetensors"))


def _check_naming(model_key: str, naming: str) -> None:
    if naming not in ADAPTER_NAMINGS:
        raise ValueError(f"naming must be one of {ADAPTER_NAMINGS}, not {naming!r}")
    if model_key != "pixart" and naming != "wrapper":
        raise ValueError(f"only PixArt's adapter has a diffusers-named variant, not {model_key!r}")


def adapter_layout(model_key: str, naming: str = "wrapper") -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{module name: (LoRA A shape, LoRA B shape)} of the real Flash adapter: the layers peft creates for the
    training LoraConfig on the trainer's model (built on the meta device). `naming` (PixArt only): "wrapper" for
    Jasper's DiffusersTransformer2DWrapper (the real file, most likely), "diffusers" for diffusers' PixArt."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    _check_naming(model_key, naming)
    model = meta_denoiser(model_key)
    rank = FLASH_LORA_RANK[model_key]
    if is_peft(model_key):
        config = LoraConfig(r=rank, lora_alpha=FLASH_PEFT_ALPHA, target_modules=FLASH_PEFT_TARGETS)
        if model_key == "pixart" and naming == "wrapper":
            model = as_flash_pixart_wrapper(model)
    else:
        config = LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=FLASH_UNET_LORA_TARGETS
        )
    with _quiet():
        inject_adapter_in_model(config, model, adapter_name="flash", low_cpu_mem_usage=True)
    return {
        name: (tuple(module.lora_A["flash"].weight.shape), tuple(module.lora_B["flash"].weight.shape))
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def adapter_tensor_shapes(model_key: str, naming: str = "wrapper") -> dict[str, tuple[int, ...]]:
    """{key: shape} of every tensor of the real adapter file."""
    key_of = peft_file_key if is_peft(model_key) else lora_file_key
    shapes = {}
    for module, (a, b) in adapter_layout(model_key, naming).items():
        shapes[key_of(module, "lora_A")] = a
        shapes[key_of(module, "lora_B")] = b
    return shapes


def safetensors_header(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], dtype: str = "F32") -> bytes:
    """The header safetensors' own serializer writes for these tensors (all of one dtype): compact JSON,
    "__metadata__" first, tensors in name order with consecutive data offsets, padded with spaces to a multiple
    of 8 bytes; the 8-byte little-endian length in front."""
    itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(shapes):
        size = itemsize * _numel(shapes[name])
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> int:
    """Write a valid fp32 safetensors file of these tensors whose data region is a hole: the header, then the
    file extended to its full length without writing (all tensors read as zeros). Returns the file's size."""
    header = safetensors_header(shapes, metadata)
    data = 4 * sum(_numel(shape) for shape in shapes.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data)
    return len(header) + data


def write_real_size_adapter(model_key: str, folder: Path, naming: str = "wrapper") -> Path:
    """The real Flash adapter of `model_key` at real size, sparse, in `folder`: the weights file under its real
    name (fp32, metadata {"format": "pt"}) and, for the PEFT adapters, adapter_config.json (the same one the tiny
    fixtures carry: nothing in it depends on the model's size). Returns the weights file."""
    _check_naming(model_key, naming)
    folder = Path(folder)
    path = folder / weights_name(model_key)
    write_sparse_safetensors(path, adapter_tensor_shapes(model_key, naming), {"format": "pt"})
    if is_peft(model_key):
        write_peft_adapter_config(folder, model_key, naming)
    return path


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """A safetensors file's header: ({tensor name: {"dtype", "shape", "data_offsets"}}, metadata). Reads only
    the header bytes."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    metadata = header.pop("__metadata__", {})
    return header, metadata


def meta_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors of their real shapes and dtypes (from the header; no data read)."""
    header, _ = read_header(path)
    return {
        name: torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]], device="meta")
        for name, info in header.items()
    }


def file_layers(path: Path) -> set[str]:
    """The module names a LoRA or PEFT adapter file holds layers for (either key scheme)."""
    header, _ = read_header(path)
    layers = set()
    for key in header:
        for suffix in (".lora.down.weight", ".lora.up.weight", ".lora_A.weight", ".lora_B.weight"):
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                layers.add(module.removeprefix("unet.").removeprefix("base_model.model."))
                break
        else:
            raise ValueError(f"{path.name}: not a LoRA key: {key}")
    return layers
