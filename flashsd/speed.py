"""The fast path: what a loaded pipeline gets once the Flash adapter is merged, and the opt-in compiled
mode (`FLASHSD_COMPILE=1`).

Eager (the default) is the pipeline diffusers builds, kept as it is where that is already the fast
choice, and checked to stay so (`fast_path_problems`, asserted by tests/test_speed_structure.py):
fp16 on CUDA everywhere, the VAE included (SDXL uses the fp16-fix VAE, so diffusers never upcasts it);
the adapter fused/merged and its layers unloaded; PyTorch SDPA attention; no attention slicing, no VAE
slicing or tiling; weights loaded straight onto the device (`device_map` in Engine.load); one batched
pipeline call per prediction, the prompt encoded once and repeated by diffusers. Nothing here changes
the images of the eager path.

Compiled mode, on top of that: QKV projections fused, the UNet and VAE in channels_last (inductor
writes its own GroupNorm kernels for that layout; eager PyTorch copies channels_last activations back
to NCHW around every CUDA GroupNorm, which is why eager keeps NCHW until a GPU run of
`bench/run.py --sections layout` shows otherwise), `torch.compile` on the denoiser's repeated blocks
(regional compilation: the transformer blocks, and a UNet's resnets) and on the VAE decoder, with
dynamic shapes so that one graph serves every size;
then a warm-up in setup at every size of the aspect-ratio table, at batch 1 and 2 (dynamic graphs
specialise on size-1 dimensions), so no prediction pays for a compile. The compiler's caches live beside
the weights (`<weights>/.torch-compile-cache/`): a restarted container with the same weights folder
reuses them and its warm-up is mostly cache hits.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models import FlashModel
from .runtime import Runtime

log = logging.getLogger("flashsd")

CACHE_FOLDER = ".torch-compile-cache"
MEGA_CACHE_SUFFIX = ".megacache"
WARM_UP_BATCHES = (1, 2)

# Regional compilation: the blocks each denoiser repeats. diffusers 0.42 declares `_repeated_blocks` on
# UNet2DConditionModel (BasicTransformerBlock) and compiles them in `compile_repeated_blocks`; the SD3 and
# PixArt transformers declare none, so their blocks are named here.
REPEATED_BLOCKS: Mapping[str, tuple[str, ...]] = {
    "SD3Transformer2DModel": ("JointTransformerBlock",),
    "PixArtTransformer2DModel": ("BasicTransformerBlock",),
}
# Compiled as well: a UNet's resnets hold its convolutions and most of its GroupNorms, the work that
# channels_last speeds up once inductor fuses GroupNorm + SiLU in that layout; left eager they would
# pay eager GroupNorm's layout copies instead.
EXTRA_REGIONS: Mapping[str, tuple[str, ...]] = {"UNet2DConditionModel": ("ResnetBlock2D",)}
# Convolutional components that run channels_last when compiled.
CHANNELS_LAST_CLASSES = ("UNet2DConditionModel", "AutoencoderKL")


@dataclass(frozen=True)
class CompileSettings:
    enabled: bool
    mode: str | None
    cache_dir: Path  # TORCHINDUCTOR_CACHE_DIR for this torch build and device
    backend: str = "inductor"  # the tests trace with "eager" (dynamo only, no code generation)


@dataclass
class SpeedState:
    """What the fast path did to a loaded pipeline (Engine.speed), for logs, the benchmarks and the tests."""

    compiled: bool = False
    compiled_modules: list[str] = field(default_factory=list)
    channels_last: list[str] = field(default_factory=list)
    fused_qkv: list[str] = field(default_factory=list)
    compile_seconds: float | None = None  # compile + warm-up, in setup
    warm_up_calls: int = 0
    warm_up_sizes: list[tuple[int, int]] = field(default_factory=list)
    graphs_compiled: int | None = None
    cache_dir: str | None = None
    mega_cache_loaded: bool = False
    error: str | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def device_name(runtime: Runtime) -> str:
    if runtime.device.type == "cuda":
        return torch.cuda.get_device_name(runtime.device)
    return runtime.device.type


def compile_settings(root: Path | str, runtime: Runtime, enabled: bool, mode: str | None = None) -> CompileSettings:
    """Compiled mode as FLASHSD_COMPILE / FLASHSD_COMPILE_MODE ask (flashsd.settings). The cache folder is keyed
    by torch version and device, since compiled kernels are only valid for those."""
    cache_dir = Path(root) / CACHE_FOLDER / _slug(f"torch-{torch.__version__}-{device_name(runtime)}")
    return CompileSettings(enabled=enabled, mode=mode, cache_dir=cache_dir)


# --- what the fast path looks like ---------------------------------------------------------------------


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def fast_path_problems(pipe, model: FlashModel, dtype: torch.dtype) -> list[str]:
    """Everything that would make this pipeline slower than it should be; empty when all is well."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    problems = []
    for name, module in _modules(pipe).items():
        for sub_name, sub in module.named_modules():
            processor = getattr(sub, "processor", None)
            if processor is not None and "Sliced" in type(processor).__name__:
                problems.append(f"{name}.{sub_name}: attention slicing ({type(processor).__name__})")
            if processor is not None and type(processor).__name__ in ("AttnProcessor", "AttnAddedKVProcessor"):
                problems.append(f"{name}.{sub_name}: attention without SDPA ({type(processor).__name__})")
            if isinstance(sub, BaseTunerLayer):
                problems.append(f"{name}.{sub_name}: adapter layer left ({type(sub).__name__})")
                break
        if getattr(module, "_hf_hook", None) is not None:
            problems.append(f"{name}: offloading hook ({type(module._hf_hook).__name__})")
        attention = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if attention not in (None, "sdpa", "flash_attention_2", "flash_attention_3"):
            problems.append(f"{name}: transformers attention {attention!r}, not SDPA")
        # The denoiser and the VAE run wholly in the pipeline's dtype (text encoders may keep a few
        # layers in fp32 by design, as T5 does).
        dtypes = {p.dtype for p in module.parameters()}
        if name in (model.denoiser, "vae") and dtypes and dtypes != {dtype}:
            problems.append(f"{name}: weights in {', '.join(sorted(map(str, dtypes)))}, not {dtype}")
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        for flag in ("use_slicing", "use_tiling"):
            if getattr(vae, flag, False):
                problems.append(f"vae.{flag} is on")
        if (
            dtype == torch.float16
            and vae.config.get("force_upcast", False)
            and model.pipeline == "StableDiffusionXLPipeline"
        ):
            problems.append("vae.config.force_upcast: the SDXL pipeline would decode in fp32")
    denoiser = getattr(pipe, model.denoiser)
    if getattr(denoiser, "peft_config", None):
        problems.append(f"{model.denoiser}: peft_config left ({sorted(denoiser.peft_config)})")
    return problems


