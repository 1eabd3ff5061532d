"""What a training is asked for: the inputs of `train.py`, their defaults and limits, checked once.

The Cog inputs in train.py declare the same limits (tests/test_training_schema.py holds them to these).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from ..errors import InputError
from ..models import MODELS, FlashModel

DEFAULT_TRIGGER_WORD = "TOK"
DEFAULT_STEPS, MAX_STEPS = 1000, 10000
DEFAULT_LEARNING_RATE, MIN_LEARNING_RATE, MAX_LEARNING_RATE = 1e-4, 1e-6, 1e-2
DEFAULT_RANK, MAX_RANK = 16, 128
MIN_RESOLUTION, MAX_RESOLUTION, RESOLUTION_STEP = 256, 2048, 64
DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE = 1, 8
MAX_SEED = 2**53 - 1  # what JavaScript clients hold exactly
# The pipelines whose base models flashsd trains LoRAs for (UNet families; flashsd.training.loop).
TRAINABLE_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionPipeline")


class TrainingError(InputError):
    """A training that cannot run as asked: the message says what was wrong and what is allowed."""


@dataclass(frozen=True)
class TrainingOptions:
    trigger_word: str = DEFAULT_TRIGGER_WORD
    steps: int = DEFAULT_STEPS
    learning_rate: float = DEFAULT_LEARNING_RATE
    lora_rank: int = DEFAULT_RANK
    resolution: int | None = None  # None: the model's native size
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int | None = None  # None: a random seed (recorded)
    train_text_encoder: bool = False


def trainable_models() -> str:
    return ", ".join(f"{m.title} ({m.key})" for m in MODELS.values() if m.pipeline in TRAINABLE_PIPELINES)


def checked(model: FlashModel, options: TrainingOptions) -> TrainingOptions:
    """`options` with the resolution and seed resolved, or a TrainingError naming every input out of bounds."""
    if model.pipeline not in TRAINABLE_PIPELINES:
        raise TrainingError(
            f"{model.title} has no LoRA training here; trainable base models: {trainable_models()} (set FLASHSD_MODEL)."
        )
    resolution = model.native_size if options.resolution is None else options.resolution
    problems = []
    if not options.trigger_word.strip():
        problems.append("trigger_word must not be empty: it is the word prompts use to call what was trained")
    if not 1 <= options.steps <= MAX_STEPS:
        problems.append(f"steps must be 1-{MAX_STEPS} (it is {options.steps})")
    if not MIN_LEARNING_RATE <= options.learning_rate <= MAX_LEARNING_RATE:
        problems.append(
            f"learning_rate must be {MIN_LEARNING_RATE:g}-{MAX_LEARNING_RATE:g} (it is {options.learning_rate:g})"
        )
    if not 1 <= options.lora_rank <= MAX_RANK:
        problems.append(f"lora_rank must be 1-{MAX_RANK} (it is {options.lora_rank})")
    if not (MIN_RESOLUTION <= resolution <= MAX_RESOLUTION and resolution % RESOLUTION_STEP == 0):
        problems.append(
            f"resolution must be a multiple of {RESOLUTION_STEP} from {MIN_RESOLUTION} to {MAX_RESOLUTION} "
            f"(it is {resolution}; {model.title}'s native size is {model.native_size})"
        )
    if not 1 <= options.batch_size <= MAX_BATCH_SIZE:
        problems.append(f"batch_size must be 1-{MAX_BATCH_SIZE} (it is {options.batch_size})")
    if options.seed is not None and not 0 <= options.seed <= MAX_SEED:
        problems.append(f"seed must be 0-{MAX_SEED} (it is {options.seed})")
    if problems:
        raise TrainingError("; ".join(problems) + ".")
    seed = random.SystemRandom().randrange(2**32) if options.seed is None else options.seed
    return replace(options, trigger_word=options.trigger_word.strip(), resolution=resolution, seed=seed)
