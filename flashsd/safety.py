"""The CompVis Stable Diffusion safety checker, run by flashsd on the finished images of every model.

The stock SD pipelines run it themselves and replace a flagged image by a black one. flashsd instead keeps the
pipelines without it, runs it once per prediction on all the images, and leaves flagged images out: the
prediction fails only when every image is flagged (ImagesFlagged), and no placeholder is ever returned.

Weights: `safety_checker/` and `feature_extractor/` of the SD1.5 repo (the CompVis checker as safetensors; the
CompVis repo itself ships only a pickle), loaded once, on the pipeline's device and in its dtype (fp16 on CUDA).

A second opinion, as replicate/cog-flux does it (its false positives are a standing complaint, e.g.
replicate/cog-stable-diffusion #14): only the images the CompVis checker flags are shown to a second classifier,
`Falconsai/nsfw_image_detection` (a ViT labelling an image `normal` or `nsfw`), and an image it calls `normal` is
kept. Unflagged images never reach it. Each image's `Verdict` says which checker decided, for the log line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .errors import InputError, WeightsError
from .models import SAFETY_CHECKER_VARIANT, HubRepo
from .weights import repo_dir

# A concept's score is its cosine similarity minus its threshold; images close to a "special care" concept get
# every concept score raised by this much (as in diffusers' StableDiffusionSafetyChecker.forward).
SPECIAL_CARE_ADJUSTMENT = 0.01
FIRST_CHECKER = "the CompVis safety checker"
KEEP_LABEL = "normal"  # the second opinion's label for an image that is kept (cog-flux: `result == "normal"`)


class ImagesFlagged(InputError):
    """Every generated image was flagged: nothing is left to return."""

    def __init__(self, count: int):
        images = "The generated image was" if count == 1 else f"All {count} generated images were"
        super().__init__(
            f"{images} flagged as potentially NSFW by the safety checker, so there is nothing to return. Try a "
            "different prompt or seed, or set disable_safety_checker to true."
        )
        self.count = count


@dataclass(frozen=True)
class Verdict:
    """One image's outcome. True as a bool when the image is left out, so a verdict reads as the flag it is."""

    flagged: bool  # left out
    decided_by: str  # the checker whose call it was: FIRST_CHECKER, or the second opinion when it was asked
    cleared: bool = False  # flagged by the CompVis checker, kept on the second opinion

    def __bool__(self) -> bool:
        return self.flagged


class SecondOpinion:
    """The image classifier that re-checks flagged images (transformers ViTForImageClassification)."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype, name: str):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.name = name

    @classmethod
    def load(cls, root: Path | str, repo: HubRepo, device: torch.device, dtype: torch.dtype) -> SecondOpinion:
        from transformers import ViTForImageClassification, ViTImageProcessorPil

        folder = repo_dir(root, repo)
        model = ViTForImageClassification.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, local_files_only=True, device_map=device.type
        )
        labels = set(model.config.id2label.values())
        if KEEP_LABEL not in labels:
            raise WeightsError(
                f"The second safety opinion {folder} labels images {sorted(labels)}, without {KEEP_LABEL!r}: "
                f"it is not {repo.id} at {repo.revision}. Fetch it again with `scripts/download-weights --verify`."
            )
        model.eval()
        # The PIL implementation explicitly: the default one needs torchvision, which flashsd does not install.
        processor = ViTImageProcessorPil.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, device, dtype, f"the second opinion ({repo.id})")

    @torch.no_grad()
    def labels(self, images: Sequence[Image.Image]) -> list[str]:
        """The classifier's label for each image (the most likely one, as its model card reads it)."""
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        logits = self.model(pixel_values=pixels.to(self.device, self.dtype)).logits
        return [self.model.config.id2label[int(i)] for i in logits.argmax(dim=-1).tolist()]


class SafetyChecker:
    def __init__(
        self, model, processor, device: torch.device, dtype: torch.dtype, second_opinion: SecondOpinion | None = None
    ):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.second_opinion = second_opinion

    @classmethod
    def load(
        cls,
        root: Path | str,
        repo: HubRepo,
        device: torch.device,
        dtype: torch.dtype,
        second_opinion: HubRepo | None = None,
    ) -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessorPil

        folder = repo_dir(root, repo)
        # Loaded straight onto the device, in its dtype (no host copy first), as the pipeline is.
        model = StableDiffusionSafetyChecker.from_pretrained(
            folder / "safety_checker", variant=SAFETY_CHECKER_VARIANT, dtype=dtype, use_safetensors=True,
            local_files_only=True, device_map=device.type,
        )  # fmt: skip
        model.eval()
        # The PIL implementation explicitly: the default one needs torchvision, which flashsd does not install.
        processor = CLIPImageProcessorPil.from_pretrained(folder / "feature_extractor", local_files_only=True)
        second = SecondOpinion.load(root, second_opinion, device, dtype) if second_opinion is not None else None
        return cls(model, processor, device, dtype, second)

    def flags(self, images: Sequence[Image.Image]) -> list[Verdict]:
        """One verdict per image, true where the image is left out: flagged by the CompVis checker and, when there
        is a second opinion, not called `normal` by it. Only flagged images are shown to the second opinion."""
        first = self.compvis_flags(images)
        verdicts = [Verdict(flagged, FIRST_CHECKER) for flagged in first]
        flagged = [i for i, f in enumerate(first) if f]
        if flagged and self.second_opinion is not None:
            labels = self.second_opinion.labels([images[i] for i in flagged])
            for i, label in zip(flagged, labels):
                kept = label == KEEP_LABEL
                verdicts[i] = Verdict(not kept, self.second_opinion.name, cleared=kept)
        return verdicts

    @torch.no_grad()
    def compvis_flags(self, images: Sequence[Image.Image]) -> list[bool]:
        """The CompVis checker's flag per image: True where it finds a concept (diffusers' own rule, see
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


def screen_lines(verdicts: Sequence[Verdict], seeds: Sequence[int]) -> list[tuple[int, str]]:
    """The log lines (level, text) of one prediction's verdicts: the images left out and the checker that decided,
    and the images the second opinion kept. Nothing when no image was flagged."""
    lines = []
    total = len(verdicts)
    left_out = [(v, seed) for v, seed in zip(verdicts, seeds) if v.flagged]
    if left_out:
        deciders = sorted({v.decided_by for v, _ in left_out})
        confirmed = [FIRST_CHECKER + (f", confirmed by {d}" if d != FIRST_CHECKER else "") for d in deciders]
        lines.append((
            logging.WARNING,
            f"Safety checker: {len(left_out)} of {total} image(s) flagged as potentially NSFW and left out (seeds "
            f"{', '.join(str(seed) for _, seed in left_out)}); decided by {' and '.join(confirmed)}",
        ))  # fmt: skip
    cleared = [(v, seed) for v, seed in zip(verdicts, seeds) if v.cleared]
    if cleared:
        lines.append((
            logging.INFO,
            f"Safety checker: {len(cleared)} of {total} image(s) flagged by {FIRST_CHECKER} were called "
            f"{KEEP_LABEL} by {cleared[0][0].decided_by} and kept (seeds {', '.join(str(s) for _, s in cleared)})",
        ))  # fmt: skip
    return lines
