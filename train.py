"""The Cog trainer (cog.yaml `train:`; Replicate's /trainings): a style LoRA trained on the base model from a zip or
tar of images, returned as a tar of `lora.safetensors` and `training.json`, which `lora_weights` serves at Flash speed.

The base model is FLASHSD_MODEL's (sdxl or sd15), its weights under FLASHSD_WEIGHTS. The work lives in
flashsd.training; this file declares the inputs (literal values only: `cog build` reads them from the text).
"""

import logging
from typing import Optional

from cog import BaseModel, Input, Path

from flashsd.cog_files import OutputFolders
from flashsd.models import MODELS
from flashsd.runtime import select_runtime
from flashsd.settings import Settings
from flashsd.training import TrainingOptions, run_training

# The last training's tar stays until the next training starts (Cog sends it after train() returns).
_outputs = OutputFolders(keep=1, prefix="flashsd-training-output-")


class TrainingOutput(BaseModel):
    weights: Path


def train(
    input_images: Path = Input(
        description="A zip or tar of images (png, jpg, webp, bmp, gif, tiff). A .txt file with the same name as an image (dog.jpg, dog.txt) is its caption; images without one are captioned with trigger_word. Other files are skipped and listed in the logs.",
    ),
    trigger_word: str = Input(
        description="The word that calls what was trained in prompts (a photo of TOK). Prepended to captions that lack it.",
        default="TOK",
    ),
    steps: int = Input(description="Optimisation steps.", ge=1, le=10000, default=1000),
    learning_rate: float = Input(
        description="AdamW learning rate of the LoRA weights.", ge=0.000001, le=0.01, default=0.0001
    ),
    lora_rank: int = Input(
        description="Rank of the LoRA: higher learns more detail and makes a larger file.", ge=1, le=128, default=16
    ),
    resolution: Optional[int] = Input(
        description="Training resolution in pixels, a multiple of 64 (images are resized and centre-cropped to it). Leave empty for the model's native size: 1024 for SDXL, 512 for SD1.5.",
        ge=256,
        le=2048,
        default=None,
    ),
    batch_size: int = Input(description="Images per step.", ge=1, le=8, default=1),
    seed: Optional[int] = Input(
        description="Random seed: the same seed, images and inputs give the same LoRA. Leave empty for a random seed (recorded in training.json).",
        ge=0,
        le=9007199254740991,
        default=None,
    ),
    train_text_encoder: bool = Input(
        description="Also train LoRA layers on the text encoders (learns new words better; a larger file).",
        default=False,
    ),
) -> TrainingOutput:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings.from_environ()  # a bad setting fails the training here, naming it
    model = MODELS[settings.model]
    options = TrainingOptions(
        trigger_word=trigger_word,
        steps=steps,
        learning_rate=learning_rate,
        lora_rank=lora_rank,
        resolution=resolution,
        batch_size=batch_size,
        seed=seed,
        train_text_encoder=train_text_encoder,
    )
    runtime = select_runtime(settings.device)
    folder = _outputs.fresh()
    try:
        tar = run_training(input_images, options, model, settings.weights_root, runtime, folder)
    except BaseException:  # failed or cancelled: nothing half-written is kept
        _outputs.discard(folder)
        raise
    return TrainingOutput(weights=Path(tar))
