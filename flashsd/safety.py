"""The CompVis Stable Diffusion safety checker, run by flashsd on the finished images of every model.

The stock SD pipelines run it themselves and replace a flagged image by a black one. flashsd instead keeps the
pipelines without it, runs it once per prediction on all the images, and leaves flagged images out: the
prediction fails only when every image is flagged (ImagesFlagged), and no placeholder is ever returned.

Weights: `safety_checker/` and `feature_extractor/` of the SD1.5 repo (the CompVis checker as safetensors; the
CompVis repo itself ships only a pickle), loaded once, on the pipeline's device and in its dtype (fp16 on CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .errors import InputError
from .models import SAFETY_CHECKER_VARIANT, HubRepo
from .weights import repo_dir

# A concept's score is its cosine similarity minus its threshold; images close to a "special care" concept get
# every concept score raised by this much (as in diffusers' StableDiffusionSafetyChecker.forward).
SPECIAL_CARE_ADJUSTMENT = 0.01


class ImagesFlagged(InputError):
    """Every generated image was flagged: nothing is left to return."""

    def __init__(self, count: int):
        images = "The generated image was" if count == 1 else f"All {count} generated images were"
        super().__init__(
            f"{images} flagged as potentially NSFW by the safety checker, so there is nothing to return. Try a "
            "different prompt or seed, or set disable_safety_checker to true."
        )
        self.count = count


class SafetyChecker:
    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, root: Path | str, repo: HubRepo, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessorPil

        folder = repo_dir(root, repo)
        model = StableDiffusionSafetyChecker.from_pretrained(
            folder / "safety_checker", variant=SAFETY_CHECKER_VARIANT, dtype=dtype, use_safetensors=True,
            local_files_only=True,
        )  # fmt: skip
        model.to(device).eval()
        # The PIL implementation explicitly: the default one needs torchvision, which flashsd does not install.
        processor = CLIPImageProcessorPil.from_pretrained(folder / "feature_extractor", local_files_only=True)
        return cls(model, processor, device, dtype)

    @torch.no_grad()
    def flags(self, images: Sequence[Image.Image]) -> list[bool]:
        """One flag per image: True where the checker finds a concept (diffusers' own rule, see
        StableDiffusionSafetyChecker.forward, computed batched and without blacking anything out)."""
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        if not images:
            return []
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        m = self.model
        pooled = m.vision_model(pixels.to(self.device, self.dtype))[1]
        embeds = m.visual_projection(pooled).float()
        special = cosine_distance(embeds, m.special_care_embeds.float())
        concepts = cosine_distance(embeds, m.concept_embeds.float())
        special_scores = torch.round(special - m.special_care_embeds_weights.float(), decimals=3)
        adjustment = (special_scores > 0).any(dim=1, keepdim=True) * SPECIAL_CARE_ADJUSTMENT
        concept_scores = torch.round(concepts - m.concept_embeds_weights.float() + adjustment, decimals=3)
        return (concept_scores > 0).any(dim=1).cpu().tolist()
