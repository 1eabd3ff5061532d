"""Style LoRA files in the formats users bring, for the tiny models of testkit/tiny_repos.py (and, for the wrong-family
cases, at the real models' shapes).

Formats (what `write_lora` writes):

- `diffusers`: what diffusers' own `save_lora_weights` writes today (the writer is called here): keys
  `unet.<module>.lora_A.weight` / `lora_B.weight` (`transformer.` for SD3, `text_encoder.` / `text_encoder_2.` for
  the text encoders), metadata `{"format": "pt", "lora_adapter_metadata": <LoraConfig as JSON>}` carrying rank and
  alpha (diffusers >= 0.34, `_collate_lora_metadata` in its training scripts), here alpha != rank so that a loader
  that ignores the metadata scales the layers wrongly.
- `diffusers-plain`: the same writer without adapter metadata (diffusers 0.2x-0.33 files): alpha = rank.
- `kohya`: kohya-ss/sd-scripts `networks/lora.py` (LoRANetwork): keys `lora_unet_<module>` / `lora_te_` (SD1.5) /
  `lora_te1_`, `lora_te2_` (SDXL), module names with `.` turned into `_`, halves `.lora_down.weight` /
  `.lora_up.weight` and a 0-dim `.alpha` per layer (`register_buffer("alpha", torch.tensor(alpha))`), every tensor
  in the save dtype (fp16 here), `ss_*` training metadata. SDXL is trained on sd-scripts' own UNet
  (`library/sdxl_original_unet.py`), whose blocks keep the SGM names `input_blocks` / `middle_block` /
  `output_blocks` and resnet layers `in_layers.2` / `emb_layers.1` / `out_layers.3` (the map from diffusers' names
  is sd-scripts' `library/sdxl_model_util.py`, `make_unet_conversion_map`); SD1.5 on diffusers' UNet, so its names
  are diffusers' own. Targets: Transformer2DModel's linear layers, resnet `conv1` (LoCon, `conv_dim`) and
  `time_emb_proj`, CLIP's attention and MLP (`TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPMLP"]`).

Every layer is random (seeded): A ~ N(0, 1/in), B scaled so the layer changes its weight by `RELATIVE_CHANGE` of its
norm, large enough to change a tiny model's image visibly.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import torch

from flashsd.models import MODELS
from flashsd.weights import repo_dir

FORMATS = ("diffusers", "diffusers-plain", "kohya")
RANK, ALPHA = 4, 2.0  # alpha != rank: the scale alpha / rank must be read from the file
RELATIVE_CHANGE = 0.3
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "time_emb_proj")  # fmt: skip
SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
KOHYA_TE_PREFIX = {
    "sd15": {"text_encoder": "lora_te"},
    "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}  # sd-scripts' ss_base_model_version


# -- the tiny models' modules ------------------------------------------------------------------------------------


def components(root: Path, model_key: str) -> dict[str, torch.nn.Module]:
    """The denoiser and text encoders of a tiny model, fp32, by their pipeline names."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model = MODELS[model_key]
    base = repo_dir(root, model.base)
    variant = {"variant": model.variant} if model.variant else {}
    found = {}
    if model.denoiser == "unet":
        found["unet"] = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **variant)
    else:
        found["transformer"] = SD3Transformer2DModel.from_pretrained(base, subfolder="transformer", **variant)
    classes = {
        "sd15": {"text_encoder": CLIPTextModel},
        "sdxl": {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection},
        "sd3": {"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection},
    }
    for name, cls in classes[model_key].items():
        found[name] = cls.from_pretrained(base, subfolder=name, **variant)
    return {name: m.float().eval() for name, m in found.items()}


def _targets(component: str, model_key: str) -> tuple[str, ...]:
    if component.startswith("text_encoder"):
        return CLIP_TARGETS
    return SD3_TARGETS if model_key == "sd3" else UNET_TARGETS


def random_layers(module: torch.nn.Module, targets, seed: int, salt: str, rank: int = RANK, alpha: float = ALPHA):
    """{module name: (A, B)} for every Linear / Conv2d whose name ends with a target (peft's suffix rule)."""
    layers = {}
    for name, m in module.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not any(
            name == t or name.endswith("." + t) for t in targets
        ):
            continue
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{salt}/{name}".encode()))
        weight = m.weight.detach().float()
        if isinstance(m, torch.nn.Conv2d):
            a = torch.randn(rank, *weight.shape[1:], generator=generator) / math.sqrt(weight[0].numel())
            b = torch.randn(weight.shape[0], rank, 1, 1, generator=generator)
            delta = b.flatten(1) @ a.flatten(1)
        else:
            a = torch.randn(rank, weight.shape[1], generator=generator) / math.sqrt(weight.shape[1])
            b = torch.randn(weight.shape[0], rank, generator=generator)
            delta = b @ a
        b *= RELATIVE_CHANGE * weight.norm() / ((alpha / rank) * delta.norm())
        layers[name] = (a.contiguous(), b.contiguous())
    assert layers, f"no layer of {type(module).__name__} matches {targets}"
    return layers


# -- SGM names (kohya's SDXL) ------------------------------------------------------------------------------------

_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}  # fmt: skip


