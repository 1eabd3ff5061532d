"""Inpainting through the real Cog server: image and mask sent as data URLs, as Replicate's clients do."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.cog_server import CogServer


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decode(url: str) -> Image.Image:
    header, _, payload = url.partition(",")
    assert header.startswith("data:image/png")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with CogServer({"FLASHSD_WEIGHTS": str(tiny_weights), "FLASHSD_MODEL": "sd15"}, log) as running:
        assert running.health() == "READY", running.logs()
        yield running


def test_inpainting_round_trip_with_data_urls(server):
    source = Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 96, 3), dtype=np.uint8))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (32, 16, 64, 48))
    body = server.predict({
        "prompt": "a red door", "image": data_url(source), "mask": data_url(mask), "prompt_strength": 0.5,
        "aspect_ratio": "custom", "width": 96, "height": 64, "num_outputs": 2, "seed": 5, "output_format": "png",
    }).json()  # fmt: skip
    assert body["status"] == "succeeded", body
    outputs = [decode(url) for url in body["output"]]
    assert [o.size for o in outputs] == [(96, 64), (96, 64)]
    keep = np.asarray(mask) == 0
    for output, seed in zip(outputs, (5, 6)):
        pixels = np.asarray(output.convert("RGB"))
        assert np.array_equal(pixels[keep], np.asarray(source)[keep])  # outside the mask: the input itself
        assert not np.array_equal(pixels[~keep], np.asarray(source)[~keep])
        assert f"Seed: {seed}," in output.text["parameters"] and "Denoising strength: 0.5" in output.text["parameters"]
    assert "(inpainting) at 96x64, 2 of 4 steps (prompt_strength 0.5)" in body["logs"]

    # The same server answers a bad image with a readable failure and stays ready.
    failed = server.predict({"prompt": "x", "image": "data:text/plain;base64," + base64.b64encode(b"hello").decode()})
    assert failed.json()["status"] == "failed" and "image is not an image" in failed.json()["error"]
    assert server.wait_ready() == "READY"