# --- eager -------------------------------------------------------------------------------------------


def _channels_last(pipe, model: FlashModel) -> list[str]:
    names = []
    for name in (model.denoiser, "vae"):
        module = getattr(pipe, name, None)
        if module is not None and type(module).__name__ in CHANNELS_LAST_CLASSES:
            module.to(memory_format=torch.channels_last)
            names.append(name)
    return names


def apply_speedups(pipe, model: FlashModel, runtime: Runtime) -> SpeedState:
    """The eager path's own settings: diffusers' defaults are already the fast ones (see the module
    docstring), so this only checks them (channels_last stays a compiled-mode setting until a GPU run of
    `bench/run.py --sections layout` shows eager gains from it)."""
    problems = fast_path_problems(pipe, model, runtime.dtype)
    if problems:
        log.warning("Slower than it should be: %s", "; ".join(problems))
    return SpeedState()


# --- compiled mode -----------------------------------------------------------------------------------


def _use_cache_dir(settings: CompileSettings) -> str:
    """Point inductor (and triton under it) at the folder beside the weights, unless the environment
    already chose one or that folder cannot be written (then inductor's default in /tmp: compiling still
    works, it is just not kept)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing diffusers already makes inductor write its default into the environment: only another
    # value is someone's choice.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen
    try:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.cache_dir / ".writable"
        probe.touch()
        probe.unlink()
    except OSError as e:
        log.warning("Compile cache not kept: %s is not writable (%s).", settings.cache_dir, e)
        return ""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(settings.cache_dir)
    return str(settings.cache_dir)


def _mega_cache_file(cache_dir: str, model: FlashModel) -> Path | None:
    return Path(cache_dir) / f"{model.key}{MEGA_CACHE_SUFFIX}" if cache_dir else None


def _load_mega_cache(path: Path | None) -> bool:
    if path is None or not path.is_file():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
        return True
    except Exception as e:  # a stale or foreign cache only costs a recompile
        log.warning("Ignoring the compile cache %s: %s", path, e)
        return False


def _save_mega_cache(path: Path | None) -> None:
    if path is None:
        return
    try:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts:
            partial = path.with_name(path.name + ".partial")
            partial.write_bytes(artifacts[0])
            os.replace(partial, path)
    except Exception as e:
        log.warning("Could not save the compile cache %s: %s", path, e)


def _compile_regions(denoiser: torch.nn.Module, options: dict) -> list[str]:
    """Regional compilation of the denoiser (each repeated block compiled in place, the denoiser itself
    left eager); the whole module when it has no known repeated block."""
    kind = type(denoiser).__name__
    if denoiser._repeated_blocks:
        denoiser.compile_repeated_blocks(**options)
        blocks = tuple(denoiser._repeated_blocks)
    else:
        blocks = REPEATED_BLOCKS.get(kind, ())
        for module in denoiser.modules():
            if type(module).__name__ in blocks:
                module.compile(**options)
    extra = EXTRA_REGIONS.get(kind, ())
    for module in denoiser.modules():
        if type(module).__name__ in extra:
            module.compile(**options)
    blocks += extra
    compiled = [name for name, m in denoiser.named_modules() if type(m).__name__ in blocks]
    if compiled:
        return compiled
    denoiser.compile(**{**options, "fullgraph": False})
    return [""]


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _undo_compile(pipe, model: FlashModel, state: SpeedState) -> None:
    """Back to the eager path after a failed compile: compiled wrappers dropped, projections unfused,
    NCHW again."""
    for module in _modules(pipe).values():
        for sub in module.modules():
            if getattr(sub, "_compiled_call_impl", None) is not None:
                sub._compiled_call_impl = None
    for name in state.fused_qkv:
        getattr(pipe, name).unfuse_qkv_projections()
    for name in state.channels_last:
        getattr(pipe, name).to(memory_format=torch.contiguous_format)
    state.compiled, state.compiled_modules, state.fused_qkv, state.channels_last = False, [], [], []


def compile_pipeline(pipe, model: FlashModel, settings: CompileSettings, state: SpeedState) -> None:
    """Fuse QKV, switch to channels_last and wrap the regions in torch.compile (compiles lazily, on the
    first call of each region)."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    # Width and height are separate symbols even when equal (1:1), so 1:1 and 16:9 share one graph.
    fx_config.use_duck_shape = False
    # One graph per block shape (a UNet's resnets come in a dozen widths) and per batch class (1, or more):
    # stay well under the limit past which dynamo silently falls back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    options = dict(fullgraph=True, dynamic=True, backend=settings.backend)
    if settings.mode:
        options["mode"] = settings.mode
    denoiser = getattr(pipe, model.denoiser)
    for name in (model.denoiser, "vae"):
        getattr(pipe, name).fuse_qkv_projections()  # every denoiser's and the VAE's in diffusers 0.42
        state.fused_qkv.append(name)
    state.channels_last = _channels_last(pipe, model)
    state.compiled_modules = [f"{model.denoiser}.{n}".rstrip(".") for n in _compile_regions(denoiser, options)]
    pipe.vae.decoder.compile(**{**options, "fullgraph": False})
    state.compiled_modules.append("vae.decoder")
    state.compiled = True


