"""Loading a Flash pipeline once (adapter attached and merged, Flash scheduler set) and generating
images with one generator per image."""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from PIL import Image
from safetensors import safe_open

from . import faults, speed
from .errors import WeightsError
from .models import FlashModel
from .request import GenerationRequest
from .safety import ImagesFlagged, SafetyChecker
from .schedulers import FlashFlowMatchEulerDiscreteScheduler
from .weights import repo_dir

log = logging.getLogger("flashsd")

ADAPTER_NAME = "flash"


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision the pipeline runs; decided once, in select_runtime."""

    device: torch.device
    dtype: torch.dtype


def select_runtime() -> Runtime:
    """CUDA → fp16 (with the fp16-safe VAE); otherwise the same pipeline in fp32 on the CPU."""
    if torch.cuda.is_available():
        return Runtime(torch.device("cuda"), torch.float16)
    return Runtime(torch.device("cpu"), torch.float32)


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int


def _load_scheduler(model: FlashModel, base: Path):
    if model.scheduler == "lcm":
        # As the model cards do. LCMScheduler ignores timestep_spacing: 4 steps are [999, 759, 499, 259].
        return diffusers.LCMScheduler.from_pretrained(base, subfolder="scheduler", timestep_spacing="trailing")
    return FlashFlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")


def _fingerprints(module: torch.nn.Module) -> dict[str, float]:
    """One number per weight, enough to tell which weights an adapter changed without a second copy. (float32
    accumulation: float64 would copy every weight and took 15x longer, 3 s per pass on SD1.5's UNet on a CPU.)"""
    with torch.no_grad():
        return {name: torch.linalg.vector_norm(p, dtype=torch.float32).item() for name, p in module.named_parameters()}


_DENOISER_KEY_PREFIXES = ("unet.", "transformer.", "lora_unet_", "lora_transformer_", "base_model.model.")
_LORA_DOWN_MARKERS = (".lora_A.", ".lora.down.", ".lora_down.")


def _adapter_module_count(weights_file: Path) -> int:
    """How many denoiser layers the adapter file holds a LoRA for (each has exactly one 'down' matrix)."""
    with safe_open(weights_file, framework="pt") as f:
        keys = list(f.keys())
    return sum(
        1 for k in keys if k.startswith(_DENOISER_KEY_PREFIXES) and any(m in k for m in _LORA_DOWN_MARKERS)
    )


def _adapter_weights_file(model: FlashModel, adapter_dir: Path) -> Path:
    return adapter_dir / next(f for f in model.adapter.files if f.endswith(".safetensors"))


def _adapter_layer_count(module: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in module.modules() if isinstance(m, BaseTunerLayer))


def _attach_adapter(pipe, model: FlashModel, adapter_dir: Path) -> int:
    """Merge the Flash adapter into the denoiser and drop the adapter layers. Returns the number of
    weights it changed. An adapter whose layers do not all land in the denoiser is an error, never the
    silent no-op diffusers makes of it."""
    weights_file = _adapter_weights_file(model, adapter_dir)
    held = _adapter_module_count(weights_file)
    faults.check_adapter(weights_file, getattr(pipe, model.denoiser), model)  # before anything is attached
    before = _fingerprints(getattr(pipe, model.denoiser))
    if model.adapter_format == "lora":
        pipe.load_lora_weights(adapter_dir, weight_name=weights_file.name, adapter_name=ADAPTER_NAME)
        attached = _adapter_layer_count(getattr(pipe, model.denoiser))
        pipe.fuse_lora(adapter_names=[ADAPTER_NAME], lora_scale=1.0)
        pipe.unload_lora_weights()
    else:
        from peft import PeftModel

        with_adapter = PeftModel.from_pretrained(getattr(pipe, model.denoiser), adapter_dir)
        attached = _adapter_layer_count(with_adapter)
        pipe.register_modules(**{model.denoiser: with_adapter.merge_and_unload()})
    denoiser = getattr(pipe, model.denoiser)
    changed = sum(1 for name, value in _fingerprints(denoiser).items() if before.get(name) != value)
    if held == 0 or attached < held or changed == 0:
        raise WeightsError(
            f"The Flash adapter {weights_file} does not fit {model.base.id}: {attached} of its {held} "
            f"{model.denoiser} layers attached and {changed} weights changed. Fetch the pinned files again "
            f"with `scripts/download-weights --model {model.key}`."
        )
    assert _adapter_layer_count(denoiser) == 0, "adapter layers left after merging"
    return changed


def _derive(pipe, class_name: str):
    """A `class_name` pipeline on the very components of `pipe`: diffusers' `from_pipe` without its final
    `.to(dtype)`, so nothing is loaded, copied or cast (the shared modules stay exactly as loaded)."""
    pipeline_class = getattr(diffusers, class_name)
    accepted = inspect.signature(pipeline_class.__init__).parameters
    arguments = {name: module for name, module in pipe.components.items() if name in accepted}
    # Pipeline-level settings (requires_safety_checker, force_zeros_for_empty_prompt, ...), as from_pipe does.
    arguments |= {
        key: value for key, value in pipe.config.items()
        if key in accepted and key not in arguments and not key.startswith("_")
    }  # fmt: skip
    derived = pipeline_class(**arguments)
    derived.set_progress_bar_config(disable=True)
    return derived


class Engine:
    """A loaded Flash pipeline. Knows nothing of Cog: the predictor, the command line, the tests and
    the benchmarks all drive it directly.

    Text-to-image runs `pipe`; image-to-image and inpainting run the model table's pipelines built on the
    same component objects (`pipeline_for`), so switching modes loads and allocates no weights."""

    def __init__(self, model: FlashModel, pipe, runtime: Runtime, safety_checker: SafetyChecker | None = None):
        self.model = model
        self.pipe = pipe
        self.runtime = runtime
        self.safety_checker = safety_checker
        self._mode_pipelines: dict[str, object] = {}
        self.speed = speed.SpeedState()  # what speed.optimize did (set in load)

    @property
    def modes(self) -> tuple[str, ...]:
        """The generation modes this model supports (GenerationRequest.mode values)."""
        extra = (("image-to-image", self.model.img2img_pipeline), ("inpainting", self.model.inpaint_pipeline))
        return ("text-to-image",) + tuple(mode for mode, pipeline in extra if pipeline)

    def pipeline_for(self, mode: str):
        """The pipeline that runs `mode`. Built once, on `self.pipe`'s components; built again (still sharing
        them) only if a component of `self.pipe` was replaced since."""
        if mode == "text-to-image":
            return self.pipe
        if mode not in self.modes:
            raise ValueError(f"{self.model.title} has no {mode} pipeline (modes: {', '.join(self.modes)})")
        derived = self._mode_pipelines.get(mode)
        if derived is None or any(
            getattr(derived, name, None) is not module
            for name, module in self.pipe.components.items()
            if name in derived.components
        ):
            class_name = self.model.img2img_pipeline if mode == "image-to-image" else self.model.inpaint_pipeline
            derived = self._mode_pipelines[mode] = _derive(self.pipe, class_name)
        return derived

    @classmethod
    def load(cls, model: FlashModel, root: Path, runtime: Runtime | None = None) -> "Engine":
        runtime = runtime or select_runtime()
        started = time.perf_counter()
        base = repo_dir(root, model.base)
        common = dict(dtype=runtime.dtype, local_files_only=True, use_safetensors=True, device_map=runtime.device.type)
        components: dict = {name: None for name in model.absent_components}
        if model.vae is not None:
            components["vae"] = diffusers.AutoencoderKL.from_pretrained(repo_dir(root, model.vae), **common)
        if "safety_checker" in model.absent_components:
            components["requires_safety_checker"] = False
        pipeline_class = getattr(diffusers, model.pipeline)
        pipe = pipeline_class.from_pretrained(base, variant=model.variant, **common, **components)
        pipe.scheduler = _load_scheduler(model, base)
        changed = _attach_adapter(pipe, model, repo_dir(root, model.adapter))
        pipe.set_progress_bar_config(disable=True)
        log.info(
            "%s loaded on %s (%s) in %.1f s; Flash adapter merged into %d %s weights",
            model.title, runtime.device, str(runtime.dtype).removeprefix("torch."),
            time.perf_counter() - started, changed, model.denoiser,
        )
        checker = None
        if model.safety_checker is not None:
            checker = SafetyChecker.load(root, model.safety_checker, runtime.device, runtime.dtype)
        engine = cls(model, pipe, runtime, checker)
        for mode in engine.modes:
            engine.pipeline_for(mode)  # built now, so a problem shows in setup
        return speed.optimize(engine, root)  # eager fast-path checks; FLASHSD_COMPILE=1 compiles

    def pipeline_arguments(self, request: GenerationRequest) -> dict:
        """The one pipeline call a request becomes (shared with the benchmarks and fidelity tests)."""
        arguments = dict(
            prompt=request.prompt,
            num_images_per_prompt=request.num_outputs,
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            # CPU generators, one per image: image i's latents and every step's fresh noise come from
            # seed + i alone, on any device.
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in request.seeds],
            output_type="pil",
            **self.model.call_options,
        )
        if request.guidance_scale > 1:
            arguments["negative_prompt"] = request.negative_prompt
        if request.image is not None:
            # One copy per image, so the pipeline encodes image i (and, inpainting, the masked image i) with
            # generator i: every image's stream is then the same in a batch as alone (the seeds contract).
            arguments["image"] = [request.image] * request.num_outputs
            if request.mask is not None:
                arguments["mask_image"] = [request.mask] * request.num_outputs
            # steps_run / steps is exact for the steps flashsd allows, so every pipeline (SD's floor and SD3's
            # ceiling alike) runs exactly the last request.steps_run steps of the schedule.
            arguments["strength"] = request.steps_run / request.num_inference_steps
            if "width" not in inspect.signature(self.pipeline_for(request.mode).__call__).parameters:
                # SD / SDXL image-to-image take the size from the image, which is already width x height.
                del arguments["width"], arguments["height"]
        return arguments

    def generate(self, request: GenerationRequest) -> list[GeneratedImage]:
        """The images of `request`, less those the safety checker flags (ImagesFlagged if that is all)."""
        pipe = self.pipeline_for(request.mode)
        arguments = self.pipeline_arguments(request)
        steps = f"{request.num_inference_steps} steps"
        if request.image is not None:
            steps = (
                f"{request.steps_run} of {request.num_inference_steps} steps "
                f"(prompt_strength {request.prompt_strength:g})"
            )
        log.info(
            "Generating %d image(s) (%s) at %dx%d, %s, guidance %g; seeds %s",
            request.num_outputs, request.mode, request.width, request.height, steps,
            request.guidance_scale, ", ".join(map(str, request.seeds)),
        )
        noise_source = getattr(pipe.scheduler, "noise_generators", None)
        with noise_source(arguments["generator"]) if noise_source else contextlib.nullcontext():
            images = pipe(**arguments).images
        if request.mask is not None:
            # Outside the mask, the input's own pixels: the pipeline's are only their VAE round trip.
            images = [Image.composite(image, request.image, request.mask) for image in images]
        return self._screen([GeneratedImage(image, seed) for image, seed in zip(images, request.seeds)], request)

    def _screen(self, generated: list[GeneratedImage], request: GenerationRequest) -> list[GeneratedImage]:
        """Leave out what the safety checker flags; fail only when that is every image."""
        if self.safety_checker is None:
            return generated
        if not request.safety_checker:
            log.info("Safety checker disabled for this prediction (disable_safety_checker)")
            return generated
        flags = self.safety_checker.flags([item.image for item in generated])
        kept = [item for item, flagged in zip(generated, flags) if not flagged]
        if len(kept) < len(generated):
            log.warning(
                "Safety checker: %d of %d image(s) flagged as potentially NSFW and left out (seeds %s)",
                len(generated) - len(kept), len(generated),
                ", ".join(str(item.seed) for item, flagged in zip(generated, flags) if flagged),
            )
        if not kept:
            raise ImagesFlagged(len(generated))
        return kept
