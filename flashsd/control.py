"""Structure control: ControlNets at Flash speed, training-free (jasperai/flash-sdxl's card, "Combining Flash
Diffusion with Existing ControlNets": an existing ControlNet beside the fused Flash LoRA, LCM trailing, 4 steps,
guidance 0).

What this module holds, and nothing else does:
- the table of ControlNets per Flash model and control type (one HubRepo row each), the depth estimator's row, and
  the diffusers ControlNet pipeline classes per model: data, like flashsd.models;
- which repos a build holds (FLASHSD_CONTROLNETS, chosen at build like the model): `with_controlnets`;
- the user's controls, validated (`controls_from_inputs`, InputErrors naming the input);
- loading the ControlNets (and the depth estimator) once, and the pipelines and call arguments a request with
  controls becomes (`ControlNets`), built on the engine pipeline's own components: no weight is copied.

The control maps themselves (canny, depth) are made by flashsd.control_maps. Nothing here reads settings or the
environment: the caller passes the control types the build holds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError, Stopped
from .input_images import fit_image, load_image
from .models import MODELS, FlashModel, HubRepo
from .pipelines import derive, shares_components

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .runtime import Runtime

log = logging.getLogger("flashsd")

NONE = "none"
CANNY, DEPTH = "canny", "depth"
CONTROL_TYPES = (CANNY, DEPTH)  # what FLASHSD_CONTROLNETS and the controlnet_N inputs may name
MAX_CONTROLS = 3  # controlnet_1 .. controlnet_3, as fofr/sdxl-multi-controlnet-lora
SETTING = "FLASHSD_CONTROLNETS"
# Inputs as Replicate's peers name and bound them (fofr/sdxl-multi-controlnet-lora: conditioning scale default 0.75,
# start 0, end 1). diffusers needs start < end for each ControlNet.
DEFAULT_CONDITIONING_SCALE = 0.75
MIN_CONDITIONING_SCALE, MAX_CONDITIONING_SCALE = 0.0, 4.0
# The preprocessors making each map as A1111's ControlNet extension (sd-webui-controlnet) names them: the "Module"
# of its infotext (see infotext_fields).
PREPROCESSORS = {CANNY: "canny", DEPTH: "depth_anything_v2"}
# Every ControlNet repo below ships `.fp16.safetensors` beside the fp32 file (stored hub tree pages; see the rows).
CONTROLNET_VARIANT = "fp16"
CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.fp16.safetensors")


@dataclass(frozen=True)
class ControlFamily:
    """The ControlNets one Flash model can run, by control type, and the diffusers pipeline per generation mode."""

    controlnets: dict[str, HubRepo]
    pipelines: dict[str, str]  # mode (GenerationRequest.mode) -> diffusers ControlNet pipeline class


# Pins: full commit hashes read from stored copies of the hub's pages and from public code that downloads these
# files at these commits; the hub itself was not reachable when they were chosen (`scripts/download-weights`
# fails loudly if a pinned file is missing). Each row says what was seen.
FAMILIES: dict[str, ControlFamily] = {
    "sdxl": ControlFamily(
        controlnets={
            # The card's own ControlNet. Tree page at 31a41df5 (25 commits, "Update README.md"): config.json 1.31 kB,
            # diffusion_pytorch_model.fp16.safetensors 2.5 GB, .safetensors 5 GB, and pickles (.bin) not fetched.
            CANNY: HubRepo(
                "diffusers/controlnet-canny-sdxl-1.0", "31a41df5e5e1a09cacc9266ff6f912dd2a5336db", CONTROLNET_FILES
            ),
            # Tree page at bd65ccb7 (8 commits, "Adding `safetensors` variant of this model"): config.json 1.27 kB,
            # diffusion_pytorch_model.fp16.safetensors 2.5 GB.
            DEPTH: HubRepo(
                "diffusers/controlnet-depth-sdxl-1.0", "bd65ccb7d51b31fe744f467144fae3c234a427ff", CONTROLNET_FILES
            ),
        },
        pipelines={
            "text-to-image": "StableDiffusionXLControlNetPipeline",
            "image-to-image": "StableDiffusionXLControlNetImg2ImgPipeline",
            "inpainting": "StableDiffusionXLControlNetInpaintPipeline",
        },
    ),
    "sd15": ControlFamily(
        controlnets={
            # 115a470d is the repo's main (tree page: 7 commits, config.json 996 B, .fp16.safetensors 723 MB); public
            # code fetches diffusion_pytorch_model.fp16.safetensors at exactly this commit (imaginAIry's config).
            CANNY: HubRepo(
                "lllyasviel/control_v11p_sd15_canny", "115a470d547982438f70198e353a921996e2e819", CONTROLNET_FILES
            ),
            # The same public code fetches diffusion_pytorch_model.fp16.safetensors at this commit (not verified
            # against a tree page).
            DEPTH: HubRepo(
                "lllyasviel/control_v11f1p_sd15_depth", "539f99181d33db39cf1af2e517cd8056785f0a87", CONTROLNET_FILES
            ),
        },
        pipelines={
            "text-to-image": "StableDiffusionControlNetPipeline",
            "image-to-image": "StableDiffusionControlNetImg2ImgPipeline",
            "inpainting": "StableDiffusionControlNetInpaintPipeline",
        },
    ),
}

# Depth maps for the depth ControlNets (Apache-2.0; the Base and Large checkpoints are non-commercial). 5426e4f0 is
# main (tree page: 4 commits, config.json 950 B, model.safetensors 99.2 MB, preprocessor_config.json 775 B, all three
# unchanged since 32d03942 "Depth Anything V2 Small (Transformers version)"); the full hash is the `_commit_hash` a
# public re-saved config records for this repo. fp32 only (no variants).
DEPTH_ESTIMATOR = HubRepo(
    "depth-anything/Depth-Anything-V2-Small-hf",
    "5426e4f0f36572d16453bbda7a8389317b1bef99",
    ("config.json", "model.safetensors", "preprocessor_config.json"),
)


def able_models() -> str:
    """The models that take ControlNets, in words (for messages)."""
    return ", ".join(f"{MODELS[key].title} ({key})" for key in FAMILIES)


def unsupported_message(model: FlashModel) -> str:
    why = (
        "diffusers has no ControlNet pipeline for PixArt-α"
        if model.key == "pixart"
        else "flashsd holds no ControlNet for it yet"
    )
    return f"{model.title} takes no ControlNet ({why}). ControlNets work with {able_models()}."


def build_problem(model: FlashModel, types: Sequence[str]) -> str | None:
    """Why a build of `model` cannot hold the ControlNets `types` (FLASHSD_CONTROLNETS), or None."""
    unknown = [t for t in types if t not in CONTROL_TYPES]
    if unknown:
        return f"{', '.join(unknown)} is not a control type (known: {', '.join(CONTROL_TYPES)})"
    if types and model.key not in FAMILIES:
        return unsupported_message(model) + f" Leave {SETTING} empty for this model"
    missing = [t for t in types if t not in FAMILIES[model.key].controlnets] if types else []
    if missing:
        return f"{model.title} has no {', '.join(missing)} ControlNet"
    return None


def control_repos(model: FlashModel, types: Sequence[str]) -> tuple[HubRepo, ...]:
    """The repos a build of `model` holding the ControlNets `types` adds: one per type, and the depth estimator
    when a depth ControlNet is among them."""
    if not types:
        return ()
    problem = build_problem(model, types)
    if problem:
        raise ValueError(problem)
    repos = tuple(FAMILIES[model.key].controlnets[t] for t in dict.fromkeys(types))
    return repos + ((DEPTH_ESTIMATOR,) if DEPTH in types else ())


def with_controlnets(model: FlashModel, types: Sequence[str]) -> FlashModel:
    """`model` with the repos of the ControlNets `types` added to the ones it downloads, checks and loads (those it
    has already are not added again)."""
    added = tuple(r for r in control_repos(model, types) if r not in model.extra_repos)
    return dataclasses.replace(model, extra_repos=model.extra_repos + added) if added else model


# -- the user's controls ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Control:
    """One control of a request: its type, the photo its map is made from, and how strongly and when it acts."""

    input: str  # "controlnet_1" ...: how messages and logs name it
    kind: str  # one of CONTROL_TYPES
    image: Image.Image  # RGB, upright; fitted to the output size by `fitted`
    conditioning_scale: float = DEFAULT_CONDITIONING_SCALE
    start: float = 0.0  # fraction of the denoising where it starts acting (diffusers' control_guidance_start)
    end: float = 1.0  # ... and stops (control_guidance_end)

    @property
    def slot(self) -> int:
        """Its slot's number: 1 for controlnet_1."""
        return int(self.input.removeprefix("controlnet_"))

    def fitted(self, size: tuple[int, int]) -> Control:
        """This control with its photo scaled and centre-cropped to the output `size`, as `image` is."""
        return dataclasses.replace(self, image=fit_image(self.image, size))

    @functools.cached_property
    def fingerprint(self) -> tuple:
        """What makes its map and its effect: equal fingerprints act identically (pixels compared by digest)."""
        digest = hashlib.sha256(self.image.tobytes()).hexdigest()
        return (self.kind, self.conditioning_scale, self.start, self.end, self.image.mode, self.image.size, digest)

    def described(self) -> str:
        """How logs name it: `canny (controlnet_1, scale 0.75, from 0 to 1)`."""
        return f"{self.kind} ({self.input}, scale {self.conditioning_scale:g}, from {self.start:g} to {self.end:g})"