def compile_and_warm_up(
    pipe,
    model: FlashModel,
    settings: CompileSettings,
    warm_up: Callable[[Sequence[tuple[int, int]], Sequence[int]], int],
    sizes: Sequence[tuple[int, int]],
    batches: Sequence[int] = WARM_UP_BATCHES,
) -> SpeedState:
    """Compiled mode: compile, then `warm_up(sizes, batches)` (the caller's generation calls, returning how many
    it made) so that no user pays a compile, and keep the caches beside the weights. On any failure, back to
    eager with a warning."""
    state = SpeedState()
    started = time.perf_counter()
    state.cache_dir = _use_cache_dir(settings)
    mega_cache = _mega_cache_file(state.cache_dir, model)
    state.mega_cache_loaded = _load_mega_cache(mega_cache)
    graphs_before = _graph_count()
    try:
        compile_pipeline(pipe, model, settings, state)
        state.warm_up_calls = warm_up(sizes, batches)
    except Exception as e:
        state.error = f"{type(e).__name__}: {e}"
        log.warning("Compiled mode failed (%s); running eager.", state.error, exc_info=True)
        _undo_compile(pipe, model, state)
        return state
    state.warm_up_sizes = list(sizes)
    state.graphs_compiled = _graph_count() - graphs_before
    state.compile_seconds = time.perf_counter() - started
    _save_mega_cache(mega_cache)
    regions = [m for m in state.compiled_modules if not m.startswith("vae.")]
    log.info(
        "Compiled mode: %d %s region(s)%s compiled and warmed up at %d sizes x batches %s in %.1f s "
        "(%d graphs; cache %s%s)",
        len(regions), type(getattr(pipe, model.denoiser)).__name__,
        " and the VAE decoder" if "vae.decoder" in state.compiled_modules else "", len(sizes), list(batches),
        state.compile_seconds, state.graphs_compiled, state.cache_dir or "not kept",
        ", reused" if state.mega_cache_loaded else "",
    )  # fmt: skip
    return state
