"""A model's files in a weights root (flashsd's layout: `root / repo id / file`), for tests that copy or damage them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flashsd.models import MODELS
from flashsd.weights import repo_dir


def copy_model(src: Path, dst: Path, key: str) -> Path:
    """Copy model `key`'s repos from the weights root `src` into `dst`; returns `dst`."""
    for repo in MODELS[key].repos:
        shutil.copytree(repo_dir(src, repo), repo_dir(dst, repo), dirs_exist_ok=True)
    return dst


def denoiser_file(root: Path, key: str) -> Path:
    """The denoiser's (first) safetensors file in the base repo."""
    model = MODELS[key]
    return next(
        repo_dir(root, model.base) / f
        for f in model.base.files
        if f.startswith(f"{model.denoiser}/") and f.endswith(".safetensors")
    )


def adapter_file(root: Path, key: str) -> Path:
    """The Flash adapter's safetensors file."""
    model = MODELS[key]
    return repo_dir(root, model.adapter) / next(f for f in model.adapter.files if f.endswith(".safetensors"))


def truncate(path: Path) -> None:
    """Cut the file to half its length, as an interrupted copy leaves it."""
    os.truncate(path, path.stat().st_size // 2)
