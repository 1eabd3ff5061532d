"""Trainings through the real Cog server in train mode (`python -m cog.server.http --x-mode train`, as Replicate runs
them): POST /trainings synchronous and asynchronous (Prefer: respond-async, results by webhook), cancel, validation;
and a training's output straight into a predict-mode server, as a model version made from the training gets it.
Tiny SD1.5 at 256 px (the smallest resolution a training takes), two steps (ten for the one served)."""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
import time
import uuid

import pytest
import requests

from testkit.cog_server import CogServer, decode_data_url
from testkit.lora_server import LoraServer
from testkit.pixels import max_difference
from testkit.recipes import card_pipeline, run_card
from testkit.training_sets import make_zip, png
from testkit.webhooks import WebhookReceiver

PROGRESS = re.compile(r"^\s*(\d+)%\s*\|.+?\|\s*(\d+)/(\d+)", re.MULTILINE)
FINAL = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("training-images")
    archive = make_zip(folder / "set.zip", {"set/a.png": png((160, 160), 1), "set/a.txt": b"a lighthouse at dawn",
                                            "set/b.png": png((192, 160), 2), "set/notes.md": b"# notes"})  # fmt: skip
    return "data:application/zip;base64," + base64.b64encode(archive.read_bytes()).decode()


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("training-server")
    (folder / "tmp").mkdir()
    env = {"FLASHSD_WEIGHTS": str(tiny_weights), "FLASHSD_MODEL": "sd15", "TMPDIR": str(folder / "tmp")}
    with CogServer(env, folder / "server.log", train=True) as s:
        s.tmp = folder / "tmp"
        yield s


def small(images: str, **inputs) -> dict:
    return {"input_images": images, "steps": 2, "resolution": 256, "lora_rank": 4, "seed": 3, **inputs}


def unpack(output: dict) -> tuple[list[str], dict, bytes]:
    header, _, payload = output["weights"].partition(",")
    assert header.startswith("data:application/x-tar"), header
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(payload))) as tar:
        names = tar.getnames()
        return names, json.load(tar.extractfile("training.json")), tar.extractfile("lora.safetensors").read()


def work_folders(server) -> list:
    return sorted(server.tmp.glob("flashsd-training-work-*"))


def test_a_training_returns_a_tar_of_the_lora_and_its_record(server, images):
    response = server.train(small(images, trigger_word="sks"))
    body = response.json()
    assert response.status_code == 200 and body["status"] == "succeeded", body.get("error") or body
    names, record, lora = unpack(body["output"])
    assert names == ["lora.safetensors", "training.json"]
    assert lora[8:9] == b"{"  # safetensors: an 8-byte header length, then the JSON header
    assert (record["trigger_word"], record["steps"], record["seed"], record["base_model"]["key"]) == (
        "sks",
        2,
        3,
        "sd15",
    )
    assert record["data"]["skipped"][0]["name"] == "set/notes.md"
    progress = PROGRESS.findall(body["logs"])
    assert [(done, total) for _, done, total in progress] == [("1", "2"), ("2", "2")]
    assert "Skipped set/notes.md: not an image" in body["logs"]
    assert work_folders(server) == []


def test_a_model_made_from_a_training_serves_its_lora_by_default_as_diffusers_serves_it(
    server, images, tiny_weights, tmp_path
):
    """The training's output URL becomes the predict-mode server's COG_WEIGHTS (as Replicate hands a model version made
    from a training its weights); a prediction naming no LoRA gives the image diffusers gives on the Flash model card's
    pipeline with the trained lora.safetensors loaded (Jasper's recipe: both adapters, unfused)."""
    body = server.train(small(images, trigger_word="sks", steps=10, learning_rate=0.01, lora_rank=16)).json()
    assert body["status"] == "succeeded", body.get("error")
    tar = base64.b64decode(body["output"]["weights"].partition(",")[2])
    lora_file = tmp_path / "lora.safetensors"
    lora_file.write_bytes(unpack(body["output"])[2])
    inputs = {"prompt": "a photo of sks", "aspect_ratio": "custom", "width": 64, "height": 64, "seed": 1234,
              "output_format": "png", "disable_safety_checker": True}  # fmt: skip
    with LoraServer() as files:
        url = files.add("/trainings/t1/trained_model.tar", tar)
        env = {"FLASHSD_WEIGHTS": str(tiny_weights), "FLASHSD_MODEL": "sd15", "COG_WEIGHTS": url}
        with CogServer(env, tmp_path / "predict.log") as predictor:
            answers = [predictor.predict(inputs | extra).json() for extra in ({}, {"lora_scale": 0})]
            logs = predictor.logs()
    assert [a["status"] for a in answers] == ["succeeded", "succeeded"], (answers, logs)
    served, base = (decode_data_url(a["output"][0]) for a in answers)
    assert "Trained LoRA trained_model (trigger word 'sks'" in logs
    pipe = card_pipeline("sd15", tiny_weights, fuse=False, styles=[(lora_file, 1.0)])
    (reference,) = run_card(pipe, "sd15", [1234], width=64, height=64, prompt="a photo of sks")
    assert max_difference(served, base) > 10  # the trained LoRA is on: the next check bites
    assert max_difference(served, reference) <= 1  # within 1/255


