"""Inpainting through the real Cog server: image and mask sent as data URLs, as Replicate's clients do."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from testkit.cog_server import decode_data_url, tiny_server


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    with tiny_server(tiny_weights, "sd15", tmp_path_factory.mktemp("server")) as running:
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
    outputs = [decode_data_url(url) for url in body["output"]]
    assert [(o.format, o.size) for o in outputs] == [("PNG", (96, 64))] * 2
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
