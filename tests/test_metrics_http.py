"""Per-prediction metrics on the real Cog server (coglet 0.23): the response's `metrics` holds the images returned and
where the prediction's time went, right for a prediction alone and for predictions sharing one call.

Stage times are checked against known waits: testkit/predictors/operations.py makes the text encoders and the
denoiser wait (`#slow`) and logs how long, so each stage must hold its own wait and not the other's (the waits
are seconds, far above what the tiny model itself takes). Safety drops come from the same predictor
(`#flag-first`), LoRA downloads from testkit/lora_server.py, which counts every GET.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from testkit.cog_server import CogServer, server_root
from testkit.lora_files import write_lora
from testkit.lora_server import LoraServer
from testkit.weight_files import link_model

SMALL = {"aspect_ratio": "custom", "width": 64, "height": 64, "output_format": "png"}
STUB = "testkit/predictors/operations.py:OperationsPredictor"
WAITED = re.compile(r"operations: waited ([\d.]+) s in the text encoders, ([\d.]+) s in the denoiser")


class Served:
    def __init__(self, server: CogServer, files: LoraServer, lora: bytes):
        self.server, self.files, self.lora = server, files, lora


@pytest.fixture(scope="module")
def served(tiny_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("metrics")
    (folder / "tmp").mkdir()
    weights = link_model(tiny_weights, folder / "weights", "sd15")  # a LoRA cache of its own
    lora = write_lora(folder / "files" / "style.safetensors", tiny_weights, "sd15", "kohya", seed=3).read_bytes()
    env = {
        "FLASHSD_WEIGHTS": str(weights), "FLASHSD_MODEL": "sd15", "COG_MAX_CONCURRENCY": "4",
        "TMPDIR": str(folder / "tmp"), "COG_PREDICT_TYPE_STUB": STUB,
    }  # fmt: skip
    with LoraServer() as files, CogServer(env, folder / "server.log", cwd=server_root(folder / "root")) as server:
        assert server.health() == "READY", server.logs()[-3000:]
        succeeded(server.predict({**SMALL, "prompt": "warm-up"}))  # the first call pays one-off costs
        yield Served(server, files, lora)


def succeeded(response) -> dict:
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    return body


def flat(metrics: dict, prefix: str = "") -> dict:
    """Cog nests dotted keys: back to dotted keys."""
    found = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            found |= flat(value, f"{prefix}{key}.")
        else:
            found[prefix + key] = value
    return found


def readme_metrics() -> set[str]:
    from testkit.cog_server import PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text()
    table = re.search(r"<!-- metrics:begin -->\n(.*?)<!-- metrics:end -->", readme, re.S).group(1)
    return set(re.findall(r"^\| `([\w.]+)`", table, re.M))


def waited(body: dict) -> tuple[float, float]:
    """(text encoders, denoiser): the waits the predictor logged for this prediction's call."""
    (found,) = WAITED.findall(body["logs"])
    return float(found[0]), float(found[1])


def assert_stages_hold_their_waits(metrics: dict, body: dict, only_their_own: bool = True) -> None:
    """Each stage holds its own wait and, with `only_their_own`, not the other's: both are seconds, and the tiny
    model's own work on one 64x64 image far less even on a loaded machine (several images may take seconds)."""
    encoders, denoiser = waited(body)
    assert encoders > 0 and denoiser > 0
    assert encoders <= metrics["timing.encode_prompt_s"], (metrics, encoders, denoiser)
    assert denoiser <= metrics["timing.denoise_s"], (metrics, encoders, denoiser)
    if only_their_own:
        assert metrics["timing.encode_prompt_s"] < encoders + denoiser, (metrics, encoders, denoiser)
        assert metrics["timing.denoise_s"] < denoiser + encoders, (metrics, encoders, denoiser)
    stages = metrics["timing.lora_s"] + metrics["timing.encode_prompt_s"] + metrics["timing.denoise_s"]
    assert stages <= metrics["timing.run_s"], metrics
    # Cog's own clock (predict_time) holds every part the prediction measured.
    parts = metrics["timing.queued_s"] + metrics["timing.run_s"] + metrics["timing.encode_images_s"]
    assert parts <= metrics["predict_time"], metrics


