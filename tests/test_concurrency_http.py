"""Concurrent predictions on the real Cog server (coglet 0.23): Cog sees the limit, compatible predictions share
denoiser calls, and each prediction stays its own."""

from __future__ import annotations

import re
import threading
import time
import uuid

import numpy as np
import pytest
import requests

from testkit.cog_server import PROJECT_ROOT, CogServer, declared_concurrency, decode_data_url
from testkit.soak import soak

SMALL = {"aspect_ratio": "custom", "width": 64, "height": 64, "output_format": "png"}


MAX = declared_concurrency()


def test_make_serve_runs_as_many_predictions_at_once_as_the_decorator_declares():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(rf"\bCOG_MAX_CONCURRENCY={MAX}\b", makefile)
    assert MAX > 1


@pytest.fixture(scope="module")
def temp(tmp_path_factory):
    return tmp_path_factory.mktemp("concurrent-tmp")


@pytest.fixture(scope="module")
def served(tiny_weights, tmp_path_factory, temp):
    env = {
        "FLASHSD_WEIGHTS": str(tiny_weights), "FLASHSD_MODEL": "sd15", "COG_MAX_CONCURRENCY": str(MAX),
        "TMPDIR": str(temp),
    }  # fmt: skip
    with CogServer(env, tmp_path_factory.mktemp("concurrent") / "server.log") as server:
        assert server.health() == "READY", server.logs()
        yield server


def pixels(response) -> np.ndarray:
    return np.asarray(decode_data_url(response.json()["output"][0]).convert("RGB")).astype(np.int16)


def test_concurrent_predictions_share_calls_and_each_gets_its_own_images_and_logs(served):
    inputs = [{**SMALL, "prompt": f"a lighthouse number {i}", "seed": 100 + 10 * i} for i in range(MAX)]
    together = served.post_at_once(inputs)
    assert [r.status_code for r in together] == [200] * MAX
    assert all(r.json()["status"] == "succeeded" for r in together), [r.json() for r in together]
    logs = [r.json()["logs"] for r in together]
    assert any("in one call with" in text for text in logs), logs  # some of them did share a denoiser call
    for i, text in enumerate(logs):
        assert f"seeds {100 + 10 * i}" in text
        assert not any(f"seeds {100 + 10 * j}" in text for j in range(MAX) if j != i)  # nothing of another
        assert len(re.findall(r"^\s*\d+%\|.*\| \d+/4", text, re.M)) == 4  # its own progress lines
    served.wait_ready()
    for response, alone_inputs in zip(together, inputs):
        alone = served.predict(alone_inputs)
        assert np.abs(pixels(response) - pixels(alone)).max() <= 1


def test_beyond_the_limit_the_answer_is_409(served):
    slow = {**SMALL, "width": 512, "height": 512, "num_inference_steps": 8, "prompt": "a cat"}
    served.wait_ready()
    responses = served.post_at_once([dict(slow, seed=i) for i in range(MAX + 1)])
    codes = sorted(r.status_code for r in responses)
    assert codes.count(409) >= 1 and codes.count(200) == MAX, codes
    assert all(r.json()["status"] == "succeeded" for r in responses if r.status_code == 200)


def test_a_cancelled_prediction_is_dropped_while_the_others_finish(served):
    served.wait_ready()
    ids = [uuid.uuid4().hex for _ in range(3)]
    quick = {**SMALL, "width": 256, "height": 256, "prompt": "a cat"}
    slow = {**SMALL, "width": 1024, "height": 1024, "num_inference_steps": 8, "prompt": "a cat"}  # seconds on a CPU
    answers = {}

    def put(i):
        inputs = dict(slow if i == 1 else quick, seed=i)
        answers[i] = requests.put(f"{served.url}/predictions/{ids[i]}", json={"input": inputs}, timeout=300)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30  # on a loaded machine coglet may take a moment to know the prediction
    while (cancel := requests.post(f"{served.url}/predictions/{ids[1]}/cancel", timeout=10)).status_code == 404:
        assert time.monotonic() < deadline, "the prediction never became known to the server"
        time.sleep(0.05)
    assert cancel.status_code == 200
    for thread in threads:
        thread.join()
    statuses = [answers[i].json()["status"] for i in range(3)]
    assert statuses == ["succeeded", "canceled", "succeeded"], statuses
    assert served.wait_ready() == "READY"
    assert served.predict({**SMALL, "prompt": "after", "seed": 1}).json()["status"] == "succeeded"


def test_a_soak_with_concurrent_clients_keeps_memory_files_and_the_worker(served, temp, capsys):
    result = soak(served, temp, 60, every=20, warm_up=4, clients=MAX)
    assert result.problems() == [], result
    with capsys.disabled():
        print(
            f"\nconcurrent soak: {result.predictions} predictions from {MAX} clients in {result.seconds} s; worker RSS "
            f"{result.before.worker_rss_mb} -> {result.after.worker_rss_mb} MB, temp files {result.after.temp_files}"
        )
