"""Shared fixtures."""

from pathlib import Path

import pytest

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
