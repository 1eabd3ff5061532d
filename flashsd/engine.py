"""Loading a Flash pipeline once (adapter merged, Flash scheduler set) and generating images with one
generator per image. The engine knows nothing of Cog: the predictor, the command line, the tests and the
benchmarks all drive it directly."""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from PIL import Image

from . import adapter, errors, health, logs, loras, speed
from .control import ControlNets, with_controlnets
from .metrics import CallStats, StageClock
from .models import FlashModel
from .pipelines import derive, shares_components
from .prompts import PromptEncoder, prompt_notes, truncated_prompt_warnings
from .recovery import PredictionGuard
from .request import GenerationRequest, build_request, distinct_sizes
from .runtime import Runtime, select_runtime
from .safety import ImagesFlagged, SafetyChecker, screen_lines
from .schedulers import FlashFlowMatchEulerDiscreteScheduler
from .settings import Settings
from .weights import repo_dir, weights_problems

log = logging.getLogger("flashsd")

WARM_UP_PROMPT = "a photo of a lighthouse at dawn"


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    loras: tuple[loras.AppliedLora, ...] = ()  # the style LoRAs fused when it was made (for its metadata)


class Generation(list):
    """The images of one request (GeneratedImage: those the safety checker kept), and `call`: how the pipeline call
    that made them went (shared with the other requests of its batch; flashsd.metrics)."""

    def __init__(self, images=(), call: CallStats | None = None):
        super().__init__(images)
        self.call = call


def _load_scheduler(model: FlashModel, base: Path):
    if model.scheduler == "lcm":
        # As the model cards do. LCMScheduler ignores timestep_spacing: 4 steps are [999, 759, 499, 259].
        return diffusers.LCMScheduler.from_pretrained(base, subfolder="scheduler", timestep_spacing="trailing")
    return FlashFlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")


