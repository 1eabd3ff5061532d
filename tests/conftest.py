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