def infotext_fields(model: FlashModel, control: Control) -> list[tuple[str, object]]:
    """`control`'s settings as A1111's ControlNet extension writes a unit into the image's parameters (its
    scripts/infotext.py serialize_unit: ControlNetUnit's fields, display-cased, -1 values left out): the
    preprocessor, the ControlNet (its repo), the scale as Weight, the photo covered then centre-cropped ("Crop and
    Resize"), canny's thresholds, and where it acts."""
    from .control_maps import CANNY_HIGH_THRESHOLD, CANNY_LOW_THRESHOLD

    fields: list[tuple[str, object]] = [
        ("Module", PREPROCESSORS[control.kind]),
        ("Model", FAMILIES[model.key].controlnets[control.kind].id),
        ("Weight", f"{control.conditioning_scale:g}"),
        ("Resize Mode", "Crop and Resize"),
    ]
    if control.kind == CANNY:
        fields += [("Threshold A", CANNY_LOW_THRESHOLD), ("Threshold B", CANNY_HIGH_THRESHOLD)]
    return fields + [("Guidance Start", f"{control.start:g}"), ("Guidance End", f"{control.end:g}")]


@dataclass(frozen=True)
class ControlInputs:
    """The raw inputs of one controlnet_N slot, as Cog delivers them."""

    kind: str | None = NONE
    image: object = None  # a path or a PIL image
    conditioning_scale: float = DEFAULT_CONDITIONING_SCALE
    start: float = 0.0
    end: float = 1.0