def test_a_prediction_alone_reports_its_images_and_where_its_time_went(served):
    body = succeeded(served.server.predict({**SMALL, "prompt": "a lighthouse #slow"}))
    metrics = flat(body["metrics"])
    # Every metric the README lists, and only those (lora.cache_hit comes with a style LoRA only).
    assert set(metrics) - {"predict_time"} == readme_metrics() - {"lora.cache_hit"}
    assert metrics["image_output_count"] == len(body["output"]) == 1
    assert metrics["batch.shared_with"] == 0 and metrics["batch.images"] == 1, metrics
    assert metrics["timing.queued_s"] < 1.0, metrics  # the model's thread was idle
    assert metrics["timing.encode_images_s"] > 0, metrics
    assert_stages_hold_their_waits(metrics, body)
    assert "in one call with" not in body["logs"]


def test_images_the_safety_checker_leaves_out_are_not_counted(served):
    body = succeeded(served.server.predict({**SMALL, "prompt": "a beach #flag-first", "num_outputs": 3}))
    metrics = flat(body["metrics"])
    assert "Safety checker: 1 of 3 image(s) flagged as potentially NSFW and left out" in body["logs"]
    assert metrics["image_output_count"] == len(body["output"]) == 2
    assert metrics["batch.images"] == 3  # generated


def test_predictions_sharing_a_call_each_report_their_own_images_and_the_call_they_shared(served):
    server = served.server
    first: list = []
    running = threading.Thread(target=lambda: first.append(server.post({**SMALL, "prompt": "first #slow"})))
    running.start()
    time.sleep(1.0)  # the first holds the model's thread for seconds: the next three queue behind it
    sent = time.monotonic()
    prompts = ["a harbour #slow", "a forest #slow #flag-first", "a desert #slow"]
    together = server.post_at_once([{**SMALL, "prompt": p, "num_outputs": 2} for p in prompts])
    round_trip = time.monotonic() - sent
    running.join()
    alone = flat(succeeded(first[0])["metrics"])
    assert alone["batch.shared_with"] == 0 and alone["timing.queued_s"] < 1.0, alone

    bodies = [succeeded(response) for response in together]
    shared = [flat(body["metrics"]) for body in bodies]
    for body, metrics, outputs in zip(bodies, shared, (2, 1, 2)):
        assert "in one call with 2 other prediction(s)" in body["logs"]
        assert metrics["batch.shared_with"] == 2 and metrics["batch.images"] == 6, metrics
        assert metrics["image_output_count"] == len(body["output"]) == outputs, metrics
        # They waited for the first prediction's call to end, which took most of their own wait.
        assert 1.0 < metrics["timing.queued_s"] <= alone["timing.run_s"], (metrics, alone)
        assert metrics["timing.queued_s"] + metrics["timing.run_s"] <= round_trip, (metrics, round_trip)
        assert_stages_hold_their_waits(metrics, body, only_their_own=False)  # six images: seconds of real work
    # One call: its stages are theirs alike.
    for key in ("timing.run_s", "timing.encode_prompt_s", "timing.denoise_s", "timing.lora_s"):
        assert len({metrics[key] for metrics in shared}) == 1, key


def test_a_style_lora_says_whether_it_came_from_a_cache(served):
    url = served.files.add("/style.safetensors", served.lora)
    styled = {**SMALL, "prompt": "a lighthouse", "lora_weights": url}
    downloaded = flat(succeeded(served.server.predict(styled))["metrics"])
    assert set(downloaded) - {"predict_time"} == readme_metrics()
    assert served.files.gets("/style.safetensors") == 1
    assert downloaded["lora.cache_hit"] is False and downloaded["timing.lora_s"] > 0

    fused_already = flat(succeeded(served.server.predict(styled))["metrics"])
    plain = flat(succeeded(served.server.predict({**SMALL, "prompt": "a lighthouse"}))["metrics"])
    from_memory = flat(succeeded(served.server.predict(styled))["metrics"])
    assert served.files.gets("/style.safetensors") == 1  # never fetched again
    assert fused_already["lora.cache_hit"] is True and from_memory["lora.cache_hit"] is True
    assert "lora.cache_hit" not in plain and plain["timing.lora_s"] > 0  # the LoRA was taken out
