"""A model version made from a training: the training's LoRA, applied to every prediction by default.

Replicate creates such a version from a training's output and hands that output to `setup(weights)` (Cog's COG_WEIGHTS:
the URL of the training's tar; coglet 0.23 passes the variable's text as it is, and a local run may give a path). The
tar is fetched and cached as a `lora_weights` tar is (only its `lora.safetensors` read; the file pinned in the cache),
its `training.json` checked against the model served before the model loads (a LoRA trained for another family fails
setup, saying which and how to serve it), and the LoRA fused once the model is loaded, so the first prediction pays
nothing. A prediction whose `lora_weights` is empty gets it at `lora_scale` (0 turns it off); one that names its own
LoRA gets that one instead; `extra_lora` adds to either.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import url2pathname

from ..models import MODELS, FlashModel, lora_models
from ..settings import LoraSettings
from .cache import FOLDER, DiskCache
from .sources import TRAINED_INPUT, LoraError, LoraSource, TrainedLora, parse_lora_source

if TYPE_CHECKING:
    from .fuse import StyleLoras

log = logging.getLogger("flashsd")

# training.json's "format" as flashsd's trainings write it (flashsd/training/export.py, RECORD_FORMAT), any version.
RECORD_FORMAT_PREFIX = "flashsd-lora-training/"
FORMS = (
    "give the URL of a training's output (a tar holding lora.safetensors) or of a LoRA .safetensors file, or the path "
    "of one on this machine"
)


def weights_source(weights) -> LoraSource | None:
    """What setup's `weights` names: None (or empty) nothing; an http(s) URL, a file:// URL or a path to a file."""
    if weights is None:
        return None
    text = (os.fspath(weights) if isinstance(weights, os.PathLike) else str(weights)).strip()
    if not text:
        return None
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme in ("http", "https"):
        return parse_lora_source(text, TRAINED_INPUT)
    if scheme not in ("", "file"):
        raise LoraError(f"{TRAINED_INPUT}={scheme}://… is neither an http(s) URL nor a file: {FORMS}.")
    path = Path(url2pathname(urlsplit(text).path) if scheme else text).expanduser()
    try:
        stat = path.stat()
    except OSError as e:
        raise LoraError(
            f"{TRAINED_INPUT}: {path} cannot be read ({e.strerror or type(e).__name__}): {FORMS}."
        ) from None
    if not path.is_file():
        raise LoraError(f"{TRAINED_INPUT}: {path} is not a file: {FORMS}.")
    path = path.resolve()
    # The key holds the file's size and time: a tar written again at the same path (a new training) is read again.
    return LoraSource(f"file://{path}?{stat.st_size}-{stat.st_mtime_ns}", path=str(path))


def fetch_trained_lora(weights, model: FlashModel, root: Path, settings: LoraSettings) -> TrainedLora | None:
    """The LoRA `weights` names, fetched into the cache under `root` (or found there) and checked against the training
    record it came with; the model is not touched. None without weights; LoraError saying what to do otherwise."""
    source = weights_source(weights)
    if source is None:
        return None
    if model.lora_family is None:
        raise LoraError(
            f"{TRAINED_INPUT}: {model.title} takes no style LoRA (diffusers has no LoRA loader for its pipeline), so "
            f"it cannot serve {source.shown}: serve it with FLASHSD_MODEL set to the model it was trained for "
            f"({lora_models()})."
        )
    cached = DiskCache(Path(root) / FOLDER, settings).fetch(source, TRAINED_INPUT)
    record = cached.training or {}
    if not str(record.get("format", "")).startswith(RECORD_FORMAT_PREFIX):
        record = {}  # no flashsd training record: the LoRA's layers alone are checked, when it is fused
    base = record.get("base_model") if isinstance(record.get("base_model"), dict) else {}
    family = base.get("lora_family")
    if family and family != model.lora_family:
        on = ", ".join(str(base[k]) for k in ("title", "repo") if base.get(k))
        key = base.get("key") if base.get("key") in MODELS else None
        key = key or next((m.key for m in MODELS.values() if m.lora_family == family), None)
        serve = f"FLASHSD_MODEL={key}" if key else "the model it was trained for"
        raise LoraError(
            f"{TRAINED_INPUT}: {source.shown} is a LoRA trained for {family} ({on}); this container serves "
            f"{model.title}, which takes {model.lora_family} LoRAs. Serve it with {serve}, or train on this model "
            f"(FLASHSD_MODEL={model.key})."
        )

    def text(name: str) -> str | None:
        value = record.get(name)
        return value if isinstance(value, str) and value.strip() else None

    return TrainedLora(source, cached.name, text("trigger_word"), text("example_prompt"), base.get("repo"))


def apply_trained_lora(loras: StyleLoras, trained: TrainedLora) -> None:
    """Pin the LoRA's file in the cache and fuse it at scale 1, lora_scale's default (on the model's thread): a LoRA
    whose layers do not fit the model fails setup here, naming the family it was made for."""
    loras.disk.pinned.add(trained.source.key)
    loras.apply((trained.at(1.0),))
    if trained.trigger_word:
        said = f"trigger word {trained.trigger_word!r}, e.g. {repr(trained.example_prompt or trained.trigger_word)}"
    else:
        said = "no training.json: no trigger word known"
    log.info(
        "Trained LoRA %s (%s; trained on %s) is every prediction's lora_weights unless it names its own",
        trained.name, said, trained.trained_on or "a base model of this family",
    )  # fmt: skip
