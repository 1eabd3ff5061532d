"""Which weights a benchmark runs on: the real ones where they are complete, else tiny random-weight
repos built into a temporary folder (testkit/tiny_repos.py), so every section also runs offline."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flashsd.models import MODELS, FlashModel
from flashsd.settings import Settings
from flashsd.weights import missing_files, repo_dir


@dataclass(frozen=True)
class Weights:
    root: Path
    kind: str  # "real", "tiny" or "sd15-size"


_TINY_ROOT: Path | None = None


def tiny_root() -> Path:
    global _TINY_ROOT
    if _TINY_ROOT is None:
        _TINY_ROOT = Path(tempfile.mkdtemp(prefix="flashsd-bench-tiny-"))
        atexit.register(shutil.rmtree, _TINY_ROOT, ignore_errors=True)
    return _TINY_ROOT


def weights_for(model: FlashModel, choice: str) -> Weights:
    """`choice`: "auto" (real weights under FLASHSD_WEIGHTS / weights/ when complete, else tiny), "tiny",
    "sd15-size" (random weights at SD1.5's real sizes, sd15 only: bench/coldboot.py builds them), or a folder of real
    weights."""
    if choice == "sd15-size":
        if model.key != "sd15":
            raise SystemExit("--weights sd15-size has weights for sd15 only: add --model sd15 --models sd15")
        from bench.coldboot import DEFAULT_ROOT, build

        return Weights(build("sd15", DEFAULT_ROOT), "sd15-size")
    if choice not in ("auto", "tiny"):
        root = Path(choice)
        missing = missing_files(model, root)
        if missing:
            raise SystemExit(f"{root} lacks {len(missing)} file(s) of {model.key}, e.g. {missing[0]}")
        return Weights(root, "real")
    if choice == "auto":
        root = Settings.from_environ().weights_root  # FLASHSD_WEIGHTS, else weights/
        if root.is_dir() and not missing_files(model, root):
            return Weights(root, "real")
    from testkit.tiny_repos import build_tiny_weights

    return Weights(build_tiny_weights(tiny_root(), (model.key,)), "tiny")


def disk_bytes(model: FlashModel, root: Path) -> int:
    """Bytes of the weight files (safetensors) the model loads; configs and tokenizers left out."""
    return sum(
        (repo_dir(root, repo) / name).stat().st_size
        for repo in model.repos for name in repo.files if name.endswith(".safetensors")
    )  # fmt: skip


def all_models() -> list[str]:
    return list(MODELS)
