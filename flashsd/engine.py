"""Loading a Flash pipeline once (adapter attached and merged, Flash scheduler set) and generating
images with one generator per image."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from PIL import Image
from safetensors import safe_open

from .errors import WeightsError
from .models import FlashModel
from .request import GenerationRequest
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
    """One number per weight, enough to tell which weights an adapter changed without a second copy."""
    with torch.no_grad():
        return {name: torch.linalg.vector_norm(p, dtype=torch.float64).item() for name, p in module.named_parameters()}


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


class Engine:
    """A loaded Flash pipeline. Knows nothing of Cog: the predictor, the command line, the tests and
    the benchmarks all drive it directly."""

    def __init__(self, model: FlashModel, pipe, runtime: Runtime):
        self.model = model
        self.pipe = pipe
        self.runtime = runtime

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
        return cls(model, pipe, runtime)

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
        return arguments

    def generate(self, request: GenerationRequest) -> list[GeneratedImage]:
        arguments = self.pipeline_arguments(request)
        log.info(
            "Generating %d image(s) at %dx%d, %d steps, guidance %g; seeds %s",
            request.num_outputs, request.width, request.height, request.num_inference_steps,
            request.guidance_scale, ", ".join(map(str, request.seeds)),
        )
        noise_source = getattr(self.pipe.scheduler, "noise_generators", None)
        with noise_source(arguments["generator"]) if noise_source else contextlib.nullcontext():
            images = self.pipe(**arguments).images
        return [GeneratedImage(image, seed) for image, seed in zip(images, request.seeds)]
