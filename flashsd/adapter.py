"""The Flash adapter: reading its LoRA layers from the file's header, checking that each one fits the
denoiser, and merging it in as the model card does (LoRA files fused and unloaded, PEFT adapters merged and
unloaded), verified: an adapter that lands nowhere is an error, never the silent no-op diffusers makes of it.

One parser reads every key scheme the LoRA files in use have (header only, milliseconds for any size):

| scheme | down / up keys | used by |
|---|---|---|
| PEFT `save_pretrained` | `base_model.model.<module>.lora_A.weight` / `lora_B` | flash-sd3, flash-pixart |
| diffusers (PEFT era) | `unet.<module>.lora_A.weight` / `lora_B` (`transformer.` too) | most diffusers LoRAs |
| diffusers (before PEFT) | `unet.<module>.lora.down.weight` / `lora.up` | flash-sdxl, flash-sd (REFERENCE §1b) |
| diffusers attention processors | `unet.<path>.processor.to_q_lora.down.weight` | the oldest diffusers files |
| kohya / A1111 | `lora_unet_<module_with_underscores>.lora_down.weight` / `lora_up`, `.alpha` | CivitAI files |
| kohya SDXL | the same, with the UNet's SGM names: `lora_unet_input_blocks_4_1_…`, `lora_te1_` / `lora_te2_` | CivitAI files |
| diffusers text encoder (before PEFT) | `text_encoder.<module>.lora_linear_layer.down.weight` / `up` | old diffusers files |

kohya's sd-scripts trains SDXL on its own UNet (`library/sdxl_original_unet.py`), whose blocks keep the SGM
names `input_blocks` / `middle_block` / `output_blocks`; check_fit maps them onto diffusers' UNet as diffusers'
loader does (`_maybe_map_sgm_blocks_to_diffusers`, `_convert_unet_lora_key` in diffusers/loaders/
lora_conversion_utils.py), so a file is checked against the very modules diffusers will attach it to.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import WeightsError
from .models import FlashModel

log = logging.getLogger("flashsd")

ADAPTER_NAME = "flash"
# The component a key's prefix names; "denoiser" is the UNet or the transformer, whichever the model has.
_COMPONENT_PREFIXES = {
    "base_model.model.": "denoiser",
    "unet.": "denoiser",
    "transformer.": "denoiser",
    "lora_unet_": "denoiser",
    "lora_transformer_": "denoiser",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_HALVES = (  # (pattern of what follows the module name, which half)
    (re.compile(r"\.lora_A(?:\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"\.lora\.down\.weight$"), "down"),
    (re.compile(r"\.lora\.up\.weight$"), "up"),
    (re.compile(r"\.lora_down\.weight$"), "down"),
    (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.lora_linear_layer\.down\.weight$"), "down"),
    (re.compile(r"\.lora_linear_layer\.up\.weight$"), "up"),
)
# ...attn1.processor.to_q_lora.down.weight: the LoRA of attn1.to_q (to_out means to_out.0)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_ALPHA = re.compile(r"\.alpha$")
# SGM UNet names (underscored, as kohya writes them) -> diffusers' (see the table above).
_SGM_BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_SGM_MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)$")
_SGM_FIXED = {  # modules outside the block structure
    "input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}  # fmt: skip
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut", "op": "conv"}  # fmt: skip


class AdapterError(WeightsError):
    """A Flash adapter file that cannot be merged as it is: the message names the file, the layers and the fix."""


@dataclass
class LoraLayer:
    """One LoRA layer of a file: the module it targets and the shapes of its two halves."""

    component: str  # "denoiser", "text_encoder", "text_encoder_2"
    module: str  # dotted module name; kohya files give it with underscores (resolved against the model)
    down: tuple[int, ...] | None = None  # (rank, in[, kh, kw])
    up: tuple[int, ...] | None = None  # (out, rank[, 1, 1])
    keys: list[str] = field(default_factory=list)
    underscored: bool = False  # kohya naming: dots became underscores


def _split(key: str) -> tuple[str, str, str] | None:
    """(component, module, half) of a LoRA key, or None for a key of no scheme this module reads."""
    prefix = next((p for p in _COMPONENT_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None
    component, rest = _COMPONENT_PREFIXES[prefix], key[len(prefix) :]
    processor = _PROCESSOR.search(rest)
    if processor:
        target = "to_out.0" if processor.group(1) == "to_out" else processor.group(1)
        return component, f"{rest[: processor.start()]}.{target}", processor.group(2)
    for pattern, half in _HALVES:
        match = pattern.search(rest)
        if match:
            return component, rest[: match.start()], half
    if _ALPHA.search(rest):
        return component, rest[: -len(".alpha")], "alpha"
    return None


def lora_layers(shapes: Mapping[str, Sequence[int]]) -> dict[tuple[str, str], LoraLayer]:
    """The LoRA layers that `shapes` (key → tensor shape, as a safetensors header gives them) holds, by
    (component, module). Keys of no known scheme are left out; a layer with only one half keeps None for the
    other (check_fit reports it)."""
    layers: dict[tuple[str, str], LoraLayer] = {}
    for key, shape in shapes.items():
        parts = _split(key)
        if parts is None:
            continue
        component, module, half = parts
        layer = layers.setdefault(
            (component, module), LoraLayer(component, module, underscored=key.startswith("lora_"))
        )
        layer.keys.append(key)
        if half != "alpha":
            setattr(layer, half, tuple(int(n) for n in shape))
    return {k: v for k, v in layers.items() if v.down is not None or v.up is not None}


def sgm_to_diffusers(name: str, layers_per_block: int) -> str | None:
    """The diffusers UNet module (underscored) that an underscored SGM module name stands for, or None for a name
    that is not SGM. Block arithmetic as diffusers' _maybe_map_sgm_blocks_to_diffusers: input block i > 0 is layer
    (i - 1) % (n + 1) of down block (i - 1) // (n + 1), the last of each being its downsampler; output block i is
    layer i % (n + 1) of up block i // (n + 1); sub-block 0 is a resnet, 1 an attention, 2 an upsampler."""
    if name in _SGM_FIXED:
        return _SGM_FIXED[name]
    per = layers_per_block + 1
    if match := _SGM_MIDDLE.match(name):
        index, rest = int(match.group(1)), match.group(2)
        inner = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(index)
        return None if inner is None else f"mid_block_{inner}_{_SGM_RESNET.get(rest, rest)}"
    match = _SGM_BLOCK.match(name)
    if not match:
        return None
    kind, index, sub, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
    if kind == "input_blocks":
        block, layer = divmod(index - 1, per)
        inner = "downsamplers_0" if rest == "op" else f"{('resnets', 'attentions')[min(sub, 1)]}_{layer}"
        return f"down_blocks_{block}_{inner}_{_SGM_RESNET.get(rest, rest)}"
    block, layer = divmod(index, per)
    inner = "upsamplers_0" if sub >= 2 else f"{('resnets', 'attentions')[sub]}_{layer}"
    return f"up_blocks_{block}_{inner}_{_SGM_RESNET.get(rest, rest)}"


