"""What a training hands over: a tar holding `lora.safetensors` and `training.json`.

- `lora.safetensors` is written by diffusers' own `save_lora_weights` of the base model's pipeline class, from
  `convert_state_dict_to_diffusers(get_peft_model_state_dict(...))`, exactly as diffusers' LoRA training scripts save
  theirs: keys `unet.<module>.lora.down.weight` / `.lora.up.weight` (and `text_encoder.` / `text_encoder_2.` ones when
  the text encoders were trained), fp32, lora_alpha = rank so no alpha is stored. `load_lora_weights` reads it, and so
  does flashsd's `lora_weights`.
- `training.json` records what the LoRA was trained on and how: the base model (repo and pinned revision), the
  trigger word, steps, rank, learning rate, batch size, resolution, seed, the final loss, a hash of the data, and
  what was skipped from the archive.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

from ..models import FlashModel
from .data import TrainingSet
from .loop import TrainedLora
from .options import TrainingOptions

LORA_FILE = "lora.safetensors"
RECORD_FILE = "training.json"
RECORD_FORMAT = "flashsd-lora-training/1"


def save_lora(lora: TrainedLora, pipeline_class, folder: Path) -> Path:
    """`folder/lora.safetensors`, through the pipeline class's save_lora_weights."""
    pipeline_class.save_lora_weights(
        save_directory=folder,
        weight_name=LORA_FILE,
        **{f"{component}_lora_layers": layers for component, layers in lora.layers.items()},
    )
    return folder / LORA_FILE


def record(
    model: FlashModel, options: TrainingOptions, training_set: TrainingSet, lora: TrainedLora, *, device: str
) -> dict:
    """The contents of training.json."""
    import diffusers
    import peft
    import torch

    return {
        "format": RECORD_FORMAT,
        "base_model": {
            "key": model.key,
            "title": model.title,
            "repo": model.base.id,
            "revision": model.base.revision,
            "vae": None if model.vae is None else {"repo": model.vae.id, "revision": model.vae.revision},
            "lora_family": model.lora_family,
        },
        "trigger_word": options.trigger_word,
        "example_prompt": f"a photo of {options.trigger_word}",
        "steps": options.steps,
        "lora_rank": options.lora_rank,
        "lora_alpha": options.lora_rank,
        "learning_rate": options.learning_rate,
        "batch_size": options.batch_size,
        "resolution": options.resolution,
        "seed": options.seed,
        "train_text_encoder": options.train_text_encoder,
        "components": sorted(lora.layers),
        "trainable_parameters": lora.parameters,
        "final_loss": lora.final_loss,
        "final_loss_steps": min(100, max(1, len(lora.losses) // 10)),
        "first_loss": lora.losses[0] if lora.losses else None,
        "data": {
            "sha256": training_set.sha256,
            "archive_sha256": training_set.archive_sha256,
            "images": len(training_set.images),
            "captions_from_files": sum(1 for i in training_set.images if i.caption_source == "file"),
            "skipped": [{"name": s.name, "reason": s.reason} for s in training_set.skipped],
        },
        "device": device,
        "precision": lora.precision.name,
        "seconds": round(lora.seconds, 3),
        "steps_per_second": round(len(lora.losses) / max(lora.seconds, 1e-9), 4),
        "peak_gpu_memory_bytes": lora.peak_gpu_bytes,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    }


def write_tar(lora_file: Path, training_record: dict, destination: Path) -> Path:
    """`destination`, a plain (ustar) tar of `lora.safetensors` and `training.json` at its top level."""
    partial = destination.with_name(destination.name + ".partial")
    now = int(time.time())
    record_bytes = (json.dumps(training_record, indent=2, sort_keys=True) + "\n").encode()
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
        with open(lora_file, "rb") as lora:
            tar.addfile(_member(LORA_FILE, lora_file.stat().st_size, now), lora)
        tar.addfile(_member(RECORD_FILE, len(record_bytes), now), io.BytesIO(record_bytes))
    partial.replace(destination)
    return destination


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info
