"""Structure control through the real Cog server (coglet) on loopback: a tiny Flash SDXL built with both ControlNets
(FLASHSD_CONTROLNETS=canny,depth), control images sent as data URLs as Replicate's clients send them."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from testkit.cog_server import decode_data_url, tiny_server
from testkit.control_recipes import a1111_controlnet_units, photo

SMALL = {"aspect_ratio": "custom", "width": 64, "height": 64, "disable_safety_checker": True, "output_format": "png"}


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    with tiny_server(tiny_weights, "sdxl", folder, FLASHSD_CONTROLNETS="canny,depth") as running:
        assert running.health() == "READY", running.logs()
        yield running


@pytest.fixture(scope="module")
def without_control(server):
    body = server.predict({"prompt": "a glass house", "seed": 3, **SMALL}).json()
    assert body["status"] == "succeeded", body
    return decode_data_url(body["output"][0])


@pytest.mark.parametrize("kind, slot", [("canny", 1), ("depth", 2)])
def test_a_control_of_each_type_steers_the_image_and_is_named_in_its_metadata_and_logs(
    server, without_control, kind, slot
):
    name = f"controlnet_{slot}"
    body = server.predict({
        "prompt": "a glass house", "seed": 3, name: kind, f"{name}_image": data_url(photo(96, 64, seed=slot)),
        f"{name}_conditioning_scale": 1.5, f"{name}_start": 0.25, **SMALL,
    }).json()  # fmt: skip
    assert body["status"] == "succeeded", body
    (output,) = [decode_data_url(url) for url in body["output"]]
    assert output.size == (64, 64)
    assert np.abs(pixels(output) - pixels(without_control)).max() > 10  # the same seed, steered
    (unit,) = a1111_controlnet_units(output.text["parameters"]).values()
    assert (unit["Module"], unit["Weight"], unit["Guidance Start"], unit["Guidance End"]) == (
        "canny" if kind == "canny" else "depth_anything_v2", "1.5", "0.25", "1",
    )  # fmt: skip
    assert f"ControlNet {kind} ({name}, scale 1.5, from 0.25 to 1)" in body["logs"]
    assert f"Control maps ({kind}) made in" in body["logs"]


def test_two_controls_act_together(server):
    canny, depth = data_url(photo(64, 64, seed=1)), data_url(photo(64, 64, seed=2))
    inputs = {"prompt": "a glass house", "seed": 3, "controlnet_1": "canny", "controlnet_1_image": canny, **SMALL}
    one = server.predict(inputs).json()
    both = server.predict(inputs | {"controlnet_3": "depth", "controlnet_3_image": depth}).json()
    assert one["status"] == both["status"] == "succeeded", (one, both)
    first, second = decode_data_url(one["output"][0]), decode_data_url(both["output"][0])
    assert np.abs(pixels(first) - pixels(second)).max() > 10
    assert list(a1111_controlnet_units(second.text["parameters"])) == ["ControlNet 0", "ControlNet 2"]


@pytest.mark.parametrize(
    "inputs, field",
    [
        ({"controlnet_1": "pose"}, "controlnet_1"),  # a type flashsd does not know
        ({"controlnet_2": "Canny"}, "controlnet_2"),  # choices are exact
        ({"controlnet_1_conditioning_scale": 4.5}, "controlnet_1_conditioning_scale"),
        ({"controlnet_3_conditioning_scale": -0.1}, "controlnet_3_conditioning_scale"),
        ({"controlnet_2_start": -0.1}, "controlnet_2_start"),
        ({"controlnet_1_end": 1.01}, "controlnet_1_end"),
        ({"controlnet_3_image": 5}, "controlnet_3_image"),
    ],
)
def test_control_inputs_outside_the_schema_get_422_naming_the_field(server, inputs, field):
    response = server.predict({"prompt": "x", **SMALL, **inputs})
    assert response.status_code == 422
    assert any(field in detail["loc"] for detail in response.json()["detail"]), response.json()


@pytest.mark.parametrize(
    "inputs, said",
    [
        ({"controlnet_1": "canny"}, "controlnet_1='canny' needs controlnet_1_image"),
        ({"controlnet_2_image": "PHOTO"}, "controlnet_2_image was given but controlnet_2 is 'none'"),
        ({"controlnet_1": "depth", "controlnet_1_image": "data:text/plain;base64," + base64.b64encode(b"hi").decode()},
         "controlnet_1_image is not an image"),
        ({"controlnet_3": "canny", "controlnet_3_image": "PHOTO", "controlnet_3_start": 0.6, "controlnet_3_end": 0.4},
         "controlnet_3_start=0.6 must be below controlnet_3_end=0.4"),
    ],
)  # fmt: skip
def test_a_control_that_cannot_run_fails_with_a_message_and_the_server_carries_on(server, inputs, said):
    inputs = {k: data_url(photo(64, 64)) if v == "PHOTO" else v for k, v in inputs.items()}
    body = server.predict({"prompt": "a glass house", **SMALL, **inputs}).json()
    assert body["status"] == "failed" and said in body["error"], body
    assert "Traceback" not in body["error"]
    assert server.wait_ready() == "READY"
    assert server.predict({"prompt": "after the failure", **SMALL}).json()["status"] == "succeeded"