def test_an_async_training_reports_by_webhook(server, images):
    with WebhookReceiver() as hooks:
        training_id = f"t-{uuid.uuid4().hex[:8]}"
        response = requests.post(
            f"{server.url}/trainings", json={"id": training_id, "input": small(images), "webhook": hooks.url},
            headers={"Prefer": "respond-async"}, timeout=30,
        )  # fmt: skip
        assert response.status_code == 202, response.text
        final = hooks.wait(lambda e: e.get("id") == training_id and e.get("status") in FINAL, timeout=300)
    assert final["status"] == "succeeded", final.get("error")
    names, record, _ = unpack(final["output"])
    assert names == ["lora.safetensors", "training.json"] and record["steps"] == 2


def test_a_cancelled_training_stops_and_leaves_no_files(server, images):
    with WebhookReceiver() as hooks:
        training_id = f"t-{uuid.uuid4().hex[:8]}"
        response = requests.post(
            f"{server.url}/trainings", headers={"Prefer": "respond-async"}, timeout=30,
            json={"id": training_id, "input": small(images, steps=5000), "webhook": hooks.url},
        )  # fmt: skip
        assert response.status_code == 202, response.text
        # Cancelled while it trains: once a progress line has reached the webhook's logs.
        hooks.wait(lambda e: e.get("id") == training_id and PROGRESS.search(e.get("logs") or ""), timeout=300)
        cancelled = time.monotonic()
        assert requests.post(f"{server.url}/trainings/{training_id}/cancel", timeout=30).status_code == 200
        final = hooks.wait(lambda e: e.get("id") == training_id and e.get("status") in FINAL, timeout=60)
        took = time.monotonic() - cancelled
    assert final["status"] == "canceled"
    assert took < 30  # a tiny step takes well under a second: cancel lands within one
    steps_done = [int(done) for _, done, _ in PROGRESS.findall(final.get("logs") or "")]
    assert steps_done and max(steps_done) < 5000
    assert server.wait_ready() == "READY"
    assert work_folders(server) == [] and sorted(server.tmp.glob("flashsd-training-output-*")) == []
    # The worker carries on: the next training runs (and fails on its own data, quickly).
    empty = "data:application/zip;base64," + base64.b64encode(_empty_zip()).decode()
    body = server.train(small(empty)).json()
    assert body["status"] == "failed" and "the archive has no image file" in body["error"]


def _empty_zip() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w"):
        pass
    return buffer.getvalue()


@pytest.mark.parametrize(
    "inputs, field",
    [({"resolution": 100}, "resolution"), ({"lora_rank": 0}, "lora_rank"), ({"steps": 10001}, "steps"),
     ({"learning_rate": 0.5}, "learning_rate"), ({"batch_size": 9}, "batch_size")],
)  # fmt: skip
def test_inputs_out_of_bounds_are_refused_before_training(server, images, inputs, field):
    response = server.train(small(images, **inputs))
    assert response.status_code == 422, response.text
    assert [d["loc"][-1] for d in response.json()["detail"]] == [field]


def test_a_resolution_that_is_no_multiple_of_64_fails_saying_what_is_allowed(server, images):
    body = server.train(small(images, resolution=300)).json()
    assert body["status"] == "failed"
    assert "resolution must be a multiple of 64 from 256 to 2048 (it is 300" in body["error"]
