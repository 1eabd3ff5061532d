"""Shared fixtures. Plain helpers live in testkit/; no test module imports another."""

import os
from pathlib import Path

import pytest

from testkit import fake_model
from testkit.tiny_repos import build_tiny_weights


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A weights root holding tiny random-weight copies of every Flash model's repos, in the real layout
    (`root / repo.id / file` for each file the product downloads)."""
    return build_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def engines(tiny_weights):
    """engines(key): the Engine of model `key` on the tiny weights (CPU, fp32), loaded once for the session.
    Tests that change an engine put it back as they found it."""
    import torch

    from flashsd.engine import Engine
    from flashsd.models import MODELS
    from flashsd.runtime import Runtime

    loaded = {}

    def get(key):
        if key not in loaded:
            loaded[key] = Engine.load(MODELS[key], tiny_weights, Runtime(torch.device("cpu"), torch.float32))
        return loaded[key]

    return get


@pytest.fixture(scope="session")
def control_engines(tiny_weights):
    """control_engines(key): the Engine of model `key` built with every ControlNet it takes (FLASHSD_CONTROLNETS=
    canny,depth) on the tiny weights (CPU, fp32), loaded once for the session. Tests put it back as they found it."""
    import torch

    from flashsd.control import CONTROL_TYPES
    from flashsd.engine import Engine
    from flashsd.models import MODELS
    from flashsd.runtime import Runtime
    from flashsd.settings import Settings

    loaded = {}

    def get(key):
        if key not in loaded:
            settings = Settings(controlnets=CONTROL_TYPES)
            loaded[key] = Engine.load(MODELS[key], tiny_weights, Runtime(torch.device("cpu"), torch.float32), settings)
        return loaded[key]

    return get


@pytest.fixture
def unpickling(monkeypatch) -> list:
    """Every attempt to unpickle (torch.load, pickle.load/loads) is refused and recorded in the returned list."""
    import pickle

    import torch

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:1])
        raise AssertionError("pickle loaded")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    return attempts


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """A hermetic huggingface_hub: temporary HF_HOME, no token, no Xet, progress bars off."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    for var in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "FLASHSD_WEIGHTS",
        "FLASHSD_MODEL",
        "HF_HUB_ETAG_TIMEOUT",
        "HF_OIDC_RESOURCE",
    ):
        monkeypatch.delenv(var, raising=False)
    env = {
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",  # else huggingface_hub asks {HF_ENDPOINT at import}/api/agent-harnesses
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # huggingface_hub reads these once, at import: patch the module too.
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_XET_CACHE", str(home / "xet"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return home


@pytest.fixture(scope="module")
def big() -> bytes:
    """The fake base repo's large file: random, so a corrupted or resumed transfer cannot match by chance."""
    return os.urandom(fake_model.BIG_SIZE)


@pytest.fixture
def base_files(big: bytes) -> dict[str, bytes]:
    """The fake base repo's listed files (testkit/fake_model.py)."""
    return fake_model.base_files(big)


@pytest.fixture(scope="session")
def lora_file(tiny_weights, tmp_path_factory):
    """lora_file(name): a style LoRA file of testkit.style_loras.FILES for the tiny weights, written once."""
    from testkit.style_loras import lora_files

    return lora_files(tiny_weights, tmp_path_factory.mktemp("lora-files"))
