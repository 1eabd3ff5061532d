"""Prompts as people write them: A1111's emphasis syntax, BREAK and prompts past 75 tokens on the CLIP models
(SDXL, SD3 without T5, SD1.5), checked against A1111's documented examples and against diffusers' own encoding."""

import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image

from flashsd.engine import GeneratedImage
from flashsd.errors import InputError
from flashsd.images import write_outputs
from flashsd.loras import AppliedLora
from flashsd.models import MODELS
from flashsd.prompt_syntax import is_plain, parse
from flashsd.prompts import CHUNK_TOKENS, chunk_tokens
from flashsd.request import build_request
from testkit.recipes import a1111_emphasis

CLIP_MODELS = ["sdxl", "sd3", "sd15"]
SIZE = dict(aspect_ratio="custom", width=128, height=96)
# Single tokens in the tiny tokenizers' vocabulary (checked by `words`).
WORDS = ["a", "at", "red", "painting", "the", "of", "and"]


def request(key, **inputs):
    return build_request(MODELS[key], **{"prompt": "a lighthouse at dawn", "seed": 1234, **SIZE, **inputs})


def image(engines, key, **inputs):
    (generated,) = engines(key).generate(request(key, **inputs))
    return np.asarray(generated.image.convert("RGB")).astype(np.int16)


def difference(a, b) -> int:
    return int(np.abs(a - b).max())


def words(tokenizer, count: int, start: int = 0) -> str:
    """`count` words of one token each."""
    chosen = [WORDS[(start + i) % len(WORDS)] for i in range(count)]
    assert len(tokenizer(" ".join(chosen), add_special_tokens=False).input_ids) == count
    return " ".join(chosen)


def spans(segments):
    return [[(span.text, span.weight) for span in segment] for segment in segments]


# -- the syntax, as A1111 documents it ------------------------------------------------------------------------------