def read_lora_layers(path: Path) -> dict[tuple[str, str], LoraLayer]:
    """The LoRA layers of a safetensors file, from its header alone."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return lora_layers({key: f.get_slice(key).get_shape() for key in f.keys()})


def weights_file(model: FlashModel, adapter_dir: Path) -> Path:
    return adapter_dir / next(f for f in model.adapter.files if f.endswith(".safetensors"))


@dataclass(frozen=True)
class Fit:
    """What check_fit found: the denoiser modules the file's layers target (by their dotted names), and the
    layers left out because they name modules of the trainer's own wrapper (REFERENCE §1b, PixArt)."""

    modules: tuple[str, ...]
    foreign: tuple[str, ...]


def _shape_problem(layer: LoraLayer, weight: torch.Tensor) -> str | None:
    target = tuple(weight.shape)
    if layer.down is None or layer.up is None:
        missing = "down (A)" if layer.down is None else "up (B)"
        return f"its {missing} half is missing"
    down, up = layer.down, layer.up
    fits = (
        len(down) == len(target)
        and down[1:] == target[1:]  # (rank, in[, kh, kw]) against (out, in[, kh, kw])
        and len(up) == len(target)
        and up[0] == target[0]  # (out, rank[, 1, 1])
        and up[1] == down[0]
    )
    return None if fits else f"down {list(down)} and up {list(up)} do not fit its weight of shape {list(target)}"


def check_fit(
    layers: Mapping[tuple[str, str], LoraLayer],
    denoiser: torch.nn.Module,
    *,
    foreign: Iterable[str] = (),
    source: str = "the adapter",
    component: str = "denoiser",
) -> Fit:
    """Check every denoiser layer of a LoRA file against the denoiser before anything is attached: the module
    it names must exist and have the shape the two halves were made for. `foreign`: module names known to
    exist only in the trainer's own model, skipped when the denoiser has no such module. Raises AdapterError
    naming the layers that do not fit, and when the file holds no denoiser LoRA layer at all (a check that
    found nothing to check is no pass). `component` ("text_encoder", "text_encoder_2") checks that component's
    layers against `denoiser` instead (then a text encoder)."""
    modules = dict(denoiser.named_modules())
    underscored = {name.replace(".", "_"): name for name in modules}
    config = getattr(denoiser, "config", None)  # a diffusers UNet's; text encoders and transformers have no SGM names
    layers_per_block = getattr(config, "layers_per_block", None) if component == "denoiser" else None
    if isinstance(layers_per_block, int):
        for layer in layers.values():
            sgm = sgm_to_diffusers(layer.module, layers_per_block) if layer.underscored else None
            if sgm in underscored:
                underscored.setdefault(layer.module, underscored[sgm])
    foreign = set(foreign)
    targeted, skipped, problems = [], [], []
    denoiser_layers = [layer for (c, _), layer in sorted(layers.items()) if c == component]
    if not denoiser_layers:
        raise AdapterError(
            f"{source} holds no LoRA layer for the {type(denoiser).__name__}: none of its keys is of a LoRA scheme "
            "flashsd reads (PEFT `lora_A`/`lora_B`, diffusers `unet.…lora.down`/`lora.up`, kohya `lora_unet_…`)."
        )
    for layer in denoiser_layers:
        name = underscored.get(layer.module, layer.module) if layer.underscored else layer.module
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if module is None or not isinstance(weight, torch.Tensor):
            if name in foreign:
                skipped.append(name)
            else:
                problems.append(f"{layer.keys[0]}: the {type(denoiser).__name__} has no layer {name!r}")
            continue
        problem = _shape_problem(layer, weight)
        if problem:
            problems.append(f"{layer.keys[0]}: layer {name!r}: {problem}")
        else:
            targeted.append(name)
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise AdapterError(
            f"{source}: {len(problems)} of its {len(denoiser_layers)} layers do not match the "
            f"{type(denoiser).__name__} ({'; '.join(problems[:2])}{more})"
        )
    return Fit(tuple(targeted), tuple(skipped))


