"""Structure control composed with the rest of the engine: style LoRAs, weighted prompts, seeds and num_outputs (each
image equal to diffusers' ControlNet pipeline's for its seed), which predictions may share a call, a cancel while
the maps are made, a failure inside a ControlNet, and the metadata. Tiny random-weight checkpoints, CPU, fp32."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flashsd import errors
from flashsd.engine import GeneratedImage
from flashsd.images import write_outputs
from flashsd.models import MODELS
from testkit.control_recipes import (
    SEEDS,
    a1111_controlnet_units,
    card_canny,
    control_card_pipeline,
    control_request,
    photo,
)
from testkit.lora_files import write_lora
from testkit.lora_server import LoraServer
from testkit.pixels import max_difference as difference
from testkit.recipes import PROMPT, a1111_emphasis, run_card

KEY = "sd15"  # the cheapest family with ControlNets; SDXL's own recipes are in tests/test_control.py


class Lines:
    def __init__(self):
        self.lines = []

    def __call__(self, level, message, *args):
        self.lines.append(message % args)


def images(engine, request, **kwargs):
    return [g.image for g in engine.generate(request, **kwargs)]


# -- composition ---------------------------------------------------------------------------------------------------


def test_a_style_lora_with_a_control_gives_the_two_adapter_recipe_with_the_controlnet(
    control_engines, tiny_weights, tmp_path
):
    engine, picture = control_engines(KEY), photo(seed=8)
    style = write_lora(tmp_path / "style.safetensors", tiny_weights, KEY, "diffusers", seed=11)
    reference = control_card_pipeline(KEY, tiny_weights, ["canny"], styles=[(style, 0.8)])
    expected = run_card(reference, KEY, SEEDS, image=card_canny(picture), controlnet_conditioning_scale=0.75)
    with LoraServer() as server:
        url = server.add("/style.safetensors", style.read_bytes())
        try:
            styled = images(engine, control_request(KEY, [("canny", picture)], lora_weights=url, lora_scale=0.8))
        finally:
            engine.loras.apply(())  # other tests share the engine
    plain = images(engine, control_request(KEY, [("canny", picture)]))
    assert difference(styled[0], plain[0]) > 10  # the LoRA matters: the comparison below is not vacuous
    for mine, theirs in zip(styled, expected, strict=True):
        assert difference(mine, theirs) <= 1


def test_a_weighted_prompt_with_a_control_gives_diffusers_controlnet_pipeline_fed_a1111s_embeddings(
    control_engines, tiny_weights
):
    engine, picture = control_engines(KEY), photo(seed=9)
    reference = control_card_pipeline(KEY, tiny_weights, ["canny"])
    # A1111's emphasis written independently of flashsd (tests/test_prompts.py): the plain prompt's CLIP states,
    # the "lighthouse" tokens x 4, rescaled to the unweighted mean.
    plain = reference.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[0]
    tokenizer = reference.tokenizer
    first = 1 + len(tokenizer("a ", add_special_tokens=False).input_ids)
    weights = torch.ones(plain.shape[1])
    weights[first : first + len(tokenizer("lighthouse", add_special_tokens=False).input_ids)] = 4.0
    embeds = a1111_emphasis(plain[0], weights)[None].float()
    expected = run_card(reference, KEY, SEEDS, prompt=None, prompt_embeds=embeds, image=card_canny(picture),
                        controlnet_conditioning_scale=0.75)  # fmt: skip
    weighted = images(engine, control_request(KEY, [("canny", picture)], prompt="a (lighthouse:4) at dawn"))
    unweighted = images(engine, control_request(KEY, [("canny", picture)]))
    assert difference(weighted[0], unweighted[0]) > 1  # the weight acts
    for mine, theirs in zip(weighted, expected, strict=True):
        assert difference(mine, theirs) <= 1


def test_each_image_of_a_control_prediction_is_the_one_its_seed_gives_alone(control_engines):
    engine, picture = control_engines(KEY), photo(seed=10)
    together = engine.generate(control_request(KEY, [("depth", picture), ("canny", picture, 0.5)], seed=40,
                                               num_outputs=3))  # fmt: skip
    assert [g.seed for g in together] == [40, 41, 42]
    for generated in together:
        (alone,) = images(engine, control_request(KEY, [("depth", picture), ("canny", picture, 0.5)],
                                                  seed=generated.seed, num_outputs=1))  # fmt: skip
        assert difference(generated.image, alone) <= 1
    assert difference(together[0].image, together[1].image) > 10  # different seeds, different images


# -- which predictions share a call --------------------------------------------------------------------------------


def test_predictions_with_different_controls_never_share_a_call(control_engines):
    engine = control_engines(KEY)
    base = control_request(KEY, [("canny", photo(seed=1))], num_outputs=1)
    # Another prompt and seed, and a photo equal pixel for pixel (another upload of the same file): shareable.
    same = control_request(KEY, [("canny", photo(seed=1))], num_outputs=1, prompt="a red car", seed=99)
    assert engine.batch_key(same) == engine.batch_key(base)
    one_pixel = photo(seed=1)
    one_pixel.putpixel((0, 0), (0, 0, 0))
    others = [
        control_request(KEY, [("canny", photo(seed=2))], num_outputs=1),  # another photo
        control_request(KEY, [("canny", one_pixel)], num_outputs=1),  # one pixel apart
        control_request(KEY, [("canny", photo(seed=1), 0.9)], num_outputs=1),  # another scale
        control_request(KEY, [("canny", photo(seed=1), 0.75, 0.0, 0.5)], num_outputs=1),  # another end
        control_request(KEY, [("depth", photo(seed=1))], num_outputs=1),  # another type
        control_request(KEY, [("canny", photo(seed=1)), ("depth", photo(seed=1))], num_outputs=1),  # one more
        control_request(KEY, [], num_outputs=1),  # none
    ]
    keys = [engine.batch_key(r) for r in others]
    assert engine.batch_key(base) not in keys and len(set(keys)) == len(keys)


def test_predictions_with_identical_controls_share_a_call_and_each_gets_the_image_it_gets_alone(control_engines):
    engine = control_engines(KEY)
    slots = [("canny", photo(seed=1)), ("depth", photo(seed=2), 1.2, 0.0, 0.75)]
    requests = [control_request(KEY, slots, prompt=p, seed=s) for p, s in (("a red car", 5), ("a blue boat", 70))]
    assert engine.batch_key(requests[0]) == engine.batch_key(requests[1])
    says = [Lines(), Lines()]
    together = engine.generate_batch(requests, says)
    for request, shared, say in zip(requests, together, says, strict=True):
        assert [g.seed for g in shared] == request.seeds
        for alone, mine in zip(images(engine, request), shared, strict=True):
            assert difference(alone, mine.image) <= 1
        assert any("in one call with 1 other" in line for line in say.lines)
        assert any(line.startswith("Control maps (canny, depth) made in") for line in say.lines)


# -- cancel and failures -------------------------------------------------------------------------------------------


def test_a_cancel_while_the_depth_map_is_made_stops_before_the_controlnet_runs_and_the_next_is_unaffected(
    control_engines,
):
    engine = control_engines(KEY)
    request = control_request(KEY, [("depth", photo(seed=3))], num_outputs=1)
    before = images(engine, request)[0]
    estimated, controlled = [], []
    hooks = [
        engine.controlnets.depth.model.register_forward_hook(lambda *_: estimated.append(1)),
        engine.controlnets.nets["depth"].register_forward_pre_hook(lambda *_: controlled.append(1)),
    ]
    try:
        with pytest.raises(errors.Stopped, match="while making the control maps"):
            engine.generate(request, stop=lambda: bool(estimated))  # cancelled while the estimator runs
    finally:
        for hook in hooks:
            hook.remove()
    assert estimated and not controlled
    assert difference(images(engine, request)[0], before) == 0


def test_a_failure_inside_a_controlnet_puts_it_back_and_the_next_prediction_is_unaffected(control_engines):
    engine = control_engines(KEY)
    net = engine.controlnets.nets["canny"]
    request = control_request(KEY, [("canny", photo(seed=4))], num_outputs=1)
    before = images(engine, request)[0]

    def fail(module, args):
        module.to(torch.float64)  # as a failed call may leave a module (an upcast, a move)
        raise RuntimeError("failed inside the ControlNet")

    hook = net.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="inside the ControlNet"):
            engine.generate(request)
    finally:
        hook.remove()
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert difference(images(engine, request)[0], before) == 0


# -- metadata ------------------------------------------------------------------------------------------------------


def test_the_metadata_names_each_control_as_a1111s_controlnet_extension_writes_it(tmp_path):
    request = control_request("sdxl", [("canny", photo(), 0.5, 0.1, 0.8), ("none",), ("depth", photo())],
                              num_outputs=1, output_format="png")  # fmt: skip
    generated = [GeneratedImage(Image.new("RGB", (request.width, request.height)), request.seed)]
    (path,) = write_outputs(generated, request, MODELS["sdxl"], tmp_path)
    parameters = Image.open(path).text["parameters"]
    assert a1111_controlnet_units(parameters) == {
        "ControlNet 0": {  # A1111 numbers its units from 0: controlnet_1
            "Module": "canny", "Model": "diffusers/controlnet-canny-sdxl-1.0", "Weight": "0.5",
            "Resize Mode": "Crop and Resize", "Threshold A": "100", "Threshold B": "200", "Guidance Start": "0.1",
            "Guidance End": "0.8",
        },
        "ControlNet 2": {
            "Module": "depth_anything_v2", "Model": "diffusers/controlnet-depth-sdxl-1.0", "Weight": "0.75",
            "Resize Mode": "Crop and Resize", "Guidance Start": "0", "Guidance End": "1",
        },
    }  # fmt: skip
    assert "Seed: 1234, Size: 128x96, Model: Flash SDXL" in parameters  # the other settings read as before
