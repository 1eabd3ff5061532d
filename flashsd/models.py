"""The table of Flash Diffusion models: what each one is made of and how its model card runs it.

Everything model-specific lives here as data. Adding a fifth Flash model is one new row in MODELS.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

CLIP_TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
T5_TOKENIZER_FILES = ("added_tokens.json", "special_tokens_map.json", "spiece.model", "tokenizer_config.json")


def _in(folder: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{folder}/{name}" for name in names)


@dataclass(frozen=True)
class HubRepo:
    """A Hugging Face repo pinned to a commit, and the exact files of it that flashsd uses."""

    id: str
    revision: str
    files: tuple[str, ...]
    gated: bool = False

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.id}"


def _merged(repos: tuple[HubRepo, ...]) -> tuple[HubRepo, ...]:
    """One row per repo id: rows naming the same repo (SD1.5's base and the safety checker) share one folder,
    so they are one download of the union of their files. Their pins must agree."""
    by_id: dict[str, HubRepo] = {}
    for repo in repos:
        seen = by_id.get(repo.id)
        if seen is None:
            by_id[repo.id] = repo
            continue
        if seen.revision != repo.revision:
            raise ValueError(
                f"{repo.id} is pinned to two revisions ({seen.revision}, {repo.revision}) in flashsd/models.py"
            )
        files = seen.files + tuple(f for f in repo.files if f not in seen.files)
        by_id[repo.id] = HubRepo(repo.id, repo.revision, files, gated=seen.gated or repo.gated)
    return tuple(by_id.values())


# The CompVis Stable Diffusion safety checker and its image processor. CompVis/stable-diffusion-safety-checker
# ships only a pickle (pytorch_model.bin); the SD1.5 repo carries the same checker as safetensors, which is the
# copy SD 1.x pipelines load. fp16 (579 MB; the fp32 file is 1.16 GB): the checker runs in fp16 on the GPU.
SAFETY_CHECKER = HubRepo(
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
    _in("safety_checker", "config.json", "model.fp16.safetensors") + ("feature_extractor/preprocessor_config.json",),
)
SAFETY_CHECKER_VARIANT = "fp16"

# The second opinion on images the CompVis checker flags (flashsd.safety): a ViT fine-tuned to tell `normal` from
# `nsfw`, as replicate/cog-flux uses it. Pin 63e0a066 ("Update config.json", the commit after the safetensors
# conversion 00184bf). Verified from stored copies of the hub's pages, not against the live hub: the file list at
# that commit (config.json 724 B, model.safetensors 343 MB, preprocessor_config.json 325 B, beside the pickles
# pytorch_model.bin and optimizer.pt, never fetched); the config's text (commit 121fba2 and the two one-line
# `_name_or_path` changes after it, 724 bytes as written); model.safetensors' LFS sha256 97b2ce64... and size
# 343,223,968 bytes, which the ViT-Base layout of that config gives to the byte (tests/test_safety.py).
SAFETY_SECOND_OPINION = HubRepo(
    "Falconsai/nsfw_image_detection",
    "63e0a066bb08d2ae47324b540fba3adfd4536569",
    ("config.json", "model.safetensors", "preprocessor_config.json"),
)


@dataclass(frozen=True)
class FlashModel:
    key: str
    title: str
    base: HubRepo
    adapter: HubRepo
    adapter_format: Literal["lora", "peft"]  # diffusers LoRA file (fused) or PEFT adapter (merged)
    pipeline: str  # diffusers text-to-image pipeline class
    denoiser: Literal["unet", "transformer"]
    scheduler: Literal["lcm", "flash_flow_match"]
    native_size: int
    sampler_name: str  # how the metadata names the sampler
    vae: HubRepo | None = None  # replaces the base repo's VAE when set
    variant: str | None = None  # weight-file variant of the base repo ("fp16" files beside fp32 ones)
    absent_components: tuple[str, ...] = ()  # pipeline components the recipe runs without
    call_options: Mapping[str, object] = field(default_factory=dict)  # fixed pipeline call arguments
    disk_gb: float = 0.0  # weights on disk, all repos
    # diffusers pipelines built on the same components (from_pipe) for image-to-image and inpainting; None
    # where diffusers has none for this family (the `image` input is then refused).
    img2img_pipeline: str | None = None
    inpaint_pipeline: str | None = None
    safety_checker: HubRepo | None = SAFETY_CHECKER
    # Re-checks the images safety_checker flags; an image it calls `normal` is kept (flashsd.safety). Fetched and
    # loaded with the checker: a model without one has no use for it.
    safety_second_opinion: HubRepo | None = SAFETY_SECOND_OPINION
    # Adapter layers that name modules of the trainer's own model, which the base pipeline does not have: the
    # card's loader skips them, and so does flashsd (one log line); any other layer that does not land is an error.
    adapter_foreign_layers: tuple[str, ...] = ()
    # How flashsd encodes a prompt with A1111 weights or over 75 tokens for this family's CLIP text encoders
    # (flashsd.prompts.FAMILIES); None: the pipeline reads every prompt as plain text (PixArt's T5).
    prompt_encoding: Literal["sd", "sdxl", "sd3"] | None = None
    # The base model family whose LoRAs fit this model (flashsd.loras: style LoRAs, fused on top of the Flash
    # adapter); None: style LoRAs are refused (diffusers has no LoRA loader for PixArt-α's pipeline).
    lora_family: str | None = None
    # Repos a build adds to the model's own (flashsd.control.with_controlnets: the ControlNets FLASHSD_CONTROLNETS
    # names and their depth estimator): downloaded, checked and diagnosed like the others.
    extra_repos: tuple[HubRepo, ...] = ()

    @property
    def repos(self) -> tuple[HubRepo, ...]:
        """Every repo to download, one row per repo id (see _merged)."""
        second_opinion = self.safety_second_opinion if self.safety_checker is not None else None
        own = (self.base, self.vae, self.adapter, self.safety_checker, second_opinion)
        return _merged(tuple(r for r in own if r is not None) + self.extra_repos)


SDXL = FlashModel(
    key="sdxl",
    title="Flash SDXL",
    base=HubRepo(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "462165984030d82259a11f4367a4eed129e94a7b",
        ("model_index.json", "scheduler/scheduler_config.json")
        + _in("tokenizer", *CLIP_TOKENIZER_FILES)
        + _in("tokenizer_2", *CLIP_TOKENIZER_FILES)
        + _in("text_encoder", "config.json", "model.fp16.safetensors")
        + _in("text_encoder_2", "config.json", "model.fp16.safetensors")
        + _in("unet", "config.json", "diffusion_pytorch_model.fp16.safetensors"),
    ),
    vae=HubRepo(
        "madebyollin/sdxl-vae-fp16-fix",
        "207b116dae70ace3637169f1ddd2434b91b3a8cd",
        ("config.json", "diffusion_pytorch_model.safetensors"),
    ),
    adapter=HubRepo(
        "jasperai/flash-sdxl",
        "84e93604226d43e74ae9085a98ea4eaee57d8600",
        ("pytorch_lora_weights.safetensors",),
    ),
    adapter_format="lora",
    pipeline="StableDiffusionXLPipeline",
    img2img_pipeline="StableDiffusionXLImg2ImgPipeline",
    inpaint_pipeline="StableDiffusionXLInpaintPipeline",
    denoiser="unet",
    scheduler="lcm",
    prompt_encoding="sdxl",
    lora_family="SDXL",
    native_size=1024,
    sampler_name="LCM",
    variant="fp16",
    disk_gb=8.4,
)

SD3 = FlashModel(
    key="sd3",
    title="Flash SD3",
    base=HubRepo(
        "stabilityai/stable-diffusion-3-medium-diffusers",
        "ea42f8cef0f178587cf766dc8129abd379c90671",
        ("model_index.json", "scheduler/scheduler_config.json")
        + _in("tokenizer", *CLIP_TOKENIZER_FILES)
        + _in("tokenizer_2", *CLIP_TOKENIZER_FILES)
        + _in("text_encoder", "config.json", "model.safetensors")
        + _in("text_encoder_2", "config.json", "model.safetensors")
        + _in("transformer", "config.json", "diffusion_pytorch_model.safetensors")
        + _in("vae", "config.json", "diffusion_pytorch_model.safetensors"),
        gated=True,
    ),
    adapter=HubRepo(
        "jasperai/flash-sd3",
        "30ea825c9cfb9a3ae0280f4ce7bd51a8b9d0606b",
        ("adapter_config.json", "adapter_model.safetensors"),
    ),
    adapter_format="peft",
    pipeline="StableDiffusion3Pipeline",
    img2img_pipeline="StableDiffusion3Img2ImgPipeline",
    inpaint_pipeline="StableDiffusion3InpaintPipeline",
    denoiser="transformer",
    scheduler="flash_flow_match",
    prompt_encoding="sd3",
    lora_family="SD3",
    native_size=1024,
    sampler_name="Flash flow-match Euler",
    # The Flash SD3 adapter was trained without T5.
    absent_components=("text_encoder_3", "tokenizer_3"),
    disk_gb=7.2,
)

SD15 = FlashModel(
    key="sd15",
    title="Flash SD",
    base=HubRepo(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
        ("model_index.json", "scheduler/scheduler_config.json")
        + _in("tokenizer", *CLIP_TOKENIZER_FILES)
        + _in("text_encoder", "config.json", "model.fp16.safetensors")
        + _in("unet", "config.json", "diffusion_pytorch_model.fp16.safetensors")
        + _in("vae", "config.json", "diffusion_pytorch_model.fp16.safetensors"),
    ),
    adapter=HubRepo(
        "jasperai/flash-sd",
        "862cb55330d561aee863790d84bf7418e472103e",
        ("pytorch_lora_weights.safetensors",),
    ),
    adapter_format="lora",
    pipeline="StableDiffusionPipeline",
    img2img_pipeline="StableDiffusionImg2ImgPipeline",
    inpaint_pipeline="StableDiffusionInpaintPipeline",
    denoiser="unet",
    scheduler="lcm",
    prompt_encoding="sd",
    lora_family="SD1.5",
    native_size=512,
    sampler_name="LCM",
    variant="fp16",
    # The pipeline's own checker blacks flagged images out; flashsd runs the checker itself (flashsd.safety).
    absent_components=("safety_checker", "feature_extractor"),
    call_options={},
    disk_gb=3.1,
)

PIXART = FlashModel(
    key="pixart",
    title="Flash PixArt",
    base=HubRepo(
        "PixArt-alpha/PixArt-XL-2-1024-MS",
        "b89adadeccd9ead2adcb9fa2825d3fabec48d404",
        ("model_index.json", "scheduler/scheduler_config.json")
        + _in("tokenizer", *T5_TOKENIZER_FILES)
        + _in(
            "text_encoder",
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        )
        + _in("transformer", "config.json", "diffusion_pytorch_model.safetensors")
        + _in("vae", "config.json", "diffusion_pytorch_model.safetensors"),
    ),
    adapter=HubRepo(
        "jasperai/flash-pixart",
        "02cd9acc93c1b337cf25584674931d0630f6c392",
        ("adapter_config.json", "adapter_model.safetensors"),
    ),
    adapter_format="peft",
    pipeline="PixArtAlphaPipeline",  # diffusers has no PixArt image-to-image or inpainting pipeline
    denoiser="transformer",
    scheduler="lcm",
    native_size=1024,
    sampler_name="LCM",
    # jasperai/flash-pixart was saved from Jasper's own transformer wrapper (adapter_config.json's auto_mapping:
    # DiffusersTransformer2DWrapper; gojasper/flash-diffusion flash/models/transformers/utils.py,
    # AdaLayerNormSingle), whose AdaLN embedders diffusers' PixArt names adaln_single.emb.*: REFERENCE §1b.
    adapter_foreign_layers=tuple(
        f"adaln_single.{embedder}.{linear}"
        for embedder in ("timestep_embedder", "add_embedding.0", "add_embedding.1", "add_embedding.2")
        for linear in ("linear_1", "linear_2")
    ),
    # Sizes are honoured as asked; captions are not rewritten.
    call_options={"use_resolution_binning": False, "clean_caption": False},
    disk_gb=22.9,
)

MODELS: dict[str, FlashModel] = {m.key: m for m in (SDXL, SD3, SD15, PIXART)}
DEFAULT_MODEL = "sdxl"


def lora_models() -> str:
    """The models that take style LoRAs, and the LoRAs each takes, for messages."""
    return ", ".join(f"{m.title} ({m.key}) with {m.lora_family} LoRAs" for m in MODELS.values() if m.lora_family)
