"""A tiny Flash model of two fake repos (a base and an adapter) for the fake hub (testkit/fake_hub.py): their
files, their revisions and the model-table row that names them. The download tests serve it and fetch it."""

from __future__ import annotations

import hashlib

from flashsd.models import FlashModel, HubRepo

BASE_REV = hashlib.sha1(b"base").hexdigest()
ADAPTER_REV = hashlib.sha1(b"adapter").hexdigest()
BIG = "unet/diffusion_pytorch_model.safetensors"
BIG_SIZE = 24 * 2**20  # > 2 x huggingface_hub's 10 MiB read chunk, so a resume has bytes to keep


def named_bytes(name: str, size: int) -> bytes:
    """`size` bytes that depend only on `name` (a file's stand-in content)."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def base_files(big: bytes) -> dict[str, bytes]:
    """The base repo's listed files; `big` (BIG_SIZE random bytes) is the one large enough to resume."""
    return {
        "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}\n',
        "scheduler/scheduler_config.json": b'{"timestep_spacing": "trailing"}\n',
        "tokenizer/vocab.json": b'{"a": 0}\n',
        "tokenizer/spiece.model": named_bytes("spiece", 5000),
        "unet/config.json": b'{"sample_size": 8}\n',
        BIG: big,
    }


ADAPTER_FILES = {"pytorch_lora_weights.safetensors": named_bytes("lora", 70_000)}


def tiny_model(base_files: dict[str, bytes], *, gated: bool = False, base_rev: str = BASE_REV) -> FlashModel:
    return FlashModel(
        key="tiny",
        title="Tiny Flash",
        base=HubRepo("fake-org/tiny-base", base_rev, tuple(base_files), gated=gated),
        adapter=HubRepo("fake-org/tiny-flash", ADAPTER_REV, tuple(ADAPTER_FILES)),
        adapter_format="lora",
        pipeline="StableDiffusionPipeline",
        denoiser="unet",
        scheduler="lcm",
        native_size=64,
        sampler_name="LCM",
        safety_checker=None,  # only the two fake repos above
    )


class Log(list):
    """A `log` callback (flashsd.download's) that keeps the lines."""

    def __call__(self, line: str) -> None:
        self.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self)
