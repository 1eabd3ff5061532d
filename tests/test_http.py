"""The HTTP contract, against the real Cog server (coglet) on loopback serving the tiny checkpoints."""

import pytest
import requests

from testkit.cog_server import decode_data_url, tiny_server

SMALL = {"aspect_ratio": "custom", "width": 64, "height": 64}


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    with tiny_server(tiny_weights, "sdxl", tmp_path_factory.mktemp("server")) as running:
        assert running.health() == "READY", running.logs()
        yield running


def test_good_request_succeeds_with_one_image_per_output(server):
    response = server.predict({"prompt": "a red bicycle", "num_outputs": 2, "seed": 3, "output_format": "png", **SMALL})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "succeeded", body
    images = [decode_data_url(url) for url in body["output"]]
    assert [i.size for i in images] == [(64, 64), (64, 64)]
    assert ["Seed: 3" in images[0].text["parameters"], "Seed: 4" in images[1].text["parameters"]] == [True, True]
    assert "seeds 3, 4" in body["logs"]


def test_defaults_apply_when_inputs_are_omitted(server):
    body = server.predict({"prompt": "a tree", "aspect_ratio": "custom", "width": 80, "height": 64}).json()
    assert body["status"] == "succeeded", body
    (url,) = body["output"]
    assert url.startswith("data:image/webp")
    assert decode_data_url(url).size == (80, 64)


@pytest.mark.parametrize(
    "inputs, field",
    [
        ({"prompt": "x", "num_outputs": "two"}, "num_outputs"),  # wrong type
        ({"prompt": "x", "num_outputs": 5}, "num_outputs"),  # out of range
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "x", "aspect_ratio": "2:1"}, "aspect_ratio"),  # bad choice
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"num_outputs": 1}, "prompt"),  # missing required
        ({"prompt": "x", "seed": None}, "seed"),  # explicit null: clients omit the field
    ],
)
def test_invalid_inputs_get_422_naming_the_field(server, inputs, field):
    response = server.predict(inputs)
    assert response.status_code == 422
    assert any(field in detail["loc"] for detail in response.json()["detail"]), response.json()


def test_an_error_inside_predict_fails_with_a_readable_message_and_the_server_stays_ready(server):
    body = server.predict({"prompt": "x", "aspect_ratio": "custom", "width": 100, "height": 64}).json()
    assert body["status"] == "failed"
    assert "width=100 is not allowed" in body["error"] and "96 or 112" in body["error"]
    assert server.wait_ready() == "READY"
    assert server.predict({"prompt": "after the failure", **SMALL}).json()["status"] == "succeeded"


def test_malformed_json_is_a_400(server):
    response = requests.post(
        f"{server.url}/predictions",
        data=b'{"input": {"prompt": ',
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400 and "JSON" in response.text
    assert server.wait_ready() == "READY"


def test_openapi_document_is_served(server):
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert "prompt" in document["components"]["schemas"]["Input"]["properties"]


@pytest.mark.parametrize("key", ["sd3", "sd15", "pixart"])
def test_each_other_model_serves_a_round_trip(tiny_weights, tmp_path, key):
    with tiny_server(tiny_weights, key, tmp_path) as s:
        body = s.predict(
            {"prompt": "a harbour at night", "seed": 11, "num_outputs": 2, "output_format": "jpg", **SMALL}
        ).json()
        assert body["status"] == "succeeded", (body, s.logs())
        assert [decode_data_url(url).format for url in body["output"]] == ["JPEG", "JPEG"]
        assert s.wait_ready() == "READY"
