"""Training style LoRAs on the base model, served at Flash speed (a LoRA trained on the base model runs in 4 steps once
the Flash adapter is on: what `lora_weights` serves).

    data     the archive of images read safely into the training's own folder, captions paired
    options  the inputs, their defaults and limits
    loop     the base model's own objective, as diffusers' LoRA training scripts define it
    export   lora.safetensors (diffusers' format) and training.json, in a tar

`run_training` is the whole of it, as train.py calls it. It uses the weights layout and the download of flashsd.weights
and flashsd.download, never the engine's state.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..download import ensure_weights
from ..logs import Say, leave_out_known_noise
from ..models import FlashModel
from ..runtime import Runtime
from .data import DEFAULT_LIMITS, Limits, TrainingDataError, TrainingSet, load_training_set
from .export import LORA_FILE, RECORD_FILE, record, save_lora, write_tar
from .loop import Stop, TrainedLora, train_lora
from .options import TrainingError, TrainingOptions, checked

__all__ = [
    "LORA_FILE",
    "RECORD_FILE",
    "Limits",
    "TrainingDataError",
    "TrainingError",
    "TrainingOptions",
    "TrainingSet",
    "TrainedLora",
    "checked",
    "load_training_set",
    "run_training",
    "train_lora",
]

log = logging.getLogger("flashsd")
WORK_PREFIX = "flashsd-training-work-"  # the training's own folder, in the temporary folder
TAR_NAME = "trained_model.tar"  # the name cog-sdxl and flux-fine-tuner give theirs


def run_training(
    archive: Path,
    options: TrainingOptions,
    model: FlashModel,
    root: Path,
    runtime: Runtime,
    output_dir: Path,
    *,
    stop: Stop = None,
    says: Sequence[Say] = (),
    limits: Limits = DEFAULT_LIMITS,
) -> Path:
    """Train a LoRA of `model`'s base on the images of `archive`; returns `output_dir/trained_model.tar`.

    The archive is read into a folder of the training's own, removed when the training ends (succeeded, failed or
    cancelled). Bad data, bad options and out of memory are TrainingErrors with a message for a person."""
    options = checked(model, options)  # before any download or file
    started = time.perf_counter()
    leave_out_known_noise()
    folder = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
    try:
        training_set = load_training_set(archive, folder, options.trigger_word, options.resolution, limits)
        ensure_weights(model, root, log=log.info)
        lora = train_lora(model, root, training_set.images, options, runtime.device, stop=stop, says=says)
        import diffusers

        lora_file = save_lora(lora, getattr(diffusers, model.pipeline), folder)
        output_dir.mkdir(parents=True, exist_ok=True)
        tar = write_tar(
            lora_file, record(model, options, training_set, lora, device=str(runtime.device)), output_dir / TAR_NAME
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    log.info("Training done in %.1f s: %s (%s, %s)", time.perf_counter() - started, tar.name, LORA_FILE, RECORD_FILE)
    return tar
