"""The health check on the real Cog server (coglet 0.23): after a fatal device error, or once the model's thread has
stopped, `GET /health-check` says `UNHEALTHY` with the reason, and later predictions fail at once saying why.

Each failure is injected where it happens by testkit/predictors/operations.py: `#cuda-error` makes the denoiser's
second call raise the error torch raises on an illegal memory access; `#stop-thread` closes the model's thread. Each
leaves its server unable to serve, so each test has a server of its own.
"""

from __future__ import annotations

import time

import pytest

from testkit.cog_server import CogServer, server_root, tiny_png

SMALL = {"aspect_ratio": "custom", "width": 64, "height": 64, "output_format": "png"}
STUB = "testkit/predictors/operations.py:OperationsPredictor"
FATAL = "The GPU failed (AcceleratorError: CUDA error: an illegal memory access was encountered)"


@pytest.fixture
def server(tiny_weights, tmp_path):
    (tmp_path / "tmp").mkdir()
    env = {
        "FLASHSD_WEIGHTS": str(tiny_weights), "FLASHSD_MODEL": "sd15", "COG_MAX_CONCURRENCY": "4",
        "TMPDIR": str(tmp_path / "tmp"), "COG_PREDICT_TYPE_STUB": STUB,
    }  # fmt: skip
    with CogServer(env, tmp_path / "server.log", cwd=server_root(tmp_path / "root")) as served:
        health = served.health_check()
        assert health["status"] == "READY" and "user_healthcheck_error" not in health, health
        yield served


def health_once_idle(server: CogServer, timeout: float = 10) -> dict:
    """The health check once no prediction holds a slot (coglet says BUSY a moment after answering one)."""
    deadline = time.monotonic() + timeout
    while (health := server.health_check())["status"] == "BUSY" and time.monotonic() < deadline:
        time.sleep(0.02)
    return health


def failed(response) -> dict:
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert body["status"] == "failed", body
    return body


def test_after_a_fatal_device_error_the_instance_is_unhealthy_and_later_predictions_fail_at_once(server):
    fatal = failed(server.predict({**SMALL, "prompt": "a lighthouse #cuda-error"}))
    assert FATAL in fatal["error"] and "run the prediction again" in fatal["error"]

    health = health_once_idle(server)
    assert health["status"] == "UNHEALTHY", health
    assert health["user_healthcheck_error"].startswith(
        "Healthcheck failed: Unhealthy: the GPU reported a fatal error (AcceleratorError: CUDA error: an illegal "
        "memory access was encountered): every later prediction would fail"
    ), health

    # A later prediction fails at once, before its inputs are read (this mask without an image would be an input
    # error) and without reaching the model.
    later = failed(server.predict({**SMALL, "prompt": "a harbour", "mask": tiny_png()}))
    assert later["error"] == fatal["error"]
    assert "Generating" not in later["logs"]
    assert health_once_idle(server)["status"] == "UNHEALTHY"  # and it stays so


def test_once_the_model_thread_has_stopped_the_instance_is_unhealthy(server):
    stopped = failed(server.predict({**SMALL, "prompt": "a lighthouse #stop-thread"}))
    assert "the model's thread was shut down" in stopped["error"]

    health = health_once_idle(server)
    assert health["status"] == "UNHEALTHY", health
    assert health["user_healthcheck_error"] == (
        "Healthcheck failed: Unhealthy: the model thread has stopped: no prediction can run"
    ), health
    later = failed(server.predict({**SMALL, "prompt": "a harbour"}))
    assert "the model's thread was shut down" in later["error"]