def _fingerprints(module: torch.nn.Module, modules: Iterable[str]) -> dict[str, float]:
    """One number per weight of the named submodules (those the adapter targets), enough to tell which of them an
    adapter changed without a second copy. Only those: a pass over every weight of SDXL's UNet reads 5 GB twice per
    setup for nothing. (float32 accumulation: float64 would copy every weight and took 15x longer.)"""
    with torch.no_grad():
        weights = {
            f"{prefix}.{name}": p for prefix in modules for name, p in module.get_submodule(prefix).named_parameters()
        }
        if not weights:
            return {}
        # One transfer for all of them (on a GPU, one synchronisation rather than one per weight).
        norms = torch.stack([torch.linalg.vector_norm(p, dtype=torch.float32) for p in weights.values()]).tolist()
    return dict(zip(weights, norms))


def _tuned_modules(module: torch.nn.Module, prefix: str = "") -> set[str]:
    """Dotted names (without `prefix`) of the modules that carry an adapter layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name.removeprefix(prefix) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def merge(pipe, model: FlashModel, adapter_dir: Path) -> int:
    """Merge the Flash adapter into `pipe`'s denoiser as the model card does, leaving no adapter layer.
    Returns the number of weights it changed. Any failure is an AdapterError naming the file and the fix."""
    path = weights_file(model, adapter_dir)
    fix = f"Fetch the pinned files again with `scripts/download-weights --model {model.key} --verify`."
    source = f"The Flash adapter {path} does not fit {model.base.id}"
    try:
        return _merge(pipe, model, adapter_dir, path, source)
    except AdapterError as e:
        raise AdapterError(f"{e} {fix}") from e
    except Exception as e:  # a loader's error on a file that passed the checks: still this file's fault
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise AdapterError(f"{source} ({type(e).__name__}: {first}). {fix}") from e


def _merge(pipe, model: FlashModel, adapter_dir: Path, path: Path, source: str) -> int:
    denoiser = getattr(pipe, model.denoiser)
    fit = check_fit(read_lora_layers(path), denoiser, foreign=model.adapter_foreign_layers, source=source)
    before = _fingerprints(denoiser, fit.modules)
    if model.adapter_format == "lora":
        pipe.load_lora_weights(adapter_dir, weight_name=path.name, adapter_name=ADAPTER_NAME)
        attached = _tuned_modules(getattr(pipe, model.denoiser))
        pipe.fuse_lora(adapter_names=[ADAPTER_NAME], lora_scale=1.0)
        pipe.unload_lora_weights()
    else:
        from peft import PeftModel

        with warnings.catch_warnings():
            # peft warns about the wrapper-only layers ("Found missing adapter keys"); they are counted below.
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            with_adapter = PeftModel.from_pretrained(denoiser, adapter_dir)
        attached = _tuned_modules(with_adapter, prefix="base_model.model.")
        pipe.register_modules(**{model.denoiser: with_adapter.merge_and_unload()})
    denoiser = getattr(pipe, model.denoiser)
    changed = sum(1 for name, value in _fingerprints(denoiser, fit.modules).items() if before.get(name) != value)
    not_attached = sorted(set(fit.modules) - attached)
    if not_attached or changed == 0:
        raise AdapterError(
            f"{source}: {len(fit.modules) - len(not_attached)} of its {len(fit.modules)} {model.denoiser} layers "
            f"attached ({', '.join(not_attached[:3]) or 'none missing'}) and {changed} weights changed."
        )
    if _tuned_modules(denoiser):
        raise AdapterError(f"{source}: adapter layers were left after merging.")
    if fit.foreign:
        log.info(
            "Flash adapter: %d layer(s) name modules of the trainer's own %s wrapper and were skipped, as the "
            "model card's loader skips them (%s)",
            len(fit.foreign), type(denoiser).__name__, ", ".join(fit.foreign),
        )  # fmt: skip
    return changed
