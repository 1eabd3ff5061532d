"""Every setting of the container, read from the environment once, at setup, into one object.

Nothing else in flashsd reads a FLASHSD_* variable: the predictor, the command line and the benchmarks call
`Settings.from_environ()` once and hand the object (or the parts of it each module needs) down. A bad value fails
setup with one message naming every bad variable, its value and what is allowed, so a container that cannot serve
says so before its first prediction (Cog then reports the setup as failed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .control import CONTROL_TYPES, build_problem
from .errors import SettingsError
from .models import DEFAULT_MODEL, MODELS
from .weights import PROJECT_ROOT

DEVICES = ("auto", "cuda", "cpu")
GB = 1e9
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class LoraSettings:
    """Bounds of the style-LoRA caches and downloads (flashsd.loras)."""

    cache_bytes: int = int(10 * GB)  # FLASHSD_LORA_CACHE_GB: LoRA files kept on disk
    max_file_bytes: int = int(2 * GB)  # FLASHSD_LORA_MAX_GB: one LoRA file
    memory_bytes: int = int(2 * GB)  # FLASHSD_LORA_MEMORY_GB: state dicts kept in memory
    timeout_s: float = 30.0  # FLASHSD_LORA_TIMEOUT_S: a download that sends nothing for this long fails


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL  # FLASHSD_MODEL: a key of flashsd.models.MODELS
    weights_root: Path = PROJECT_ROOT / "weights"  # FLASHSD_WEIGHTS
    device: str = "auto"  # FLASHSD_DEVICE: one of DEVICES (flashsd.runtime)
    compile: bool = False  # FLASHSD_COMPILE: compiled mode (flashsd.speed)
    compile_mode: str | None = None  # FLASHSD_COMPILE_MODE: torch.compile's mode
    # FLASHSD_BATCH_MEGAPIXELS: images one shared pipeline call may hold (four 1024x1024 images, what one
    # prediction of num_outputs=4 already asks of the GPU)
    batch_megapixels: float = 4.2
    loras: LoraSettings = field(default_factory=LoraSettings)
    max_concurrency: int = 1  # COG_MAX_CONCURRENCY, as coglet reads it: predictions in flight at once
    # FLASHSD_CONTROLNETS: the control types (flashsd.control.CONTROL_TYPES) whose ControlNets the build holds, a
    # comma list (empty: none). Chosen at build, like the model: they are downloaded and loaded at setup.
    controlnets: tuple[str, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings `environ` (default: this process's environment) gives; SettingsError naming every bad one."""
        environ = os.environ if environ is None else environ
        problems: list[str] = []

        def read(name: str, parse: Callable[[str], object], allowed: str, default):
            raw = environ.get(name, "")
            if not raw.strip():
                return default
            try:
                return parse(raw.strip())
            except ValueError:
                problems.append(f"{name}={raw!r} is not allowed: {allowed}")
                return default

        def choice(options) -> Callable[[str], str]:
            def parse(text: str) -> str:
                if text.lower() not in options:
                    raise ValueError(text)
                return text.lower()

            return parse

        def flag(text: str) -> bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError(text)
            return text.lower() in _TRUE

        def control_types(text: str) -> tuple[str, ...]:
            types = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
            if any(t not in CONTROL_TYPES for t in types):
                raise ValueError(text)
            return types

        def positive(text: str) -> float:
            value = float(text)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(text)
            return value

        lora_defaults = LoraSettings()

        def gigabytes(name: str, default: int) -> int:
            return int(
                read(name, positive, f"a number of gigabytes above 0 (default {default / GB:g})", default / GB) * GB
            )

        settings = cls(
            model=read("FLASHSD_MODEL", choice(MODELS), f"one of {', '.join(MODELS)} (default {DEFAULT_MODEL})", DEFAULT_MODEL),
            weights_root=read(
                "FLASHSD_WEIGHTS", lambda text: Path(text).expanduser().resolve(), "a folder", cls.weights_root
            ),
            device=read(
                "FLASHSD_DEVICE", choice(DEVICES),
                f"one of {', '.join(DEVICES)} (auto: the GPU when torch can use it, else the CPU; cuda: the GPU or "
                "fail; cpu: the CPU)", "auto",
            ),
            compile=read("FLASHSD_COMPILE", flag, "1 for compiled mode, 0 or unset for eager", False),
            compile_mode=environ.get("FLASHSD_COMPILE_MODE", "").strip() or None,
            batch_megapixels=read(
                "FLASHSD_BATCH_MEGAPIXELS", positive, f"a number of megapixels above 0 (default {cls.batch_megapixels})",
                cls.batch_megapixels,
            ),
            loras=LoraSettings(
                cache_bytes=gigabytes("FLASHSD_LORA_CACHE_GB", lora_defaults.cache_bytes),
                max_file_bytes=gigabytes("FLASHSD_LORA_MAX_GB", lora_defaults.max_file_bytes),
                memory_bytes=gigabytes("FLASHSD_LORA_MEMORY_GB", lora_defaults.memory_bytes),
                timeout_s=read(
                    "FLASHSD_LORA_TIMEOUT_S", positive,
                    f"a number of seconds above 0 (default {lora_defaults.timeout_s:g})", lora_defaults.timeout_s,
                ),
            ),
            max_concurrency=_coglet_concurrency(environ.get("COG_MAX_CONCURRENCY", "")),
            controlnets=read(
                "FLASHSD_CONTROLNETS", control_types,
                f"a comma list of control types from {', '.join(CONTROL_TYPES)} (default: empty, no ControlNet)", (),
            ),
        )  # fmt: skip
        problem = build_problem(MODELS[settings.model], settings.controlnets)
        if problem:
            problems.append(f"FLASHSD_CONTROLNETS={','.join(settings.controlnets)} is not allowed: {problem}")
        if problems:
            raise SettingsError(
                "The container's settings (environment variables, e.g. cog.yaml's environment:) are wrong: "
                + "; ".join(problems)
                + "."
            )
        return settings


def _coglet_concurrency(text: str) -> int:
    """COG_MAX_CONCURRENCY as coglet reads it (cog build writes it from @concurrent): one prediction at a time
    unless it is a whole number of at least 1. Read the same way, so the predictor agrees with the server."""
    text = text.strip()
    return int(text) if text.isdigit() and int(text) > 0 else 1
