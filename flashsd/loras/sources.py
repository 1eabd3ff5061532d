"""Where a style LoRA comes from, as a request names it (`lora_weights`, `extra_lora`), checked before anything is
fetched."""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import quote, unquote, urlsplit

from ..errors import InputError, redact
from ..weights import PICKLE_SUFFIXES

MAX_LORA_SOURCE_CHARS = 2048
# Hugging Face repo ids: owner and name of letters, digits, '-', '_', '.' (the hub's own rule, at most 96 each).
_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_HUB_HOSTS = ("huggingface.co", "hf.co")


class LoraError(InputError):
    """A style LoRA that cannot be used as given: the message names the input and says what to do."""


@dataclass(frozen=True)
class LoraSource:
    """Where a LoRA comes from: a URL, a Hugging Face repo (and file, and revision when the URL named one), or a local
    file (only the container's own weights, flashsd.loras.trained: no request may name a file of the machine)."""

    # As given, stripped: the cache key (a URL's query may hold a key: never shown). A local file's: path, size, time.
    text: str
    url: str | None = None
    repo: str | None = None
    filename: str | None = None
    revision: str | None = None
    path: str | None = None

    @property
    def key(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @property
    def shown(self) -> str:
        """The source as logs and messages say it: a URL as sent (spaces percent-encoded), without its query,
        fragment or user info."""
        if self.path is not None:
            return self.path
        if self.url is None:
            return "/".join(p for p in (self.repo, self.filename) if p)
        return redact(quote(self.url, safe=string.punctuation))


@dataclass(frozen=True)
class StyleLora:
    """One LoRA of a request: which input named it, where it comes from, and its scale."""

    input: str  # "lora_weights" or "extra_lora"
    source: LoraSource
    scale: float


TRAINED_INPUT = "weights"  # how messages name the container's own trained LoRA: setup's argument (COG_WEIGHTS)


@dataclass(frozen=True)
class TrainedLora:
    """The LoRA of the training a model version was made from (flashsd.loras.trained): every prediction's
    `lora_weights` unless it names its own."""

    source: LoraSource
    name: str
    trigger_word: str | None = None  # from the training's training.json, when it has one
    example_prompt: str | None = None
    trained_on: str | None = None  # the base model's repo

    def at(self, scale: float) -> StyleLora:
        return StyleLora(TRAINED_INPUT, self.source, scale)


def pickle_message(input_name: str, shown: str) -> str:
    return (
        f"{input_name}: {shown} is a pickled PyTorch file (.ckpt/.pt/.bin), not a safetensors file. Loading a pickle "
        "can run arbitrary code, so flashsd reads only .safetensors LoRAs: use the .safetensors version of this LoRA."
    )


def parse_lora_source(text: str, input_name: str) -> LoraSource:
    """The LoRA source `text` names; InputError (naming `input_name`) when it names none flashsd can fetch."""
    text = text.strip()
    forms = (
        "give the https:// URL of a .safetensors file (or of a trainer's .tar holding lora.safetensors), a Hugging "
        "Face repo as owner/name, or a file in one as owner/name/file.safetensors"
    )
    if len(text) > MAX_LORA_SOURCE_CHARS:
        raise InputError(f"{input_name} is {len(text)} characters long (at most {MAX_LORA_SOURCE_CHARS}): {forms}.")
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            shown = f"{parts.scheme}://…" if parts.scheme else repr(text[:40])
            raise InputError(f"{input_name}={shown} is not an http(s) URL: {forms}.")
        source = LoraSource(text, url=text)
        path = unquote(parts.path)
        if path.lower().endswith(PICKLE_SUFFIXES):
            raise InputError(pickle_message(input_name, source.shown))
        # https://huggingface.co/<owner>/<name>/resolve|blob/<revision>/<file>: fetched from the hub (HF_TOKEN).
        segments = path.strip("/").split("/")
        if parts.hostname.lower() in _HUB_HOSTS and len(segments) >= 5 and segments[2] in ("resolve", "blob"):
            repo = "/".join(segments[:2])
            filename = "/".join(segments[4:])
            if _REPO_PART.match(segments[0]) and _REPO_PART.match(segments[1]) and filename.endswith(".safetensors"):
                return LoraSource(text, repo=repo, filename=filename, revision=segments[3])
        return source
    parts = text.split("/")
    shown = text if len(text) <= 120 else text[:117] + "…"
    if len(parts) < 2 or not all(_REPO_PART.match(p) for p in parts[:2]):
        raise InputError(f"{input_name}={shown!r} is neither an http(s) URL nor a Hugging Face repo: {forms}.")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    if filename is not None:
        names = PurePosixPath(filename).parts
        if any(p in ("", ".", "..") for p in parts[2:]) or not names:
            raise InputError(f"{input_name}={shown!r} does not name a file inside the repo {repo}: {forms}.")
        if filename.lower().endswith(PICKLE_SUFFIXES):
            raise InputError(pickle_message(input_name, text))
        if not filename.endswith(".safetensors"):
            raise InputError(f"{input_name}={shown!r} names a file that is not .safetensors: {forms}.")
    return LoraSource(text, repo=repo, filename=filename)