class Engine:
    """A loaded Flash pipeline.

    Text-to-image runs `pipe`; image-to-image and inpainting run the model table's pipelines built on the
    same component objects (`pipeline_for`), so switching modes loads and allocates no weights."""

    def __init__(
        self,
        model: FlashModel,
        pipe,
        runtime: Runtime,
        safety_checker: SafetyChecker | None = None,
        settings: Settings | None = None,
    ):
        self.model = model
        self.settings = settings or Settings()
        self.pipe = pipe
        self.runtime = runtime
        self.safety_checker = safety_checker
        self._mode_pipelines: dict[str, object] = {}
        self.fault = health.DeviceFault()  # the first fatal device error met (flashsd.health)
        self.speed = speed.SpeedState()  # what the fast path did (set in load)
        self.loras: loras.StyleLoras | None = None  # style LoRAs (set in load, for the models that take them)
        self.controlnets: ControlNets | None = None  # the ControlNets the build holds (set in load)
        # A1111 weights and long prompts for the CLIP families (None: the pipeline reads plain text only)
        self.prompts = PromptEncoder(pipe, model.prompt_encoding) if model.prompt_encoding else None

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
        if derived is None or not shares_components(derived, self.pipe):
            class_name = self.model.img2img_pipeline if mode == "image-to-image" else self.model.inpaint_pipeline
            derived = self._mode_pipelines[mode] = derive(self.pipe, class_name)
        return derived

    def pipeline_of(self, request: GenerationRequest):
        """The pipeline that runs `request`: its mode's, or with controls, the ControlNet pipeline of its mode and
        control types (flashsd.control), built on the same components."""
        if not request.controls:
            return self.pipeline_for(request.mode)
        kinds = [c.kind for c in request.controls]
        held = self.controlnets.types if self.controlnets is not None else ()
        missing = [kind for kind in kinds if kind not in held]
        if missing:  # only a caller that built the request against other settings than the engine's gets here
            raise errors.InputError(
                f"{self.model.title} was loaded without the {', '.join(missing)} ControlNet (FLASHSD_CONTROLNETS)."
            )
        return self.controlnets.pipeline(self.pipe, request.mode, kinds)

    def control_maps(self, request: GenerationRequest, stop: Callable[[], bool] | None = None) -> list[Image.Image]:
        """The maps of `request`'s controls at its size (none without controls): on the model's thread, as the
        depth estimator is a model. `stop()` true while they are made ends them (errors.Stopped)."""
        if not request.controls:
            return []
        return self.controlnets.maps(request.controls, (request.width, request.height), stop)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every torch module the engine runs, by name: the pipeline's components, the safety checker and its second
        opinion, the ControlNets and the depth estimator."""
        found = {name: c for name, c in self.pipe.components.items() if isinstance(c, torch.nn.Module)}
        if self.safety_checker is not None:
            found["safety_checker"] = self.safety_checker.model
            if self.safety_checker.second_opinion is not None:
                found["safety_second_opinion"] = self.safety_checker.second_opinion.model
        if self.controlnets is not None:
            found |= self.controlnets.modules()
        return found

    @classmethod
    def load(
        cls, model: FlashModel, root: Path, runtime: Runtime | None = None, settings: Settings | None = None
    ) -> Engine:
        """Load `model` from the weights `root`. A missing, damaged or unfit file is a WeightsError naming it and
        the command that fixes it. `settings`: the container's (default: every default; nothing read here)."""
        settings = settings or Settings()
        runtime = runtime or select_runtime(settings.device)
        model = with_controlnets(model, settings.controlnets)  # their files are checked and diagnosed too
        logs.leave_out_known_noise()
        with weights_problems(model, root):
            engine = cls._load(model, Path(root), runtime, settings)
            if settings.controlnets:
                engine.controlnets = ControlNets.load(model, root, runtime, settings.controlnets)
                for mode in engine.modes:  # each type's pipelines built now, so a problem shows in setup
                    for kind in engine.controlnets.types:
                        engine.controlnets.pipeline(engine.pipe, mode, [kind])
        engine.speed = speed.apply_speedups(engine.pipe, model, runtime)
        if model.lora_family:
            engine.loras = loras.StyleLoras(model, engine.pipe, Path(root), settings.loras)
        if settings.compile:
            engine.compile(speed.compile_settings(root, runtime, enabled=True, mode=settings.compile_mode))
        return engine

    def compile(
        self,
        settings: speed.CompileSettings,
        sizes: Sequence[tuple[int, int]] | None = None,
        batches: Sequence[int] = speed.WARM_UP_BATCHES,
    ) -> speed.SpeedState:
        """Compiled mode (FLASHSD_COMPILE=1): compile, and warm up at `sizes` (default: every aspect ratio's)."""
        sizes = distinct_sizes(self.model) if sizes is None else sizes
        self.speed = speed.compile_and_warm_up(self.pipe, self.model, settings, self.warm_up, sizes, batches)
        return self.speed

    @classmethod
    def _load(cls, model: FlashModel, root: Path, runtime: Runtime, settings: Settings) -> Engine:
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
        changed = adapter.merge(pipe, model, repo_dir(root, model.adapter))
        pipe.set_progress_bar_config(disable=True)
        log.info(
            "%s loaded on %s (%s) in %.1f s; Flash adapter merged into %d %s weights",
            model.title,
            runtime.device,
            str(runtime.dtype).removeprefix("torch."),
            time.perf_counter() - started,
            changed,
            model.denoiser,
        )
        checker = None
        if model.safety_checker is not None:
            checker = SafetyChecker.load(
                root, model.safety_checker, runtime.device, runtime.dtype, model.safety_second_opinion
            )
        engine = cls(model, pipe, runtime, checker, settings)
        for mode in engine.modes:
            engine.pipeline_for(mode)  # built now, so a problem shows in setup
        return engine

    def warm_up(self, sizes: Sequence[tuple[int, int]], batches: Sequence[int]) -> int:
        """One text-to-image call per size and batch, through the same generate predictions use (compiled mode
        compiles then, in setup, so that no prediction pays for it). Returns the number of calls."""
        calls, level = 0, log.level
        log.setLevel(max(level, logging.WARNING))  # not one "Generating ..." line per warm-up call
        try:
            for batch in batches:
                for width, height in sizes:
                    request = build_request(
                        self.model, prompt=WARM_UP_PROMPT, aspect_ratio="custom", width=width, height=height,
                        num_outputs=batch, seed=0,
                        disable_safety_checker=True,  # not compiled, and a flagged warm-up image must not fail setup
                    )  # fmt: skip
                    self.generate(request)
                    calls += 1
        finally:
            log.setLevel(level)
        return calls

    def pipeline_arguments(self, *requests: GenerationRequest, maps: Sequence[Image.Image] | None = None) -> dict:
        """The one pipeline call `requests` (one, or several of one batch_key) become; shared with the benchmarks and
        the fidelity tests. With controls, their `maps` (control_maps; made here when not given)."""
        first = requests[0]
        arguments = self._call_arguments(*requests)
        if first.controls:  # one batch_key: every request has the same controls
            maps = self.control_maps(first) if maps is None else maps
            arguments |= ControlNets.call_arguments(first.mode, first.controls, maps)
        return arguments

    def _call_arguments(self, *requests: GenerationRequest) -> dict:
        first = requests[0]
        arguments = dict(
            num_images_per_prompt=first.num_outputs,
            width=first.width,
            height=first.height,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            # CPU generators, one per image: image i's latents and every step's fresh noise come from seed + i
            # alone, on any device and in any batch (diffusers orders a call's images prompt by prompt, each
            # prompt's num_images_per_prompt together: so do the generators).
            generator=[torch.Generator("cpu").manual_seed(seed) for request in requests for seed in request.seeds],
            output_type="pil",
            **self.model.call_options,
        )
        guided = first.guidance_scale > 1  # diffusers reads a negative prompt only then
        if len(requests) > 1:  # plain texts only (batch_key): the pipeline encodes them together
            arguments["prompt"] = [request.prompt for request in requests]
            if guided:
                arguments["negative_prompt"] = [request.negative_prompt for request in requests]
            return arguments
        negative = first.negative_prompt if guided else None
        # Embeddings when a text has A1111 syntax or more than 75 tokens; otherwise the text, as the model card does.
        # (Style LoRAs fuse into the text encoders too: embeddings made under other LoRAs are not reused.)
        lora_state = self.loras.applied if self.loras is not None else ()
        embeddings = self.prompts.pipeline_arguments(first.prompt, negative, lora_state) if self.prompts else {}
        arguments |= embeddings or {"prompt": first.prompt}
        if negative is not None and not embeddings:
            arguments["negative_prompt"] = negative
        if first.image is not None:
            # One copy per image, so the pipeline encodes image i (and, inpainting, the masked image i) with
            # generator i: every image's stream is then the same in a batch as alone (the seeds contract).
            arguments["image"] = [first.image] * first.num_outputs
            if first.mask is not None:
                arguments["mask_image"] = [first.mask] * first.num_outputs
            # steps_run / steps is exact for the steps flashsd allows, so every pipeline (SD's floor and SD3's
            # ceiling alike) runs exactly the last request.steps_run steps of the schedule.
            arguments["strength"] = first.steps_run / first.num_inference_steps
            if "width" not in inspect.signature(self.pipeline_of(first).__call__).parameters:
                # SD / SDXL image-to-image take the size from the image, which is already width x height.
                del arguments["width"], arguments["height"]
        return arguments

    def generate(self, request: GenerationRequest, stop: Callable[[], bool] | None = None) -> Generation:
        """The images of `request` alone (a batch of one through generate_batch); its failure is raised."""
        result = self.generate_batch([request], stop=stop)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        says: Sequence[logs.Say] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> list[Generation | Exception]:
        """Requests of one batch_key as one pipeline call (a single prediction is a batch of one). Each keeps its own
        generators (so its images equal those it gets alone), seeds, safety verdicts and log lines (`says[i]` logs as
        request i's; default: the flashsd logger); a request whose every image is flagged gets its ImagesFlagged,
        the others their images. `stop()` true ends the call between steps, or inside one (errors.Stopped).

        A failure of the call is raised (the batcher retries a shared call's requests one by one). Out of memory
        becomes OutOfMemory (a message saying what to lower, memory freed); after any failure or cancellation the
        engine's modules are restored, so the worker, which Cog never restarts, carries on. After a fatal device
        error (flashsd.health) every call fails at once with DeviceFailed, touching nothing."""
        if self.fault.error is not None:
            raise self.fault.failure()
        says = list(says or [log.log] * len(requests))
        first = requests[0]
        for request, say in zip(requests, says):
            self._announce(request, say, others=len(requests) - 1)
        lora_started = time.perf_counter()
        applied = self.apply_loras(first, stop)
        lora_s = time.perf_counter() - lora_started
        pipe = self.pipeline_of(first)
        with StageClock(pipe, self.model.denoiser, self.runtime.device) as clock:
            with PredictionGuard(self.modules(), first, self.runtime.device, self.fault):
                maps = self._timed_control_maps(first, says, stop)
                arguments = self.pipeline_arguments(*requests, maps=maps)
                progress = logs.StepProgress(first.steps_run, says, stop).pipeline_arguments(pipe)
                noise_source = getattr(pipe.scheduler, "noise_generators", None)
                with noise_source(arguments["generator"]) if noise_source else contextlib.nullcontext():
                    with self._stoppable_inside_steps(stop):
                        images = pipe(**arguments, **progress).images
        call = CallStats(
            len(requests), len(images), lora_s, clock.encode_prompt_s, clock.denoise_s,
            lora_cache_hit=self.loras.downloads == 0 if first.loras else None,
        )  # fmt: skip
        results: list[Generation | Exception] = []
        for index, (request, say) in enumerate(zip(requests, says)):
            mine = images[index * first.num_outputs : (index + 1) * first.num_outputs]
            if request.mask is not None:
                # Outside the mask, the input's own pixels: the pipeline's are only their VAE round trip.
                mine = [Image.composite(image, request.image, request.mask) for image in mine]
            generated = [GeneratedImage(image, seed, applied) for image, seed in zip(mine, request.seeds)]
            try:
                results.append(Generation(self._screen(generated, request, say), call))
            except ImagesFlagged as flagged:
                results.append(flagged)
        return results

    def _timed_control_maps(self, request: GenerationRequest, says: Sequence[logs.Say], stop) -> list[Image.Image]:
        if not request.controls:
            return []
        started = time.perf_counter()
        maps = self.control_maps(request, stop)
        for say in says:
            say(logging.INFO, "Control maps (%s) made in %.2f s", ", ".join(c.kind for c in request.controls),
                time.perf_counter() - started)  # fmt: skip
        return maps

    def _announce(self, request: GenerationRequest, say: logs.Say, others: int) -> None:
        """What a prediction's logs say before its images are made: what of its prompts is not read, and the call."""
        for warning in truncated_prompt_warnings(
            self.pipe, self.model.title, request, clip_reads_everything=self.prompts is not None
        ):
            say(logging.WARNING, "%s", warning)
        for note in prompt_notes(self.model, request):
            say(logging.INFO, "%s", note)
        steps = f"{request.num_inference_steps} steps"
        if request.image is not None:
            steps = (
                f"{request.steps_run} of {request.num_inference_steps} steps "
                f"(prompt_strength {request.prompt_strength:g})"
            )
        controls = "; ControlNet " + ", ".join(c.described() for c in request.controls) if request.controls else ""
        shared = f"; in one call with {others} other prediction(s)" if others else ""
        say(
            logging.INFO, "Generating %d image(s) (%s) at %dx%d, %s, guidance %g; seeds %s%s%s", request.num_outputs,
            request.mode, request.width, request.height, steps, request.guidance_scale,
            ", ".join(map(str, request.seeds)), controls, shared,
        )  # fmt: skip

    def apply_loras(
        self, request: GenerationRequest, stop: Callable[[], bool] | None = None
    ) -> tuple[loras.AppliedLora, ...]:
        """Fuse the request's style LoRAs into the model (and remove the last prediction's): nothing to do when they
        are the same as the last prediction's. A LoRA that cannot be used is a LoraError, the model unchanged;
        `stop()` true ends a download or a load (errors.Stopped, the model restored)."""
        if self.loras is None:
            if request.loras:
                raise loras.LoraError(
                    f"{self.model.title} takes no style LoRA (models that do: {loras.able_models()})."
                )
            return ()
        return self.loras.apply(request.loras, stop)

    @contextlib.contextmanager
    def _stoppable_inside_steps(self, stop: Callable[[], bool] | None):
        """Check `stop()` before each top-level block of the denoiser too (a UNet's down, mid and up blocks, a
        transformer's blocks), so that a cancel ends a long step (a large image on a CPU) without waiting for its
        end. A few dozen hooks at most (stop_hook_sites); eager mode only: hooks would make compiled regions
        recompile."""
        if stop is None or self.speed.compiled:
            yield
            return

        def check(module, args):
            if stop():
                raise errors.Stopped("stopped inside a denoising step: no prediction waits for these images")

        handles = [site.register_forward_pre_hook(check) for site in stop_hook_sites(self.denoiser)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.model.denoiser)

    def _screen(
        self, generated: list[GeneratedImage], request: GenerationRequest, say: logs.Say
    ) -> list[GeneratedImage]:
        """Leave out what the safety checker flags; fail only when that is every image."""
        if self.safety_checker is None:
            return generated
        if not request.check_safety:
            say(logging.INFO, "Safety checker disabled for this prediction (disable_safety_checker)")
            return generated
        verdicts = self.safety_checker.flags([item.image for item in generated])
        kept = [item for item, flagged in zip(generated, verdicts) if not flagged]
        for level, line in screen_lines(verdicts, [item.seed for item in generated]):
            say(level, "%s", line)
        if not kept:
            raise ImagesFlagged(len(generated))
        return kept

    # -- which predictions share a call (flashsd.batching decides when, on the model's thread) ----------------------

    def batch_key(self, request: GenerationRequest) -> BatchKey:
        """Requests with equal keys can share one pipeline call: text-to-image at the same size, steps, guidance,
        images per prompt, style LoRAs and controls (prompts may differ). Controls are equal only when their types,
        scales, start and end and their photos' pixels are: the call then makes one map set and the ControlNets act
        on every image as on each alone. A request with an image, or a prompt that needs its own embeddings (A1111
        weights, more than 75 tokens), gets a key of its own and runs alone. Uses the model's tokenizers: on the
        model's thread only."""
        texts = [request.prompt] + ([request.negative_prompt] if request.guidance_scale > 1 else [])
        alone = request.image is not None or (
            self.prompts is not None and any(map(self.prompts.needs_embeddings, texts))
        )
        return BatchKey(
            request.width, request.height, request.num_inference_steps, request.guidance_scale, request.num_outputs,
            request.loras, tuple(c.fingerprint for c in request.controls), alone=id(request) if alone else None,
        )  # fmt: skip

    def batch_budget(self, key: BatchKey) -> int:
        """How many images one shared call of `key` may hold: FLASHSD_BATCH_MEGAPIXELS of images (default 4.2, four
        1024x1024 images: what the largest single prediction already asks of the GPU), half as many with guidance
        (each image is computed twice). A request larger than that still runs, alone."""
        if key.alone is not None:
            return 1
        pixels = self.settings.batch_megapixels * 1e6
        return max(1, int(pixels // (key.width * key.height * (2 if key.guidance_scale > 1 else 1))))


@dataclass(frozen=True)
class BatchKey:
    """What predictions sharing one pipeline call have in common (Engine.batch_key)."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    num_outputs: int
    loras: tuple
    controls: tuple = ()  # each control's fingerprint (type, scale, start, end, the photo's digest)
    alone: int | None = None  # the id of a request that runs alone (it has an image, or needs its own embeddings)


def stop_hook_sites(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """Where a cancel is checked inside a step: each element of the denoiser's top-level block lists (a UNet's
    down_blocks and up_blocks, a transformer's transformer_blocks) and its other direct children (a UNet's
    mid_block among them)."""
    sites: list[torch.nn.Module] = []
    for child in denoiser.children():
        sites.extend(child if isinstance(child, torch.nn.ModuleList) else [child])
    return sites
