"""Several predictions in one pipeline call: each gets exactly the images, verdicts and log lines it gets alone."""

from __future__ import annotations

import numpy as np
import pytest

from flashsd import errors
from flashsd.models import MODELS
from flashsd.request import build_request
from flashsd.safety import ImagesFlagged
from flashsd.settings import Settings

SMALL = dict(aspect_ratio="custom", width=64, height=64)


def request(key, prompt, seed, **inputs):
    return build_request(MODELS[key], prompt=prompt, seed=seed, **{**SMALL, **inputs})


def pixels(image):
    return np.asarray(image.convert("RGB")).astype(np.int16)


class Lines:
    def __init__(self):
        self.lines = []

    def __call__(self, level, message, *args):
        self.lines.append(message % args)


@pytest.mark.parametrize("key", list(MODELS))
def test_each_request_of_a_shared_call_gets_the_images_it_gets_alone(engines, key):
    engine = engines(key)
    requests = [
        request(key, "a lighthouse at dawn", 11, num_outputs=2),
        request(key, "a red car", 400, num_outputs=2),
        request(key, "a bowl of fruit", 7, num_outputs=2),
    ]
    assert len({engine.batch_key(r) for r in requests}) == 1
    says = [Lines() for _ in requests]
    together = engine.generate_batch(requests, says)
    for r, shared, say in zip(requests, together, says, strict=True):
        alone = engine.generate(r)
        assert [g.seed for g in shared] == r.seeds
        for a, b in zip(alone, shared, strict=True):
            assert np.abs(pixels(a.image) - pixels(b.image)).max() <= 1
        # its own lines: its seeds, and one progress line per step
        assert any(f"seeds {r.seeds[0]}, {r.seeds[1]}" in line for line in say.lines)
        assert sum(line.startswith(("25%", " 25%", "50%", " 50%", "75%", " 75%", "100%")) for line in say.lines) == 4
    assert not any("seeds 400" in line for line in says[0].lines + says[2].lines)  # nothing of one in another


def test_guidance_with_different_negative_prompts_in_one_call(engines):
    engine = engines("sd15")
    requests = [
        request("sd15", "a cat", 3, guidance_scale=2, negative_prompt=neg) for neg in ("blurry", "dark, grainy")
    ]
    together = engine.generate_batch(requests, [Lines(), Lines()])
    for r, shared in zip(requests, together, strict=True):
        assert np.abs(pixels(engine.generate(r)[0].image) - pixels(shared[0].image)).max() <= 1


def test_a_request_whose_images_are_all_flagged_fails_alone(engines, monkeypatch):
    engine = engines("sdxl")
    requests = [request("sdxl", "a cat", seed, num_outputs=1) for seed in (1, 2, 3)]
    alone = {r.seed: pixels(engine.generate(r)[0].image) for r in requests}

    def flag_seed_2(images):
        return [bool(np.abs(pixels(image) - alone[2]).max() <= 1) for image in images]

    monkeypatch.setattr(engine.safety_checker, "compvis_flags", flag_seed_2)  # the second opinion confirms
    first, second, third = engine.generate_batch(requests, [Lines(), Lines(), Lines()])
    assert isinstance(second, ImagesFlagged)
    assert [g.seed for g in first] == [1] and [g.seed for g in third] == [3]


def test_a_call_nobody_waits_for_stops_at_once_and_the_engine_is_unchanged(engines):
    engine = engines("sd3")
    requests = [request("sd3", "a cat", seed) for seed in (5, 6)]
    before = pixels(engine.generate(requests[0])[0].image)
    say = Lines()
    with pytest.raises(errors.Stopped):
        engine.generate_batch(requests, [say, Lines()], stop=lambda: True)
    assert sum("%|" in line for line in say.lines) == 0  # stopped inside the first step, before its end
    assert np.array_equal(pixels(engine.generate(requests[0])[0].image), before)


def test_requests_that_cannot_share_a_call_get_keys_of_their_own(engines):
    from PIL import Image

    engine = engines("sdxl")
    base = request("sdxl", "a cat", 1)
    assert engine.batch_key(request("sdxl", "a dog", 9)) == engine.batch_key(base)  # prompts and seeds may differ
    others = [
        request("sdxl", "a cat", 1, width=128),
        request("sdxl", "a cat", 1, num_inference_steps=3),
        request("sdxl", "a cat", 1, guidance_scale=2),
        request("sdxl", "a cat", 1, num_outputs=2),
        request("sdxl", "(a cat:1.3)", 1),  # A1111 weights: its own embeddings
        request("sdxl", "a cat", 1, image=Image.new("RGB", (64, 64))),
    ]
    keys = [engine.batch_key(r) for r in others]
    assert engine.batch_key(base) not in keys and len(set(keys)) == len(keys)


def test_the_image_budget_follows_the_size_and_guidance(engines, monkeypatch):
    engine = engines("sdxl")
    key = engine.batch_key(request("sdxl", "a cat", 1, width=1024, height=1024))
    assert engine.batch_budget(key) == 4
    assert engine.batch_budget(engine.batch_key(request("sdxl", "a cat", 1, width=512, height=512))) == 16
    assert (
        engine.batch_budget(engine.batch_key(request("sdxl", "a cat", 1, width=1024, height=1024, guidance_scale=2)))
        == 2
    )
    monkeypatch.setattr(engine, "settings", Settings.from_environ({"FLASHSD_BATCH_MEGAPIXELS": "8.4"}))
    assert engine.batch_budget(key) == 8
    assert engine.batch_budget(engine.batch_key(request("sdxl", "a cat", 1, image=None, width=2048, height=2048))) == 2


def test_each_prediction_of_a_shared_call_is_screened_by_its_own_setting(engines, monkeypatch):
    engine = engines("sd15")
    checked, unchecked = (
        request("sd15", "a cat", seed, disable_safety_checker=off) for seed, off in ((1, False), (2, True))
    )
    assert engine.batch_key(checked) == engine.batch_key(unchecked)  # the setting does not keep them apart
    screened = []

    def flag_everything(images):
        screened.append(len(images))
        return [True] * len(images)

    monkeypatch.setattr(engine.safety_checker, "compvis_flags", flag_everything)  # the second opinion confirms
    first, second = engine.generate_batch([checked, unchecked], [Lines(), Lines()])
    assert isinstance(first, ImagesFlagged)  # screened, and every image flagged
    assert [g.seed for g in second] == [2] and screened == [1]  # never screened


def test_a_weighted_negative_prompt_with_guidance_gets_the_images_it_gets_alone_among_others(engines):
    import asyncio

    from flashsd.batching import ModelThread, engine_batcher

    engine = engines("sdxl")
    weighted = request("sdxl", "a cat", 5, guidance_scale=2, negative_prompt="(blurry:1.5), dark")
    plain = [request("sdxl", "a cat", seed, guidance_scale=2, negative_prompt="dark") for seed in (6, 7)]
    assert engine.batch_key(weighted).alone is not None  # its negative prompt needs embeddings of its own
    alone = pixels(engine.generate(weighted)[0].image)
    thread = ModelThread()
    batcher = engine_batcher(engine, thread)

    async def main():
        return await asyncio.gather(*(batcher.submit(r) for r in (plain[0], weighted, plain[1])))

    try:
        _, among_others, _ = asyncio.run(main())
    finally:
        thread.close()
    assert np.abs(pixels(among_others[0].image) - alone).max() <= 1