def sgm_name(module: str, layers_per_block: int) -> str:
    """diffusers UNet module name -> sd-scripts' SDXL UNet name (sdxl_model_util.py's conversion map, reversed)."""
    per = layers_per_block + 1

    def inner(kind: str, rest: str) -> tuple[int, str]:
        if kind == "resnets":
            first, _, tail = rest.partition(".")
            return 0, _RESNET_SGM.get(first, first) + (f".{tail}" if tail else "")
        return 1, rest

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", module):
        sub, rest = inner(m.group(2), m.group(4))
        return f"input_blocks.{1 + int(m.group(1)) * per + int(m.group(3))}.{sub}.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", module):
        sub, rest = inner(m.group(2), m.group(4))
        return f"output_blocks.{int(m.group(1)) * per + int(m.group(3))}.{sub}.{rest}"
    if m := re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", module):
        _, rest = inner(m.group(1), m.group(3))
        index = 1 if m.group(1) == "attentions" else (0 if m.group(2) == "0" else 2)
        return f"middle_block.{index}.{rest}"
    raise ValueError(f"no SGM name for {module}")


# -- writing ------------------------------------------------------------------------------------------------------


def write_lora(
    path: Path,
    root: Path,
    model_key: str,
    fmt: str,
    *,
    seed: int = 0,
    text_encoders: bool = True,
    rank: int = RANK,
    alpha: float = ALPHA,
    targets: tuple[str, ...] | None = None,
) -> Path:
    """A style LoRA for the tiny `model_key` of the weights `root`, in format `fmt` (FORMATS), at `path`. `targets`:
    module name suffixes to use instead of the format's usual ones (in every component)."""
    if fmt not in FORMATS or (fmt == "kohya" and model_key not in KOHYA_TE_PREFIX):
        raise ValueError(f"no {fmt!r} LoRA fixture for {model_key}")
    alpha = float(rank) if fmt == "diffusers-plain" else alpha
    modules = components(root, model_key)
    if not text_encoders:
        modules = {k: v for k, v in modules.items() if not k.startswith("text_encoder")}
    layers = {c: random_layers(m, targets or _targets(c, model_key), seed, f"{model_key}/{c}", rank, alpha)
              for c, m in modules.items()}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "kohya":
        _write_kohya(path, model_key, modules, layers, rank, alpha)
    else:
        _write_diffusers(path, model_key, layers, rank, alpha, with_metadata=fmt == "diffusers")
    return path


def _write_diffusers(path: Path, model_key: str, layers, rank: int, alpha: float, with_metadata: bool) -> None:
    import diffusers
    from peft import LoraConfig

    pipeline = getattr(diffusers, MODELS[model_key].pipeline)
    arguments = {}
    for component, found in layers.items():
        arguments[f"{component}_lora_layers"] = {
            f"{name}.{half}.weight": tensor
            for name, (a, b) in found.items()
            for half, tensor in (("lora_A", a), ("lora_B", b))
        }
        if with_metadata:
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(found))
            arguments[f"{component}_lora_adapter_metadata"] = config.to_dict()
    pipeline.save_lora_weights(path.parent, weight_name=path.name, safe_serialization=True, **arguments)


def _write_kohya(path: Path, model_key: str, modules, layers, rank: int, alpha: float) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for component, found in layers.items():
        for name, (a, b) in found.items():
            if component == "unet":
                module = sgm_name(name, modules["unet"].config.layers_per_block) if model_key == "sdxl" else name
                prefix = "lora_unet"
            else:
                module, prefix = name, KOHYA_TE_PREFIX[model_key][component]
            key = f"{prefix}_{module.replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = a.half()
            tensors[f"{key}.lora_up.weight"] = b.half()
            tensors[f"{key}.alpha"] = torch.tensor(alpha).half()
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_base_model_version": BASE_VERSION[model_key], "ss_output_name": path.stem, "ss_mixed_precision": "fp16",
        "ss_tag_frequency": json.dumps({"img": {"style": 1}}),
    }  # fmt: skip
    save_file(tensors, path, metadata=metadata)


def write_real_shaped(path: Path, model_key: str, *, rank: int = 1) -> Path:
    """A LoRA at the real `model_key` denoiser's shapes on its attention projections (from the committed real config,
    built on the meta device): kohya keys for SD1.5, diffusers keys otherwise. What a user brings for another family."""
    from safetensors.torch import save_file

    from testkit.real_size import meta_denoiser

    denoiser = meta_denoiser(model_key)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, m in denoiser.named_modules():
        if isinstance(m, torch.nn.Linear) and re.search(r"attn\d?\.(to_q|to_k|to_v|to_out\.0)$", name):
            out_features, in_features = m.weight.shape
            a = torch.randn(rank, in_features, generator=generator).half()
            b = torch.randn(out_features, rank, generator=generator).half()
            if model_key == "sd15":
                key = "lora_unet_" + name.replace(".", "_")
                tensors |= {
                    f"{key}.lora_down.weight": a,
                    f"{key}.lora_up.weight": b,
                    f"{key}.alpha": torch.tensor(1.0).half(),
                }
            else:
                prefix = "unet" if MODELS[model_key].denoiser == "unet" else "transformer"
                tensors |= {f"{prefix}.{name}.lora_A.weight": a, f"{prefix}.{name}.lora_B.weight": b}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def write_pickle(path: Path, legacy: bool = False) -> Path:
    """A LoRA as a PyTorch pickle (.ckpt / .pt): the zip container of torch.save, or its legacy format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"lora_unet_x.lora_down.weight": torch.zeros(1, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 1)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def addnet_hash(path: Path) -> str:
    """sha256 of a safetensors file after its 8-byte length and header, computed here from the bytes."""
    import hashlib

    data = Path(path).read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
