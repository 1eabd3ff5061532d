"""The serving contract under fire, against the real Cog server (coglet) on loopback.

A Cog worker that dies is never restarted, so every request here must end as a 4xx with a clear message, a
failed prediction whose error names the input, or a success, with /health-check READY afterwards and the same
worker process throughout. Covered: a schema-driven fuzz of 500+ requests (testkit/fuzz.py), cancellation
between denoising steps, requests beyond capacity (409), a soak with memory / open-file / temp-file bounds
(testkit/soak.py), an out-of-memory error inside the worker (testkit/predictors/oom.py), setup failures from
bad weights, and a full download-and-predict run checked for the Hugging Face token.

The servers run tiny random-weight models (testkit/tiny_repos.py) from a private working directory whose OpenAPI
schema is generated from predict.py when the module starts.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import json
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from PIL import Image

from flashsd.models import MODELS
from flashsd.weights import repo_dir
from testkit.cog_server import CogServer, cpu_seconds, files_under, server_root, wait_ready, worker_pid
from testkit.fake_hub import FakeHub, closed_port
from testkit.fuzz import Generator, run_cases
from testkit.soak import beyond_capacity, soak
from testkit.weight_files import adapter_file, copy_model, denoiser_file, truncate

FUZZ_REQUESTS = 500
SOAK_PREDICTIONS = 100
SMALL = {"aspect_ratio": "custom", "width": 64, "height": 64, "disable_safety_checker": True}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return server_root(tmp_path_factory.mktemp("server-root"))


class Served:
    def __init__(self, server: CogServer, temp: Path):
        self.server = server
        self.temp = temp
        self.pid = worker_pid(server)


def start(env: dict[str, str], folder: Path, root: Path, stub: str | None = None) -> CogServer:
    env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", **env}
    if stub:
        env["COG_PREDICT_TYPE_STUB"] = stub
    return CogServer(env, folder / f"server-{uuid.uuid4().hex[:6]}.log", cwd=root).start()


@pytest.fixture(scope="module")
def served(tiny_weights, root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    temp = folder / "tmp"
    temp.mkdir()
    env = {"FLASHSD_WEIGHTS": str(tiny_weights), "FLASHSD_MODEL": "sdxl", "FLASHSD_CONTROLNETS": "canny,depth"}
    server = start(env | {"TMPDIR": str(temp)}, folder, root)
    try:
        assert server.health() == "READY", server.logs()[-3000:]
        yield Served(server, temp)
    finally:
        server.stop()


def prediction(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text[:500]
    return response.json()


# -- 1. fuzzing ----------------------------------------------------------------------------------------------------


def test_500_generated_requests_each_get_their_expected_outcome_and_the_worker_survives_every_one(served, capsys):
    server = served.server
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    generator = Generator(schema, seed=1234, model="sdxl", controlnets=("canny", "depth"))
    fixed = generator.cases(mixtures=0)
    cases = fixed + generator.mixtures(max(100, FUZZ_REQUESTS - len(fixed)), fixed)
    assert len(cases) >= FUZZ_REQUESTS
    assert [c.name for c in cases if not c.expected()] == []  # every case says what it must get

    report = run_cases(server, cases)

    assert report.problems == [], "\n".join(report.problems[:30])
    # Each request got the very outcome its case carries (not merely some clean outcome).
    assert report.mismatches == [], f"{len(report.mismatches)} mismatches:\n" + "\n".join(report.mismatches[:30])
    assert report.worker_deaths == 0 and report.worker_pid_after == served.pid
    kinds = report.by_kind()
    assert {"422", "400", "failed", "succeeded", "canceled"} <= set(kinds), kinds
    logs = server.logs()
    for marker in ("worker crashed", "Failing prediction due to worker", "Slot poisoned", "All slots poisoned"):
        assert marker not in logs
    # Over-long prompts: SDXL's CLIP encoders read them whole, in chunks, as the logs say for each such request that
    # ran; nothing is cut (PixArt's T5 still cuts, and says so: tests/test_faults.py).
    long_runs = [c for c in cases if c.expect_log]
    assert long_runs and {c.expect_log for c in long_runs} == {"chunk(s) of up to 75"}
    assert logs.count("chunk(s) of up to 75") >= len(long_runs) and "tokens long but" not in logs
    # Hostile prompt syntax was among the requests, and each got its outcome (the mismatches above).
    assert len([o for o in report.outcomes if "syntax: " in o.case]) >= 16
    # So were structure controls: every control input fuzzed, and controls that ran as well as refused ones.
    controls = collections.Counter(o.kind for o in report.outcomes if "controlnet" in o.case or "control:" in o.case)
    assert sum(controls.values()) >= 150 and controls["succeeded"] >= 10 and controls["failed"] >= 10, controls
    # The largest request was accepted, started and cancelled cleanly.
    largest = next(o for o in report.outcomes if o.case == "4 images at the largest size")
    assert largest.kind == "canceled" and largest.health == "READY"
    # Input copies coglet leaves for requests it rejects after downloading part of them are removed by the next
    # prediction: then only the last delivered outputs remain.
    assert prediction(server.predict({**SMALL, "prompt": "a cat"}))["status"] == "succeeded"
    files = [p.relative_to(served.temp) for p in files_under(served.temp)]
    assert [
        f for f in files if not (f.parts[0].startswith("flashsd-worker-") and f.parts[1].startswith("flashsd-"))
    ] == []
    assert len(files) == 1
    with capsys.disabled():
        print(f"\nfuzz: {json.dumps(report.summary())}")


# -- 3. cancellation -----------------------------------------------------------------------------------------------


def test_cancel_between_denoising_steps_ends_promptly_leaves_no_files_and_the_next_prediction_succeeds(served, capsys):
    server = served.server
    wait_ready(server)
    files_before = files_under(served.temp)
    slow = {
        **SMALL,
        "prompt": "a lighthouse at dawn",
        "width": 1024,
        "height": 1024,
        "num_outputs": 2,
        "num_inference_steps": 8,
    }
    prediction_id = f"cancel-{uuid.uuid4().hex[:8]}"
    log_start = len(server.logs())
    result: dict = {}

    def put() -> None:
        result["response"] = requests.put(
            f"{server.url}/predictions/{prediction_id}", json={"input": slow}, timeout=600
        )

    thread = threading.Thread(target=put)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while "Generating" not in server.logs()[log_start:] and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(2.0)  # into the denoising loop
        assert thread.is_alive(), "the prediction ended before it could be cancelled: make it slower"
        cancelled_at = time.monotonic()
        assert requests.post(f"{server.url}/predictions/{prediction_id}/cancel", timeout=10).status_code == 200
        thread.join(timeout=120)
        status, _ = wait_ready(server, timeout=60)
        ready_after = time.monotonic() - cancelled_at
    finally:  # whatever failed above, the shared server is left idle for the tests after this one
        if thread.is_alive():
            with contextlib.suppress(requests.RequestException):
                requests.post(f"{server.url}/predictions/{prediction_id}/cancel", timeout=10)
            thread.join(timeout=120)
            wait_ready(server, timeout=60)

    body = result["response"].json()
    assert body["status"] == "canceled", body
    assert status == "READY" and ready_after < 10, f"slot free {ready_after:.1f} s after the cancel"
    pid = worker_pid(server)
    assert pid == served.pid
    spent = cpu_seconds(pid)
    time.sleep(1.0)
    assert cpu_seconds(pid) - spent < 0.5, "the worker is still computing the cancelled prediction"
    assert files_under(served.temp) == files_before  # nothing written for the cancelled prediction
    after = prediction(server.predict({**SMALL, "prompt": "a cat", "seed": 1}))
    assert after["status"] == "succeeded"
    with capsys.disabled():
        print(f"\ncancel: slot free {ready_after:.2f} s after the cancel request")


# -- 6. load -------------------------------------------------------------------------------------------------------


def test_requests_beyond_capacity_get_409_and_the_running_prediction_is_unaffected(served):
    busy = beyond_capacity(served.server, extra=8)
    assert busy.extra_statuses == {409: 8}, busy
    assert busy.overlapped, "the slow prediction ended before the extra requests were answered"
    assert busy.running_status == "succeeded" and busy.running_equal_to_alone
    assert worker_pid(served.server) == served.pid


def test_soak_keeps_memory_open_files_and_temporary_files_bounded(served, capsys):
    result = soak(served.server, served.temp, SOAK_PREDICTIONS, warm_up=10)
    assert result.problems() == [], result
    assert worker_pid(served.server) == served.pid
    with capsys.disabled():
        print(
            f"\nsoak: {result.predictions} predictions in {result.seconds} s ({result.per_prediction_ms} ms each); "
            f"worker RSS {result.before.worker_rss_mb} -> {result.after.worker_rss_mb} MB, "
            f"open files {result.before.worker_fds} -> {result.after.worker_fds}, temp files {result.after.temp_files}"
        )


# -- 2. out of memory inside the worker ----------------------------------------------------------------------------


def test_out_of_memory_in_the_worker_fails_that_prediction_only(tiny_weights, root, tmp_path):
    from testkit.predictors.oom import MARKER

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"FLASHSD_WEIGHTS": str(tiny_weights), "FLASHSD_MODEL": "sdxl", "TMPDIR": str(temp)}
    server = start(env, tmp_path, root, stub="testkit/predictors/oom.py:OomPredictor")
    try:
        assert server.health() == "READY", server.logs()[-3000:]
        pid = worker_pid(server)
        inputs = {**SMALL, "prompt": "a lighthouse at dawn", "seed": 9, "num_outputs": 2}
        baseline = prediction(server.predict(inputs))

        failed = prediction(server.predict({**inputs, "prompt": f"{MARKER} a lighthouse at dawn"}))

        assert failed["status"] == "failed"
        error = failed["error"]
        assert "Out of memory generating 2 image(s) at 64x64" in error, error
        assert "lower num_outputs" in error and "the size (it is 64x64" in error and "Traceback" not in error
        assert wait_ready(server)[0] == "READY" and worker_pid(server) == pid
        again = prediction(server.predict(inputs))
        assert again["status"] == "succeeded" and again["output"] == baseline["output"]
        assert "memory freed, the worker carries on" in server.logs()
    finally:
        server.stop()


# -- 4. bad weights: SETUP_FAILED with the file and the fix --------------------------------------------------------


def _pickle_only(root: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    weights = denoiser_file(root, "sd15")
    torch.save(load_file(weights), weights.parent / "diffusion_pytorch_model.bin")
    weights.unlink()
    return weights


def _truncated(root: Path) -> Path:
    weights = denoiser_file(root, "sd15")
    truncate(weights)
    return weights


def _foreign_adapter(root: Path) -> Path:
    target = adapter_file(root, "sd15")
    shutil.copyfile(adapter_file(root, "sdxl"), target)
    return target


@pytest.mark.parametrize(
    "damage", [_truncated, _pickle_only, _foreign_adapter], ids=["truncated", "pickle-only", "foreign-adapter"]
)
def test_bad_weights_fail_setup_visibly_and_predictions_get_503(tiny_weights, root, tmp_path, damage):
    weights = copy_model(tiny_weights, tmp_path / "weights", "sd15")
    copy_model(tiny_weights, weights, "sdxl")  # the foreign adapter's source
    broken = damage(weights)
    server = start({"FLASHSD_WEIGHTS": str(weights), "FLASHSD_MODEL": "sd15", "TMPDIR": str(tmp_path)}, tmp_path, root)
    try:
        health = server.health_check()
        assert health["status"] == "SETUP_FAILED", health
        setup_logs = health["setup"]["logs"]
        assert re.search(r"\b(WeightsError|AdapterError)\b", setup_logs)  # AdapterError is a WeightsError
        assert str(broken.relative_to(weights)) in setup_logs or str(broken) in setup_logs
        assert "scripts/download-weights --model sd15" in setup_logs
        response = server.predict({**SMALL, "prompt": "a cat"}, timeout=30)
        assert response.status_code == 503, response.text
    finally:
        server.stop()


# -- 7. secrets ----------------------------------------------------------------------------------------------------


def _serve_tiny(hub: FakeHub, tiny_weights: Path, key: str, token: str) -> None:
    for repo in MODELS[key].repos:
        files = {f: (repo_dir(tiny_weights, repo) / f).read_bytes() for f in repo.files}
        hub.add_repo(repo.id, repo.revision, files, token=token if repo is MODELS[key].base else None)


def _image_texts(data_url: str) -> list[str]:
    raw = base64.b64decode(data_url.split(",", 1)[1])
    image = Image.open(io.BytesIO(raw))
    texts = [raw.decode("latin-1"), json.dumps({k: str(v) for k, v in image.info.items()})]
    exif = image.getexif()
    texts += [str(v) for v in exif.values()] + [repr(v) for v in exif.get_ifd(0x8769).values()]
    return texts


def test_hf_token_never_appears_in_logs_outputs_metadata_schema_or_files(tiny_weights, root, tmp_path):
    token = f"hf_{uuid.uuid4().hex}{uuid.uuid4().hex[:6]}"
    weights, home, temp = tmp_path / "weights", tmp_path / "hf-home", tmp_path / "tmp"
    temp.mkdir()
    with FakeHub() as hub:
        _serve_tiny(hub, tiny_weights, "sd15", token)  # the base repo gated: it needs the token
        env = {
            "FLASHSD_WEIGHTS": str(weights),
            "FLASHSD_MODEL": "sd15",
            "TMPDIR": str(temp),
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": token,
            "HF_HOME": str(home),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        server = start(env, tmp_path, root)
        try:
            health = server.health_check()
            assert health["status"] == "READY", health["setup"]["logs"][-3000:]
            assert any(r.authorization == f"Bearer {token}" for r in hub.requests)  # the token was used
            texts = [json.dumps(health), requests.get(f"{server.url}/openapi.json", timeout=10).text]
            for inputs in (
                {"output_format": "png"},
                {"output_format": "jpg"},
                {"output_format": "webp", "num_outputs": 2},
                {"prompt": "${HF_TOKEN} $HF_TOKEN %(HF_TOKEN)s {HF_TOKEN}"},
                {"prompt": " "},
            ):
                body = prediction(server.predict({**SMALL, "prompt": "a lighthouse at dawn", **inputs}))
                texts.append(json.dumps(body))
                for output in body.get("output") or []:
                    texts += _image_texts(output)
            texts.append(server.logs())
        finally:
            server.stop()
    for path in [*weights.rglob("*"), *home.rglob("*"), *temp.rglob("*")]:
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    leaks = [t[max(0, t.find(token[:10]) - 80) : t.find(token[:10]) + 80] for t in texts if token[:10] in t]
    assert leaks == [], leaks
    # Nothing in the build configuration puts a token into the image.
    cog_yaml = (Path(__file__).resolve().parent.parent / "cog.yaml").read_text()
    assert not re.search(r"^\s*-\s*(HF_TOKEN|HUGGING_FACE_HUB_TOKEN)\s*=", cog_yaml, re.M)