def control_inputs(inputs: dict) -> list[ControlInputs]:
    """The controlnet_1.. inputs of a flat `inputs` mapping (as the command line gives them), taken out of it: one
    ControlInputs per slot, defaults where a name is absent."""
    slots = []
    for number in range(1, MAX_CONTROLS + 1):
        name = f"controlnet_{number}"
        fields = {"kind": name, "image": f"{name}_image", "conditioning_scale": f"{name}_conditioning_scale",
                  "start": f"{name}_start", "end": f"{name}_end"}  # fmt: skip
        slots.append(ControlInputs(**{field: inputs.pop(key) for field, key in fields.items() if key in inputs}))
    return slots


def _number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InputError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}.")
    if not low <= value <= high:
        raise InputError(f"{name}={value} is out of range: allowed {low:g} to {high:g}.")
    return float(value)


def controls_from_inputs(model: FlashModel, held: Sequence[str], slots: Sequence[ControlInputs]) -> tuple[Control, ...]:
    """The controls of slots controlnet_1.. (in order; `none` slots left out), validated; `held` is what this build
    holds (FLASHSD_CONTROLNETS). The first problem is an InputError naming the input and what is allowed."""
    if len(slots) > MAX_CONTROLS:
        raise ValueError(f"at most {MAX_CONTROLS} control slots, got {len(slots)}")
    controls = []
    for number, slot in enumerate(slots, start=1):
        name = f"controlnet_{number}"
        kind = NONE if slot.kind is None else slot.kind
        if not isinstance(kind, str) or kind.strip().lower() not in (NONE, *CONTROL_TYPES):
            raise InputError(f"{name}={kind!r} is not one of: {', '.join((NONE, *CONTROL_TYPES))}.")
        kind = kind.strip().lower()
        scale = _number(
            f"{name}_conditioning_scale", slot.conditioning_scale, MIN_CONDITIONING_SCALE, MAX_CONDITIONING_SCALE
        )
        start = _number(f"{name}_start", slot.start, 0.0, 1.0)
        end = _number(f"{name}_end", slot.end, 0.0, 1.0)
        if kind == NONE:
            if slot.image is not None:
                raise InputError(
                    f"{name}_image was given but {name} is '{NONE}', so nothing would use it: set {name} to one of "
                    f"{', '.join(CONTROL_TYPES)} (the map made from the image), or leave {name}_image out."
                )
            continue
        if model.key not in FAMILIES:
            raise InputError(unsupported_message(model) + f" Set {name} to '{NONE}' with this model.")
        if kind not in held:
            holds = (
                f"holds the {', '.join(held)} ControlNet{'s' if len(held) > 1 else ''} ({SETTING}={','.join(held)})"
                if held
                else f"holds no ControlNet ({SETTING} was empty when it was built)"
            )
            raise InputError(
                f"{name}={kind!r}: this model {holds}. Use one of the types it holds, or build it with {SETTING} "
                f"naming {kind} (README: Structure control)."
            )
        if slot.image is None:
            raise InputError(
                f"{name}={kind!r} needs {name}_image: the photo (URL or upload) its {kind} map is made from. Send "
                f"one, or set {name} to '{NONE}'."
            )
        if start >= end:
            raise InputError(
                f"{name}_start={start:g} must be below {name}_end={end:g}: the control acts from start to end of "
                "the denoising (0 = first step, 1 = last)."
            )
        controls.append(Control(name, kind, load_image(slot.image, f"{name}_image"), scale, start, end))
    return tuple(controls)