# A1111's own examples: the docstring of parse_prompt_attention (modules/prompt_parser.py of
# AUTOMATIC1111/stable-diffusion-webui), then the cheat sheet of its wiki page "Features", section
# "Attention/emphasis" ("a ((word)) - increase attention to word by a factor of 1.21 (= 1.1 * 1.1)", ...).
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),  # fmt: skip
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.1 * 1.1)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    (r"a \(word\)", [("a (word)", 1.0)]),
    (r"anime_\(character\)", [("anime_(character)", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_EXAMPLES, ids=[p for p, _ in A1111_EXAMPLES])
def test_a1111s_documented_examples_parse_to_its_documented_weights(prompt, expected):
    assert spans(parse(prompt)) == [expected]


# What A1111 makes of malformed syntax, from the grammar its parser documents: never an error.
MALFORMED = [
    ("a (cat", [("a ", 1.0), ("cat", 1.1)]),  # unclosed: weighs up to the end
    ("a [cat", [("a ", 1.0), ("cat", 1 / 1.1)]),
    ("[[cat]", [("cat", 1 / 1.1 / 1.1)]),
    ("a cat)", [("a cat)", 1.0)]),  # nothing to close: text
    ("a ]cat[", [("a ]cat", 1.0)]),
    ("cat:1.2)", [("cat:1.2)", 1.0)]),  # a weight without its bracket: text
    ("(cat:abc)", [("cat:abc", 1.1)]),  # a weight that is no number: text in a plain ( )
    ("(cat:1.2.3)", [("cat:1.2.3", 1.1)]),  # the same (A1111 itself fails here with a ValueError)
    ("(cat:" + "9" * 400 + ")", [("cat:" + "9" * 400, 1.1)]),  # no finite number either
    ("(cat: 1.2 )", [("cat", 1.2)]),  # spaces around a weight, as A1111 allows since 1.7
    ("(cat:-1)", [("cat", -1.0)]),
    (r"C:\path\to", [("C:pathto", 1.0)]),  # a lone backslash is dropped, as A1111 drops it
    (r"a \\ b", [("a \\ b", 1.0)]),
    ("(:1.2)", []),
    ("((()))", []),
    ("", []),
]


@pytest.mark.parametrize("prompt, expected", MALFORMED, ids=[p[:30] for p, _ in MALFORMED])
def test_malformed_syntax_is_read_as_a1111_reads_it(prompt, expected):
    assert spans(parse(prompt)) == [expected]


# The A1111 wiki, "Features", section "Infinite prompt length": "Adding a BREAK keyword (must be uppercase) fills the
# current chunks with padding characters. Adding more text after BREAK text will start a new chunk."
def test_break_in_capitals_and_alone_ends_a_chunk_and_anything_else_is_text():
    assert spans(parse("a cat BREAK a dog")) == [[("a cat", 1.0)], [("a dog", 1.0)]]
    assert spans(parse("(a cat BREAK a dog:1.5)")) == [[("a cat", 1.5)], [("a dog", 1.5)]]
    assert spans(parse("a BREAK BREAK b")) == [[("a", 1.0)], [], [("b", 1.0)]]
    for text in ("a cat break a dog", "BREAKfast", "a BREAKING news", "aBREAK"):
        assert spans(parse(text)) == [[(text, 1.0)]]


@pytest.mark.parametrize(
    "prompt, plain",
    [("a lighthouse at dawn, oil painting", True), ("a cat) on: a chair]", True), ("", True),
     ("(cat:1.0)", False), ("a (cat)", False), ("a [cat]", False), (r"a \(cat\)", False), ("a BREAK b", False),
     (r"C:\path", False)],
)  # fmt: skip
def test_only_text_a1111_reads_as_itself_is_plain(prompt, plain):
    assert is_plain(prompt) is plain


HOSTILE = {
    "2 500 nested brackets": "(" * 2498 + "cat" + ")" * 2499,
    "2 500 unclosed brackets": "a(" * 2500,
    "2 500 nested square brackets": "[" * 2500 + "]" * 2500,
    "alternating brackets and text": "(a[b" * 1250,
    "714 weights": "(a:1.5)" * 714,
    "5 000 backslashes": "\\" * 5000,
    "833 BREAKs": "BREAK " * 833,
    "5 000 colons": ":" * 5000,
    "4 990-digit weight": "(a:" + "9" * 4990 + ")",
}


@pytest.mark.parametrize("prompt", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_syntax_of_5000_characters_parses_in_well_under_a_second(prompt):
    started = time.perf_counter()
    segments = parse(prompt)
    assert time.perf_counter() - started < 1.0
    assert all(np.isfinite(span.weight) for segment in segments for span in segment)  # 1.1 ** 2500 is finite


# -- chunks ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def tokenizer(engines):
    return engines("sd15").pipe.tokenizer


def test_a_long_prompt_is_cut_into_75_token_chunks_each_with_its_own_start_end_and_padding(engines, tokenizer):
    text = words(tokenizer, 100)
    chunks = chunk_tokens(tokenizer, parse(text))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert chunks.tokens == 100
    assert chunks.ids == [[bos, *ids[:75], eos], [bos, *ids[75:], eos] + [pad] * 50]
    assert chunks.weights == [[1.0] * 77] * 2
    # SDXL's second tokenizer pads with "!" after the end token, as the pipeline's own tokenisation does.
    second = engines("sdxl").pipe.tokenizer_2
    row = chunk_tokens(second, parse("a red")).ids[0]
    assert second.pad_token_id != second.eos_token_id
    assert row == second("a red", padding="max_length", max_length=77).input_ids


def test_break_ends_the_chunk_even_an_empty_one(tokenizer):
    count = lambda text: len(chunk_tokens(tokenizer, parse(text)).ids)  # noqa: E731
    assert [count(t) for t in ("a red", "a BREAK red", "a red BREAK", "BREAK red", "a BREAK BREAK red", "BREAK")] == [
        1, 2, 1, 2, 3, 1
    ]  # fmt: skip
    empty = tokenizer("", padding="max_length", max_length=77).input_ids
    assert chunk_tokens(tokenizer, parse("BREAK red")).ids[0] == empty


def test_words_after_the_last_comma_move_to_the_next_chunk_when_it_is_at_most_20_tokens_back(tokenizer):
    near = f"{words(tokenizer, 70)} , {words(tokenizer, 10, 3)}"  # comma at token 70: 5 back from the cut
    far = f"{words(tokenizer, 50)} , {words(tokenizer, 30, 3)}"  # comma at token 50: 25 back
    near_chunks, far_chunks = chunk_tokens(tokenizer, parse(near)), chunk_tokens(tokenizer, parse(far))
    comma = tokenizer(",", add_special_tokens=False).input_ids[0]
    near_ids = tokenizer(near, add_special_tokens=False).input_ids
    assert near_chunks.ids[0][1:72] == near_ids[:71] and near_chunks.ids[0][71] == comma
    assert near_chunks.ids[0][72] == tokenizer.eos_token_id
    assert near_chunks.ids[1][1:11] == near_ids[71:]
    far_ids = tokenizer(far, add_special_tokens=False).input_ids
    assert far_chunks.ids[0][1:76] == far_ids[:75] and far_chunks.ids[1][1:7] == far_ids[75:]


@pytest.mark.parametrize("before_comma, moves", [(55, True), (54, False)])
def test_the_comma_backtrack_reaches_exactly_20_tokens_back(tokenizer, before_comma, moves):
    # A1111 (modules/sd_hijack_clip.py, tokenize_line): when a chunk holds 75 tokens and the next comes, the words
    # after its last comma move to the next chunk if 75 - (the comma's index) <= 20. A comma after 55 tokens sits at
    # index 55: 20 back, it moves; after 54 tokens: 21 back, it stays.
    prompt = f"{words(tokenizer, before_comma)} , {words(tokenizer, 80 - before_comma, 3)}"
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    first = chunk_tokens(tokenizer, parse(prompt)).ids[0]
    kept = before_comma + 1 if moves else 75  # the comma ends the first chunk, or the chunk is cut at 75
    assert first[1 : kept + 1] == ids[:kept] and first[kept + 1] == tokenizer.eos_token_id


def test_each_token_carries_its_spans_weight_and_special_tokens_weigh_1(tokenizer):
    chunks = chunk_tokens(tokenizer, parse("(a red:1.5) [the] of"))
    assert chunks.weights[0][:6] == [1.0, 1.5, 1.5, 1 / 1.1, 1.0, 1.0] and set(chunks.weights[0][6:]) == {1.0}


# -- embeddings, against diffusers' own encoding --------------------------------------------------------------------


def diffusers_encoding(engine, text):
    """(embeds, pooled) from the pipeline's own encode_prompt, as the model card's recipe computes them."""
    pipe, cpu = engine.pipe, torch.device("cpu")
    if engine.model.key == "sd15":
        return pipe.encode_prompt(text, cpu, 1, False)[0], None
    if engine.model.key == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(text, None, None, device=cpu, do_classifier_free_guidance=False)
        return embeds, pooled
    embeds, _, pooled, _ = pipe.encode_prompt(text, device=cpu, do_classifier_free_guidance=False)
    return embeds, pooled


def clip_part(engine, embeds):
    """The CLIP rows and columns of an embedding (SD3 adds zero columns up to its joint width and T5's zero rows)."""
    if engine.model.key != "sd3":
        return embeds
    width = engine.pipe.text_encoder.config.hidden_size + engine.pipe.text_encoder_2.config.hidden_size
    t5_rows = diffusers_encoding(engine, "")[0].shape[1] - 77
    assert not embeds[:, -t5_rows:].any() and not embeds[..., width:].any()
    return embeds[:, :-t5_rows, :width]


def encoder_widths(engine) -> list[int]:
    pipe = engine.pipe
    return [pipe.text_encoder.config.hidden_size] + (
        [pipe.text_encoder_2.config.hidden_size] if engine.model.key != "sd15" else []
    )


def embeddings_for(engine, prompt: str, negative_prompt: str | None = None) -> dict:
    return engine.prompts.pipeline_arguments(prompt, negative_prompt)


@pytest.mark.parametrize("key", CLIP_MODELS)
def test_a_plain_prompt_becomes_exactly_the_pipelines_own_embeddings(engines, key):
    engine = engines(key)
    embeds, pooled = diffusers_encoding(engine, "a lighthouse at dawn")
    mine = engine.prompts._encode("prompt", "a lighthouse at dawn")
    assert torch.equal(engine.prompts._finish(mine.embeds), embeds)
    assert (mine.pooled is None and pooled is None) or torch.equal(mine.pooled, pooled)


@pytest.mark.parametrize("key", CLIP_MODELS)
def test_a_weight_scales_its_tokens_hidden_states_as_a1111_does_per_text_encoder(engines, key):
    engine = engines(key)
    plain, pooled = diffusers_encoding(engine, "a lighthouse at dawn")
    arguments = embeddings_for(engine, "a (lighthouse:1.5) at dawn")
    tokenizer = engine.pipe.tokenizer
    first = 1 + len(tokenizer("a ", add_special_tokens=False).input_ids)
    weights = torch.ones(77)
    weights[first : first + len(tokenizer("lighthouse", add_special_tokens=False).input_ids)] = 1.5
    expected, start = [], 0
    for width in encoder_widths(engine):  # each text encoder's states are weighted and rescaled on their own
        expected.append(a1111_emphasis(clip_part(engine, plain)[0, :, start : start + width], weights))
        start += width
    ours = clip_part(engine, arguments["prompt_embeds"])[0].double()
    assert torch.allclose(ours, torch.cat(expected, dim=-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, clip_part(engine, plain)[0].double(), rtol=1e-3, atol=1e-3)
    if pooled is not None:  # the pooled embedding is the unweighted prompt's, as in A1111
        assert torch.equal(arguments["pooled_prompt_embeds"], pooled)


@pytest.mark.parametrize("key", CLIP_MODELS)
def test_break_and_long_prompts_are_the_chunks_encoded_alone_then_joined(engines, key):
    engine = engines(key)
    tokenizer = engine.pipe.tokenizer
    head, tail = words(tokenizer, CHUNK_TOKENS), words(tokenizer, 25, 2)
    for prompt, parts in [
        ("a lighthouse BREAK at dawn", ["a lighthouse", "at dawn"]),
        (f"{head} {tail}", [head, tail]),
    ]:
        arguments = embeddings_for(engine, prompt)
        encoded = [diffusers_encoding(engine, part) for part in parts]
        expected = torch.cat([clip_part(engine, embeds) for embeds, _ in encoded], dim=1)
        assert torch.allclose(clip_part(engine, arguments["prompt_embeds"]), expected, rtol=1e-5, atol=1e-6)
        if encoded[0][1] is not None:  # pooled: the first chunk's, as A1111 takes it
            assert torch.allclose(arguments["pooled_prompt_embeds"], encoded[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", CLIP_MODELS)
def test_the_shorter_of_prompt_and_negative_prompt_is_padded_with_empty_prompt_chunks(engines, key):
    engine = engines(key)
    long = words(engine.pipe.tokenizer, 160)  # 3 chunks
    empty = clip_part(engine, diffusers_encoding(engine, "")[0])
    for prompt, negative in [("fog", long), (long, "fog")]:
        arguments = embeddings_for(engine, prompt, negative_prompt=negative)
        short = "negative_prompt_embeds" if negative == "fog" else "prompt_embeds"
        ours = clip_part(engine, arguments[short])
        assert arguments["prompt_embeds"].shape == arguments["negative_prompt_embeds"].shape
        assert ours.shape[1] == 3 * 77
        assert torch.allclose(ours[:, :77], clip_part(engine, diffusers_encoding(engine, "fog")[0]), atol=1e-6)
        assert torch.equal(ours[:, 77:154], empty) and torch.equal(ours[:, 154:], empty)


# -- what the pipeline is given ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", CLIP_MODELS)
def test_plain_prompts_of_up_to_75_tokens_go_to_the_pipeline_as_text_and_others_as_embeddings(engines, key):
    engine = engines(key)
    tokenizer = engine.pipe.tokenizer
    plain = engine.pipeline_arguments(
        request(key, prompt=words(tokenizer, 75), guidance_scale=3, negative_prompt="fog")
    )
    assert plain["prompt"] == words(tokenizer, 75) and plain["negative_prompt"] == "fog"
    assert not any(name.endswith("embeds") for name in plain)
    for prompt, negative in [(words(tokenizer, 76), "fog"), ("(lighthouse:1.0)", "fog"), ("a BREAK b", "fog"),
                             ("a lighthouse", "[fog]")]:  # fmt: skip
        arguments = engine.pipeline_arguments(request(key, prompt=prompt, guidance_scale=3, negative_prompt=negative))
        assert "prompt" not in arguments and "negative_prompt" not in arguments
        assert {"prompt_embeds", "negative_prompt_embeds"} <= set(arguments)
        assert ("pooled_prompt_embeds" in arguments) is (key != "sd15")
    without_guidance = engine.pipeline_arguments(request(key, prompt="(a:1.2)", negative_prompt="fog"))
    assert "negative_prompt_embeds" not in without_guidance and "negative_prompt" not in without_guidance


# -- images on tiny weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", CLIP_MODELS)
def test_a_weight_of_1_gives_the_same_image_as_no_weight(engines, key):
    assert difference(image(engines, key, prompt="(lighthouse:1.0)"), image(engines, key, prompt="lighthouse")) == 0
    guided = dict(guidance_scale=3)
    assert difference(
        image(engines, key, prompt="a (lighthouse:1.0) at dawn", negative_prompt="(fog:1.0)", **guided),
        image(engines, key, prompt="a lighthouse at dawn", negative_prompt="fog", **guided),
    ) == 0  # fmt: skip


@pytest.mark.parametrize("key", CLIP_MODELS)
def test_other_weights_change_the_image(engines, key):
    plain = image(engines, key)
    for prompt in ("a (lighthouse:1.5) at dawn", "a (lighthouse:0.5) at dawn", "a [lighthouse] at dawn"):
        assert difference(image(engines, key, prompt=prompt), plain) > 0, prompt


@pytest.mark.parametrize("key", CLIP_MODELS)
def test_the_tail_of_a_long_prompt_changes_the_image(engines, key):
    long = words(engines(key).pipe.tokenizer, 100)
    assert difference(image(engines, key, prompt=f"{long} red"), image(engines, key, prompt=f"{long} the")) > 0


@pytest.mark.parametrize("key", CLIP_MODELS)
def test_negative_prompts_of_any_length_are_used_with_guidance(engines, key):
    long = words(engines(key).pipe.tokenizer, 100)
    guided = dict(guidance_scale=3)
    # A short prompt with a long negative one: the negative prompt's tail counts.
    assert difference(
        image(engines, key, negative_prompt=f"{long} red", **guided),
        image(engines, key, negative_prompt=f"{long} the", **guided),
    ) > 0  # fmt: skip
    # A long prompt with a short negative one: the negative prompt counts, weights included.
    assert difference(
        image(engines, key, prompt=long, negative_prompt="fog", **guided),
        image(engines, key, prompt=long, negative_prompt="(fog:1.5)", **guided),
    ) > 0  # fmt: skip


# -- reuse -----------------------------------------------------------------------------------------------------------


def test_the_previous_predictions_embeddings_are_reused_for_the_same_texts(engines):
    engine = engines("sdxl")
    calls = []
    hook = engine.pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        engine.prompts.forget()
        first = embeddings_for(engine, "a (lighthouse:1.2)", negative_prompt="fog")
        assert len(calls) == 2 and engine.prompts.reused == 0
        again = embeddings_for(engine, "a (lighthouse:1.2)", negative_prompt="fog")
        assert len(calls) == 2 and engine.prompts.reused == 2
        assert again["prompt_embeds"] is first["prompt_embeds"]
        other = embeddings_for(engine, "a (lighthouse:1.2)", negative_prompt="smoke")
        assert len(calls) == 3 and engine.prompts.reused == 1  # the prompt reused, the new negative encoded
        assert not torch.equal(other["negative_prompt_embeds"], first["negative_prompt_embeds"])
        engine.prompts.forget()  # what a change to the text encoders' weights must call
        embeddings_for(engine, "a (lighthouse:1.2)", negative_prompt="smoke")
        assert len(calls) == 5
    finally:
        hook.remove()


def test_a_replaced_text_encoder_is_never_served_embeddings_of_the_old_one(engines):
    engine = engines("sd15")
    original = engine.pipe.text_encoder
    before = embeddings_for(engine, "a (lighthouse:1.2)")["prompt_embeds"]
    replacement = type(original)(original.config).eval()  # other (random) weights
    try:
        engine.pipe.text_encoder = replacement
        after = embeddings_for(engine, "a (lighthouse:1.2)")["prompt_embeds"]
    finally:
        engine.pipe.text_encoder = original
    assert not torch.equal(before, after)


# -- logs, refusals and metadata -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", CLIP_MODELS)
def test_a_long_prompt_logs_its_chunks_and_nothing_about_cut_text(engines, key, caplog):
    caplog.set_level(logging.INFO, logger="flashsd")
    engines(key).generate(request(key, prompt=words(engines(key).pipe.tokenizer, 160) + " BREAK (red:1.3)"))
    lines = [r.getMessage() for r in caplog.records if r.name == "flashsd"]
    assert "prompt: 161 tokens in 4 chunk(s) of up to 75, each encoded on its own; weights 1 to 1.3; 1 BREAK" in lines
    assert not [line for line in lines if "tokens long" in line or "ignored" in line]


def test_a_negative_prompt_without_guidance_is_ignored_with_a_log_line(engines, caplog):
    caplog.set_level(logging.INFO, logger="flashsd")
    ignored = image(engines, "sdxl", negative_prompt="blurry, (ugly:1.4)", guidance_scale=1)
    assert difference(ignored, image(engines, "sdxl", guidance_scale=1)) == 0
    notes = [r.getMessage() for r in caplog.records if "negative_prompt ignored" in r.getMessage()]
    assert notes == [
        "negative_prompt ignored: it has an effect only when guidance_scale is above 1 (it is 1; Flash "
        "models are distilled to run without guidance)"
    ]


def test_pixart_reads_syntax_as_plain_text_and_says_so(engines, caplog):
    caplog.set_level(logging.INFO, logger="flashsd")
    arguments = engines("pixart").pipeline_arguments(request("pixart", prompt="a (lighthouse:1.5)"))
    assert arguments["prompt"] == "a (lighthouse:1.5)"
    engines("pixart").generate(request("pixart", prompt="a (lighthouse:1.5)"))
    assert any("reads the prompt as plain text" in r.getMessage() for r in caplog.records)


def test_weights_beyond_what_the_encoder_holds_fail_that_prediction_with_a_message(engines):
    engine = engines("sd15")
    overflowing = "(" * 8 + "lighthouse:" + "9" * 308 + ")" * 8  # 1e308 x 1.1^7: past float's range
    with pytest.raises(InputError, match=r"^prompt's weights are too extreme for the text encoder"):
        engine.generate(request("sd15", prompt=overflowing))
    assert engine.generate(request("sd15", prompt="(lighthouse:1" + "0" * 300 + ")"))  # huge but finite: fine
    (generated,) = engine.generate(request("sd15", prompt=HOSTILE["2 500 nested brackets"]))
    assert np.asarray(generated.image).std() > 1


def test_the_metadata_keeps_the_prompt_as_written(tmp_path):
    written = "(masterpiece:1.2), ((red hair)), [blurry] BREAK a \\(cat\\)"
    request_ = build_request(MODELS["sdxl"], prompt=written, negative_prompt="(ugly:1.3)", guidance_scale=3, seed=1,
                             output_format="png")  # fmt: skip
    (path,) = write_outputs([GeneratedImage(Image.new("RGB", (8, 8)), 1)], request_, MODELS["sdxl"], tmp_path)
    parameters = Image.open(path).text["parameters"].splitlines()
    assert parameters[:2] == [written, "Negative prompt: (ugly:1.3)"]


def test_embeddings_made_under_other_style_loras_are_never_reused(engines):
    engine = engines("sdxl")
    weighted = request("sdxl", prompt="a (lighthouse:1.2)")
    first = engine.pipeline_arguments(weighted)["prompt_embeds"]
    assert engine.pipeline_arguments(weighted)["prompt_embeds"] is first  # reused while nothing changed
    before = engine.loras.applied
    engine.loras.applied = (AppliedLora("style", 0.8, "0123456789ab"),)  # what fusing a style LoRA leaves
    try:
        under_style = engine.pipeline_arguments(weighted)["prompt_embeds"]
        assert under_style is not first
        engine.loras.applied = (AppliedLora("style", 1.0, "0123456789ab"),)  # the same LoRA, another scale
        assert engine.pipeline_arguments(weighted)["prompt_embeds"] is not under_style
    finally:
        engine.loras.applied = before
