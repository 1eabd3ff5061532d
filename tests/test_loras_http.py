"""Style LoRAs through the real Cog HTTP server (coglet) on loopback, as the container serves them.

LoRA files are served over 127.0.0.1 by testkit/lora_server.py, Hugging Face repos by testkit/fake_hub.py
(HF_ENDPOINT), both in the formats users bring (testkit/lora_files.py). Every format, two LoRAs at once and a hub
repo give Jasper's recipe; every failure ends only its own prediction, with a message naming the input, and the next
predictions equal those the same container made before it saw any failure (a container that never saw it).
Cancels during a download, a load and a fuse use testkit/predictors/slow_lora.py.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

from testkit.cog_server import CogServer, decode_data_url, server_root, wait_ready, worker_pid
from testkit.fake_hub import FakeHub, closed_port
from testkit.lora_files import write_lora, write_pickle, write_real_shaped
from testkit.lora_server import LoraServer
from testkit.recipes import card_pipeline, run_card
from testkit.weight_files import link_model

SMALL = {"prompt": "a lighthouse at dawn", "aspect_ratio": "custom", "width": 64, "height": 64, "seed": 1234,
         "disable_safety_checker": True, "output_format": "png"}  # fmt: skip
TOKEN = "hf_" + uuid.uuid4().hex + "abcdef"
MAX_GB = "0.002"  # 2 MB per LoRA file, so that "too large" is cheap to serve


@dataclass
class World:
    server: CogServer
    files: LoraServer
    hub: FakeHub
    weights: Path
    lora: dict[str, Path]
    pid: int
    baseline: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def url(self, name: str) -> str:
        path = f"/{name}.safetensors"
        return (
            self.files.add(path, self.lora[name].read_bytes())
            if path not in self.files.routes
            else self.files.url + path
        )


def pixels(body: dict) -> list[np.ndarray]:
    return [np.asarray(decode_data_url(url).convert("RGB")).astype(np.int16) for url in body["output"]]


def predict(server: CogServer, **inputs) -> dict:
    response = server.predict(SMALL | inputs, timeout=300)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def succeeded(server: CogServer, **inputs) -> list[np.ndarray]:
    body = predict(server, **inputs)
    assert body["status"] == "succeeded", body.get("error")
    return pixels(body)


def start_world(tiny_weights, tmp_path_factory, name: str, env: dict[str, str], stub: str | None = None):
    folder = tmp_path_factory.mktemp(name)
    (folder / "tmp").mkdir()
    files_folder = folder / "files"
    lora = {
        "sdxl-kohya": write_lora(files_folder / "sdxl-kohya.safetensors", tiny_weights, "sdxl", "kohya", seed=0),
        "sdxl-diffusers": write_lora(files_folder / "sdxl-diffusers.safetensors", tiny_weights, "sdxl", "diffusers", seed=1),
        "sdxl-plain": write_lora(files_folder / "sdxl-plain.safetensors", tiny_weights, "sdxl", "diffusers-plain", seed=2),
    }  # fmt: skip
    files, hub = LoraServer().__enter__(), FakeHub().__enter__()
    hub.add_repo("someone/ink-style", "c" * 40, {"ink.safetensors": lora["sdxl-plain"].read_bytes(), "README.md": b"ink"},
                 token=TOKEN)  # fmt: skip
    weights = link_model(tiny_weights, folder / "weights", "sdxl")
    env = {
        "FLASHSD_WEIGHTS": str(weights), "FLASHSD_MODEL": "sdxl", "TMPDIR": str(folder / "tmp"),
        "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "HF_HOME": str(folder / "hf-home"),
        "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "FLASHSD_LORA_TIMEOUT_S": "2", **env,
    }  # fmt: skip
    if stub:
        env["COG_PREDICT_TYPE_STUB"] = stub
    server = CogServer(env, folder / "server.log", cwd=server_root(folder / "root")).start()
    assert server.health() == "READY", server.logs()[-3000:]
    world = World(server, files, hub, weights, lora, worker_pid(server))
    # What this container gives before it sees any failure: a container that never saw one.
    world.baseline["plain"] = succeeded(server)
    world.baseline["styled"] = succeeded(server, lora_weights=world.url("sdxl-kohya"), lora_scale=0.8)
    return world


def stop_world(world: World) -> None:
    world.server.stop()
    world.files.__exit__(None, None, None)
    world.hub.__exit__(None, None, None)


@pytest.fixture(scope="module")
def world(tiny_weights, tmp_path_factory):
    w = start_world(tiny_weights, tmp_path_factory, "lora-http", {"FLASHSD_LORA_MAX_GB": MAX_GB})
    try:
        yield w
    finally:
        stop_world(w)


def unchanged(world: World, styled: bool) -> None:
    """The next prediction (with the baseline's LoRA or without) equals the baseline's, on the same worker."""
    assert wait_ready(world.server)[0] == "READY"
    if styled:
        images = succeeded(world.server, lora_weights=world.url("sdxl-kohya"), lora_scale=0.8)
    else:
        images = succeeded(world.server)
    expected = world.baseline["styled" if styled else "plain"]
    assert all(np.array_equal(a, b) for a, b in zip(images, expected, strict=True))
    assert worker_pid(world.server) == world.pid


# -- every format, two at once, a hub repo --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs, styles",
    [({"lora_weights": "sdxl-kohya", "lora_scale": 0.8}, [("sdxl-kohya", 0.8)]),
     ({"lora_weights": "sdxl-diffusers", "lora_scale": 1.4}, [("sdxl-diffusers", 1.4)]),
     ({"extra_lora": "sdxl-plain", "extra_lora_scale": -0.5}, [("sdxl-plain", -0.5)]),
     ({"lora_weights": "sdxl-diffusers", "lora_scale": 0.7, "extra_lora": "sdxl-kohya", "extra_lora_scale": 1.2},
      [("sdxl-diffusers", 0.7), ("sdxl-kohya", 1.2)]),
     ({"lora_weights": "hub:someone/ink-style", "lora_scale": 1.0}, [("sdxl-plain", 1.0)])],
    ids=["kohya", "diffusers", "diffusers-plain-as-extra", "both", "hugging-face-repo"],
)  # fmt: skip
def test_every_format_and_two_loras_at_once_give_jaspers_recipe_over_http(world, tiny_weights, inputs, styles):
    sent = {k: (v.removeprefix("hub:") if v.startswith("hub:") else world.url(v)) if isinstance(v, str) else v
            for k, v in inputs.items()}  # fmt: skip
    (image,) = succeeded(world.server, **sent)
    recipe = card_pipeline("sdxl", tiny_weights, fuse=False, styles=[(world.lora[n], s) for n, s in styles])
    (reference,) = run_card(recipe, "sdxl", [1234], width=64, height=64)
    assert int(np.abs(image - np.asarray(reference.convert("RGB")).astype(np.int16)).max()) <= 1
    assert int(np.abs(image - world.baseline["plain"][0]).max()) > 10  # the LoRA changed the image
    for name in {n for n, _ in styles if not str(inputs.get("lora_weights", "")).startswith("hub:")}:
        assert world.files.gets(f"/{name}.safetensors") <= 1  # each file downloaded once, then cached
    assert worker_pid(world.server) == world.pid


def test_the_metadata_and_the_logs_name_the_loras(world):
    key = "civitai-like-key-" + uuid.uuid4().hex
    body = predict(world.server, lora_weights=world.url("sdxl-diffusers") + f"?token={key}", lora_scale=0.6,
                   extra_lora="someone/ink-style", extra_lora_scale=1.1)  # fmt: skip
    assert body["status"] == "succeeded", body.get("error")
    parameters = decode_data_url(body["output"][0]).info["parameters"]
    assert parameters.splitlines()[0] == f"{SMALL['prompt']} <lora:sdxl-diffusers:0.6> <lora:ink:1.1>"
    assert 'Lora hashes: "sdxl-diffusers: ' in parameters and ", ink: " in parameters
    again = predict(world.server, lora_weights=world.url("sdxl-diffusers") + f"?token={key}", lora_scale=0.7)
    assert again["status"] == "succeeded", again.get("error")
    logs = world.server.logs()
    assert key not in logs + json.dumps(body)  # a URL's query is never logged nor returned
    for line in ("LoRA sdxl-diffusers: downloaded", "LoRA ink: downloaded", "layers loaded in", "fused at scale",
                 "weights restored in", "cache hit"):  # fmt: skip
        assert line in logs, line


# -- failures: each ends its own prediction, the next ones are unchanged ---------------------------------------------


FAILURES = {  # case: (input, what the error says)
    "pickle": ("lora_weights", "is a pickled PyTorch file"),
    "legacy pickle": ("extra_lora", "is a pickled PyTorch file"),
    "pickle by name": ("lora_weights", "is a pickled PyTorch file"),
    "web page": ("lora_weights", "sent a web page, not a LoRA file"),
    "SD1.5 LoRA": ("lora_weights", "is a LoRA for SD1.5; this model is Flash SDXL, which takes SDXL LoRAs"),
    "not fitting": ("extra_lora", "does not fit Flash SDXL"),
    "too large, announced": ("lora_weights", "more than the 2.00MB a LoRA file may have here (FLASHSD_LORA_MAX_GB)"),
    "too large, streamed": ("lora_weights", "more than the 2.00MB a LoRA file may have here"),
    "401": ("lora_weights", "answered HTTP 401 (not authorized)"),
    "404": ("extra_lora", "answered HTTP 404 (not found): check the URL"),
    "timeout": ("lora_weights", "answered nothing for 2 s"),
    "interrupted": ("lora_weights", "was interrupted after"),
    "unreachable": ("lora_weights", "could not connect to 127.0.0.1"),
    "hub repo missing": ("lora_weights", "the Hugging Face repo someone/no-such-style was not found"),
    "not a source": ("extra_lora", "is neither an http(s) URL nor a Hugging Face repo"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_bad_lora_fails_only_its_prediction_and_the_next_equals_a_fresh_containers(
    world, tiny_weights, tmp_path, case
):
    field_name, message = FAILURES[case]
    source = failure_source_for(world, tiny_weights, case, tmp_path)
    inputs = {field_name: source}
    if field_name == "extra_lora":  # with a good first LoRA: it must not stay half-applied either
        inputs["lora_weights"] = world.url("sdxl-diffusers")
    body = predict(world.server, **inputs)
    assert body["status"] == "failed", body
    error = body["error"]
    # (Cog puts "Prediction failed: <type>: " before the message, which starts with the input's name.)
    assert re.search(rf": {field_name}[:=]", error) and message in error and "Traceback" not in error, error
    if case == "pickle by name":
        assert world.files.gets("/never-fetched.ckpt") == 0  # refused before any download
    leftovers = (
        [p.name for p in (world.weights / ".loras").glob(".partial-*")] if (world.weights / ".loras").exists() else []
    )
    assert leftovers == []
    unchanged(world, styled=list(FAILURES).index(case) % 2 == 0)


def failure_source_for(world: World, tiny_weights: Path, case: str, tmp: Path) -> str:
    files = world.files
    page = b"<!DOCTYPE html><html><body>Log in to download</body></html>"
    makers = {
        "pickle": lambda: files.add("/api/download/models/1", write_pickle(tmp / "a.ckpt").read_bytes()),
        "legacy pickle": lambda: files.add(
            "/api/download/models/2", write_pickle(tmp / "b.pt", legacy=True).read_bytes()
        ),
        "pickle by name": lambda: f"{files.url}/never-fetched.ckpt",
        "web page": lambda: files.add("/api/download/models/3", page, content_type="text/html"),
        "SD1.5 LoRA": lambda: files.add("/sd15-real", write_real_shaped(tmp / "r.safetensors", "sd15").read_bytes()),
        "not fitting": lambda: files.add(
            "/not-fitting", write_lora(tmp / "s.safetensors", tiny_weights, "sd15", "diffusers-plain").read_bytes()
        ),
        "too large, announced": lambda: files.add("/huge", b"\0" * 100, announce=10**11),
        "too large, streamed": lambda: files.add("/huge-stream", b"\0" * 3_000_000, chunked=True),
        "401": lambda: files.add("/private", status=401),
        "404": lambda: files.add("/gone", status=404),
        "timeout": lambda: files.add("/stall", b"\0" * 1000, stall=True),
        "interrupted": lambda: files.add("/cut", world.lora["sdxl-plain"].read_bytes(), drop_after=5000),
        "unreachable": lambda: f"http://127.0.0.1:{closed_port()}/style.safetensors",
        "hub repo missing": lambda: "someone/no-such-style",
        "not a source": lambda: "my favourite style",
    }
    return makers[case]()


def test_the_hugging_face_token_never_appears_in_logs_outputs_or_files(world):
    body = predict(world.server, lora_weights="someone/ink-style", lora_scale=0.9)
    assert body["status"] == "succeeded", body.get("error")
    assert any(r.authorization == f"Bearer {TOKEN}" for r in world.hub.requests)  # the token was used
    texts = [json.dumps(body), world.server.logs(), json.dumps(world.server.health_check())]
    texts += [p.read_bytes().decode("latin-1") for p in world.weights.joinpath(".loras").rglob("*") if p.is_file()]
    assert not [t for t in texts if TOKEN[:12] in t]


# -- cancelling during a download, a load, a fuse -------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_world(tiny_weights, tmp_path_factory):
    switch = tmp_path_factory.mktemp("slow-switch") / "mode"
    w = start_world(tiny_weights, tmp_path_factory, "lora-http-slow", {"FLASHSD_TEST_SLOW": str(switch)},
                    stub="testkit/predictors/slow_lora.py:SlowLoraPredictor")  # fmt: skip
    w.switch = switch
    try:
        yield w
    finally:
        stop_world(w)


@pytest.mark.parametrize(
    "when, marker",
    [
        ("download", "LoRA lora_weights: downloading"),
        ("load", "slow-lora: loaded"),
        ("fuse", "slow-lora: merged a layer"),
    ],
)
def test_a_cancel_during_a_download_a_load_or_a_fuse_leaves_the_container_as_it_was(slow_world, when, marker):
    world, server = slow_world, slow_world.server
    if when == "download":
        source = world.files.add(f"/slow-{uuid.uuid4().hex[:6]}", b"\0" * 3_000_000, delay_per_chunk=0.1)  # ~18 s
    else:
        source = world.url("sdxl-diffusers")  # not yet fused in this container
        world.switch.write_text(when)
    prediction_id = f"lora-cancel-{uuid.uuid4().hex[:8]}"
    log_start = len(server.logs())
    result: dict = {}

    def put() -> None:
        result["response"] = requests.put(
            f"{server.url}/predictions/{prediction_id}", json={"input": SMALL | {"lora_weights": source}}, timeout=300
        )

    thread = threading.Thread(target=put)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while marker not in server.logs()[log_start:] and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.02)
        assert thread.is_alive(), "the prediction ended before it could be cancelled"
        assert requests.post(f"{server.url}/predictions/{prediction_id}/cancel", timeout=10).status_code == 200
        thread.join(timeout=120)
    finally:
        world.switch.unlink(missing_ok=True)
        if thread.is_alive():
            requests.post(f"{server.url}/predictions/{prediction_id}/cancel", timeout=10)
            thread.join(timeout=120)
    assert result["response"].json()["status"] == "canceled", result["response"].text[:500]
    # The worker thread sees the cancel at its next check (a chunk, the end of the load): then nothing is kept.
    partials, deadline = [None], time.monotonic() + 10
    while partials and time.monotonic() < deadline:
        time.sleep(0.05)
        partials = list((world.weights / ".loras").glob(".partial-*"))
    assert partials == []  # nothing half-downloaded kept
    # (Cog keeps no log line a cancelled prediction's thread writes once it has answered: tests/test_loras.py
    # checks in process that the load is undone.) Without a LoRA first: nothing of the cancelled one may remain.
    unchanged(world, styled=False)
    unchanged(world, styled=True)