# -- loaded ControlNets and their pipelines --------------------------------------------------------------------


class ControlNets:
    """The ControlNets a build holds, loaded once on the engine's device in its dtype, the depth estimator when a
    depth ControlNet is among them, and the ControlNet pipelines built on the engine pipeline's components."""

    def __init__(self, model: FlashModel, nets: dict[str, torch.nn.Module], depth=None):
        self.model = model
        self.nets = nets  # control type -> ControlNetModel
        self.depth = depth  # flashsd.control_maps.DepthEstimator, or None
        self._pipelines: dict[tuple[str, tuple[str, ...]], object] = {}

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self.nets)

    @classmethod
    def load(cls, model: FlashModel, root: Path | str, runtime: Runtime, types: Sequence[str]) -> ControlNets:
        from diffusers import ControlNetModel

        from .control_maps import DepthEstimator
        from .weights import repo_dir

        problem = build_problem(model, types)
        if problem:
            raise ValueError(problem)
        started = time.perf_counter()
        nets = {}
        for kind in dict.fromkeys(types):
            repo = FAMILIES[model.key].controlnets[kind]
            nets[kind] = ControlNetModel.from_pretrained(
                repo_dir(root, repo), variant=CONTROLNET_VARIANT, dtype=runtime.dtype, use_safetensors=True,
                local_files_only=True, device_map=runtime.device.type,
            ).eval()  # fmt: skip
        depth = DepthEstimator.load(repo_dir(root, DEPTH_ESTIMATOR), runtime) if DEPTH in nets else None
        log.info(
            "ControlNets loaded (%s%s) in %.1f s",
            ", ".join(nets),
            ", with the Depth Anything V2 Small depth estimator" if depth else "",
            time.perf_counter() - started,
        )
        return cls(model, nets, depth)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every torch module held here, by name (for the engine's restore after a failure)."""
        found = {f"controlnet_{kind}": net for kind, net in self.nets.items()}
        if self.depth is not None:
            found["depth_estimator"] = self.depth.model
        return found

    def pipeline(self, pipe, mode: str, kinds: Sequence[str]):
        """The ControlNet pipeline of `mode` for controls of `kinds` (in order), on `pipe`'s components. Built once
        per (mode, kinds); built again (still sharing them) if a component of `pipe` was replaced since."""
        key = (mode, tuple(kinds))
        derived = self._pipelines.get(key)
        if derived is None or not shares_components(derived, pipe):
            from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

            nets = [self.nets[kind] for kind in kinds]
            controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
            class_name = FAMILIES[self.model.key].pipelines[mode]
            derived = self._pipelines[key] = derive(pipe, class_name, controlnet=controlnet)
        return derived

    def maps(
        self, controls: Sequence[Control], size: tuple[int, int], stop: Callable[[], bool] | None = None
    ) -> list[Image.Image]:
        """The control map of each control, at the output `size` (width, height), from its photo fitted to it.
        `stop()` true before or after any map ends the preprocessing (errors.Stopped)."""
        from .control_maps import canny_map

        def check() -> None:
            if stop is not None and stop():
                raise Stopped("stopped while making the control maps: no prediction waits for them")

        made = []
        for control in controls:
            check()
            photo = fit_image(control.image, size)
            if control.kind == CANNY:
                made.append(canny_map(photo))
            else:
                if self.depth is None:
                    raise ValueError("a depth control on ControlNets loaded without the depth estimator")
                made.append(self.depth.depth_map(photo))
        check()  # a cancel while the last map was made ends here, before the pipeline call
        return made

    @staticmethod
    def call_arguments(mode: str, controls: Sequence[Control], maps: Sequence[Image.Image]) -> dict:
        """The ControlNet arguments of the pipeline call (diffusers' names): one map, scale, start and end per
        ControlNet; plain values for a single ControlNet (as the card passes them), lists for several."""
        image_argument = "image" if mode == "text-to-image" else "control_image"
        if len(controls) == 1:
            (control,) = controls
            return {
                image_argument: maps[0],
                "controlnet_conditioning_scale": control.conditioning_scale,
                "control_guidance_start": control.start,
                "control_guidance_end": control.end,
            }
        return {
            image_argument: list(maps),
            "controlnet_conditioning_scale": [c.conditioning_scale for c in controls],
            "control_guidance_start": [c.start for c in controls],
            "control_guidance_end": [c.end for c in controls],
        }
