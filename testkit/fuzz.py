"""A fuzzer of the HTTP API of the real Cog server (coglet) as the container runs it, on loopback: the cases, sending
them, judging the answers. bench/fuzz_http.py runs it from the command line, tests/test_robustness_http.py in the
suite (at least 500 requests; heavy cases, at native size or 4 images at 2048x2048, cancelled once running).

Requests are generated from the server's own OpenAPI schema (GET /openapi.json), so new inputs are fuzzed
without touching this file: wrong types, out-of-range and boundary values, bad choices, explicit nulls,
missing and unknown fields, empty / whitespace-only / huge (100 kB) / non-Latin / over-77-token prompts,
hostile A1111 prompt syntax (thousands of nested or unbalanced brackets, BREAKs, weights past float's range),
malformed JSON and wrong content types, cross-field mistakes, `num_outputs` 4 at the largest size, structure
controls (each type, several at once, with image-to-image and inpainting, a type without a photo and a photo without
a type, start after end), and seeded random mixtures of all of these. Each request must end as one of:

- HTTP 4xx with a clear message (422 `detail` naming the field, 400 naming the JSON problem, 409 busy, ...);
- HTTP 200 `status: failed` with an error that names the input at fault and is not a traceback;
- HTTP 200 `status: succeeded` (the request was valid after all) or `canceled` (cancelled on purpose);

and /health-check must answer READY afterwards, with the same worker process (coglet never restarts one).

Every case carries the outcome it must get (`Case.expect`), worked out here independently of the server: for
inputs, from the schema as coglet applies it (a violation is a 422) and then from flashsd's documented input rules
(`Generator.input_problems`: each problem a text the error must contain); for raw bodies, written out by hand. A
request that gets any other outcome is a mismatch (`Report.mismatches`), even when that outcome is itself clean.
"""

from __future__ import annotations

import base64
import collections
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from testkit.cog_server import CogServer, free_port, tiny_png, wait_ready, worker_pid

# -- cases -------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    inputs: dict | None = None  # sent as {"input": inputs}
    body: bytes | None = None  # sent as is (malformed requests)
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    names: tuple[str, ...] = ()  # what a failure message must mention (any of them); () = anything readable
    heavy: bool = False  # runs at native size or larger: cancelled in the test suite, completed with --full
    expect_log: str | None = None  # a line the server log must contain afterwards
    # The outcome it must get: alternatives joined by " | ", each an outcome kind ("422", "400", "415",
    # "succeeded", "canceled") or "failed: <text the error contains>". Set by the Generator for every case.
    expect: str = ""

    def expected(self, full: bool = False) -> list[str]:
        """The acceptable outcomes; run to completion (--full), a heavy case succeeds instead of being cancelled."""
        alternatives = [a.strip() for a in self.expect.split(" | ") if a.strip()]
        if full and self.heavy and "canceled" in alternatives:
            alternatives = [a for a in alternatives if a != "canceled"] + ["succeeded"]
        return list(dict.fromkeys(alternatives))


def meets(expected: list[str], kind: str, message: str) -> bool:
    """Whether an outcome (kind, message) is one of the expected ones."""
    for alternative in expected:
        wanted, _, text = alternative.partition(": ")
        if wanted == kind and (not text or text in message):
            return True
    return False


@dataclass(frozen=True)
class Upload:
    """What a file input's value is by the time predict() would see it (the fuzzer's own record of each value)."""

    problem: str | None = None  # the start of the error it causes; "{name}" stands for the input's name
    before_predict: bool = False  # coglet fails the request itself (a download that fails), before predict()
    size: tuple[int, int] | None = None  # an image: its size
    white: bool = False  # as a mask: has pixels of at least half grey (the ones repainted)


CHUNK_TOKENS = "a lighthouse at dawn, oil painting, highly detailed, dramatic clouds, "


def prompt_values() -> list[tuple[str, str, bool]]:
    """(label, prompt, over the 77-token limit)."""
    huge = (CHUNK_TOKENS * 2000)[:100_000]
    return [
        ("empty", "", False),
        ("space", " ", False),
        ("whitespace", " \t\n\r  ", False),
        ("ideographic space", "\u3000\u3000", False),
        ("zero-width space", "\u200b", False),
        ("one letter", "a", False),
        ("chinese", "一只猫坐在红色的椅子上，阳光明媚的房间", False),
        ("japanese", "月明かりの下の古い城、油絵、詳細", False),
        ("korean", "해질녘 바다 위의 작은 배", False),
        ("arabic", "قطة تجلس على كرسي أحمر في غرفة مشمسة", False),
        ("hebrew", "חתול יושב על כיסא אדום", False),
        ("hindi", "सूर्यास्त के समय पहाड़ों का दृश्य", False),
        ("russian", "Кошка сидит на красном стуле", False),
        ("greek", "Μια γάτα σε μια κόκκινη καρέκλα", False),
        ("thai", "แมวนั่งบนเก้าอี้สีแดง", False),
        ("emoji", "🐱🪑☀️🌈 a cat 🐈‍⬛👩‍👩‍👧", False),
        ("combining marks", "a̷̛̗ ̶c̸̨a̵̺t̴͎ ̷o̶͔n̵ ̸a̶ ̴c̷h̶a̵i̴r̸" * 3, False),
        ("right-to-left override", "\u202ea cat on a chair\u202c", False),
        ("NUL and controls", "a cat\x00 on\x01 a\x07 chair\x1b[31m", False),
        ("newlines", "a cat\n\non a chair\r\n" * 5, False),
        ("html", "<script>alert(1)</script><img src=x onerror=alert(1)>", False),
        ("sql", "'; DROP TABLE predictions; --", False),
        ("format strings", "%s %d %n {0} {prompt} ${HF_TOKEN} {{}}", False),
        ("backslashes", "C:\\path\\to\\file \\u0041 \\x00", False),
        ("special tokens", "<|startoftext|><|endoftext|></s><pad><unk>", False),
        ("77-token boundary", CHUNK_TOKENS * 6, True),
        ("1 000 characters", (CHUNK_TOKENS * 20)[:1000], True),
        ("4 999 characters", (CHUNK_TOKENS * 100)[:4999], True),
        ("5 001 characters", (CHUNK_TOKENS * 100)[:5001], True),
        ("100 kB latin", huge, True),
        ("100 kB chinese", ("长城在日落时分的壮丽景色，" * 10_000)[:100_000], True),
        ("100 kB emoji", "🐱" * 100_000, True),
        ("long chinese", "长城在日落时分的壮丽景色，油画风格，细节丰富，" * 12, True),
        ("long non-latin mix", "Кошка 猫 قطة 🐱 γάτα " * 60, True),
    ]


def hostile_prompt_values() -> list[tuple[str, str]]:
    """(label, prompt): A1111 syntax at its worst, each at most 5,000 characters (the prompt limit)."""
    return [
        ("2 500 nested brackets", "(" * 2497 + "a lighthouse" + ")" * 2490),
        ("5 000 opening brackets", "(" * 5000),
        ("5 000 closing brackets", ")" * 5000),
        ("2 500 nested square brackets", "[" * 2500 + "]" * 2500),
        ("brackets and text alternating", "(a[b" * 1250),
        ("454 weights", "(a cat:1.3)" * 454),
        ("a 4 990-digit weight", "(a:" + "9" * 4990 + ")"),
        ("weights without brackets", ":1.2)" * 1000),
        ("2 500 escaped brackets", "\\(" * 2500),
        ("5 000 backslashes", "\\" * 5000),
        ("833 BREAKs", "BREAK " * 833),
        ("every syntax at once", ("((a \\(cat\\):1.2) [dog] BREAK (sky:0.5), [[x]:2] " * 120)[:5000]),
        ("Arabic-Indic digits as a weight", "a (lighthouse:\u0661.\u0665)"),
        ("zero and negative weights", "(a lighthouse:0) (at dawn:-1.5) (sky:-0)"),
    ]


# Hostile prompts also sent as the negative prompt (with guidance), padded against a one-chunk prompt.
NEGATIVE_HOSTILE = ("2 500 nested brackets", "833 BREAKs", "every syntax at once")


def _wrong_types(kind: str) -> list[tuple[str, Any]]:
    base = [("null", None), ("list", [1]), ("object", {"a": 1}), ("true", True)]
    if kind == "string":
        return base + [("integer", 5), ("float", 1.5)]
    if kind == "integer":
        return base + [
            ("string", "3"),
            ("float", 1.5),
            ("float-integral", 2.0),
            ("empty string", ""),
            ("2^64", 2**64),
            ("-2^63-1", -(2**63) - 1),
            ("1e308", 1e308),
        ]
    if kind == "number":
        return base + [
            ("string", "0.5"),
            ("NaN string", "NaN"),
            ("inf string", "Infinity"),
            ("1e308", 1e308),
            ("-1e308", -1e308),
        ]
    if kind == "boolean":
        return [("null", None), ("string", "true"), ("integer", 1), ("list", [True])]
    return base


class Generator:
    """Cases from an OpenAPI document; `base` is a valid, cheap request (64x64 when 'custom' exists). `model`
    (a flashsd model key) decides whether image inputs are accepted, `controlnets` which control types are."""

    def __init__(
        self,
        schema: dict,
        seed: int = 0,
        closed_port: int | None = None,
        model: str = "sdxl",
        controlnets: tuple[str, ...] = (),
    ):
        self.schema = schema
        self.model = model
        self.controlnets = controlnets  # the control types the server's build holds (FLASHSD_CONTROLNETS)
        self.uploads: dict[str, Upload] = {}
        # Each style-LoRA source sent: the start of the error it causes (None: no LoRA, or a fine one).
        self.lora_values: dict[str, str | None] = {}
        components = schema["components"]["schemas"]
        self.input = components["Input"]
        self.properties: dict[str, dict] = {}
        for name, prop in self.input["properties"].items():
            prop = dict(prop)
            for ref in prop.pop("allOf", []):
                prop |= components[ref["$ref"].rsplit("/", 1)[1]]
            self.properties[name] = prop
        self.required = set(self.input.get("required", []))
        self.random = random.Random(seed)
        self.closed = closed_port or free_port()
        choices = self.properties.get("aspect_ratio", {}).get("enum", [])
        self.base: dict[str, Any] = {"prompt": "a lighthouse at dawn"}
        if "custom" in choices and {"width", "height"} <= set(self.properties):
            self.base |= {"aspect_ratio": "custom", "width": 64, "height": 64}
        if "disable_safety_checker" in self.properties:
            # tiny random weights make the checker's verdicts random: keep runs comparable
            self.base["disable_safety_checker"] = True

    def with_(self, **changes) -> dict:
        inputs = dict(self.base)
        for k, v in changes.items():
            if v is _DROP:
                inputs.pop(k, None)
            else:
                inputs[k] = v
        return inputs

    # -- per field --

    def field_cases(self) -> list[Case]:
        cases = []
        for name, prop in self.properties.items():
            kind = prop.get("type")
            heavy = name == "aspect_ratio"  # any named ratio is the native size
            for label, value in _wrong_types(kind):
                cases.append(Case(f"{name}: {label}", self.with_(**{name: value}), names=(name,)))
            if name not in self.required:
                cases.append(
                    Case(
                        f"{name}: omitted",
                        self.with_(**{name: _DROP}),
                        names=(name,),
                        heavy=heavy or (name in ("width", "height") and "aspect_ratio" in self.base),
                    )
                )
            else:
                cases.append(Case(f"{name}: missing", self.with_(**{name: _DROP}), names=(name,)))
            if "enum" in prop:
                for choice in prop["enum"]:
                    valid = self.with_(**{name: choice})
                    if name == "aspect_ratio" and choice != "custom":
                        valid = self.with_(**{name: choice, "width": _DROP, "height": _DROP})
                    cases.append(Case(f"{name}: {choice!r}", valid, names=(name,), heavy=heavy and choice != "custom"))
                first = prop["enum"][0]
                for label, value in [
                    ("empty", ""),
                    ("space", " "),
                    ("upper case", str(first).upper() + "X"),
                    ("padded", f" {first} "),
                    ("emoji", "🙂"),
                    ("long", "x" * 10_000),
                ]:
                    cases.append(Case(f"{name}: bad choice {label}", self.with_(**{name: value}), names=(name,)))
            if kind in ("integer", "number") and "minimum" in prop and "maximum" in prop:
                low, high = prop["minimum"], prop["maximum"]
                step = 1 if kind == "integer" else 0.001
                for label, value in [
                    ("minimum", low),
                    ("maximum", high),
                    ("below minimum", low - step),
                    ("above maximum", high + step),
                    ("negative", -abs(high) - 1),
                ]:
                    cases.append(Case(f"{name}: {label} {value}", self.with_(**{name: value}), names=(name,)))
                if kind == "integer" and high - low > 16:
                    for value in self.random.sample(range(int(low), int(high) + 1), 3):
                        cases.append(Case(f"{name}: random {value}", self.with_(**{name: value}), names=(name,)))
            if prop.get("format") == "uri":
                cases += self.uri_cases(name)
        return self.expecting(cases)

    def uri_cases(self, name: str) -> list[Case]:
        """A file input: what coglet downloads or decodes before predict() sees a path."""
        other = {"mask": {"image": self.png()}}.get(name, {})
        if name.startswith("controlnet_") and name.endswith("_image"):  # a control image is read only for a type
            other = {name.removesuffix("_image"): (self.controlnets or ("canny",))[0]}
        unreadable, not_image = Upload("{name} could not be read"), Upload("{name} is not an image")
        values = [
            ("empty", self.file("", unreadable)),  # the empty path: the working directory
            ("not a url", self.file("not a url", unreadable)),
            ("truncated data url", self.file("data:image/png;base64,AAAA", not_image)),
            ("text data url", self.file("data:text/plain;base64," + base64.b64encode(b"hello").decode(), not_image)),
            ("bad base64", self.file("data:image/png;base64,@@@@", not_image)),
            (
                "unreachable http",
                self.file(
                    f"http://127.0.0.1:{self.closed}/x.png", Upload("Input validation error", before_predict=True)
                ),
            ),
            ("unsupported scheme", self.file("ftp://127.0.0.1/x.png", unreadable)),
            ("local file", self.file("file:///etc/passwd", unreadable)),  # never read from the disk
            ("1x1 image", self.png((1, 1))),
            ("very wide image", self.png((4000, 16))),
            ("palette with alpha", self.png((64, 64), 3, "P")),
        ]
        return [
            Case(f"{name}: {label}", self.with_(**other, **{name: value}), names=(name,)) for label, value in values
        ]

    def file(self, value: str, upload: Upload) -> str:
        self.uploads[value] = upload
        return value

    def png(self, size: tuple[int, int] = (64, 64), color=(200, 30, 30), mode: str = "RGB") -> str:
        """tiny_png(...), recorded with its size and whether it has white (as a mask: repainted) pixels."""
        from PIL import Image

        _, lightest = Image.new(mode, size, color).convert("L").getextrema()
        return self.file(tiny_png(size, color, mode), Upload(size=size, white=lightest >= 128))

    # -- prompts --

    def prompt_cases(self) -> list[Case]:
        from flashsd.models import MODELS

        # What the log says of a long prompt: CLIP models read it whole, in chunks; PixArt's T5 says what it cuts.
        long_log = "chunk(s) of up to 75" if MODELS[self.model].prompt_encoding else "tokens long but"
        cases = []
        for label, text, long in prompt_values():
            expect = long_log if long and len(text) <= 5000 else None
            cases.append(Case(f"prompt: {label}", self.with_(prompt=text), names=("prompt",), expect_log=expect))
            if "negative_prompt" in self.properties and "guidance_scale" in self.properties:
                cases.append(
                    Case(
                        f"negative_prompt: {label}",
                        self.with_(negative_prompt=text, guidance_scale=2),
                        names=("negative_prompt",),
                    )
                )
        return self.expecting(cases)

    # -- across fields --

    def cross_cases(self) -> list[Case]:
        p = self.properties
        cases = []
        if {"width", "height", "aspect_ratio"} <= set(p):
            cases += [
                Case("width with a named ratio", self.with_(aspect_ratio="1:1", height=_DROP), names=("width",)),
                Case("custom without height", self.with_(height=_DROP), names=("height",)),
                Case("custom without width", self.with_(width=_DROP), names=("width",)),
                Case("size not a multiple of 16", self.with_(width=100), names=("width",)),
                Case("widest", self.with_(width=2048, height=64), names=("width",)),
                Case("tallest", self.with_(width=64, height=2048), names=("height",)),
                Case(
                    "4 images at the largest size",
                    self.with_(width=2048, height=2048, num_outputs=4, output_format="jpg"),
                    names=("num_outputs", "width"),
                    heavy=True,
                ),
            ]
        if {"negative_prompt", "guidance_scale"} <= set(p):
            cases += [
                Case(
                    "negative prompt without guidance",
                    self.with_(negative_prompt="blurry", guidance_scale=0),
                    names=("negative_prompt", "guidance_scale"),
                ),
                Case(
                    "negative prompt at guidance 1",
                    self.with_(negative_prompt="blurry", guidance_scale=1),
                    names=("negative_prompt", "guidance_scale"),
                ),
                Case(
                    "guidance 10 with a negative prompt",
                    self.with_(negative_prompt="blurry", guidance_scale=10),
                    names=("guidance_scale",),
                ),
            ]
        if "seed" in p and "num_outputs" in p:
            cases.append(
                Case("largest seed, 4 images", self.with_(seed=p["seed"]["maximum"], num_outputs=4), names=("seed",))
            )
            cases.append(Case("seed 0", self.with_(seed=0), names=("seed",)))
        if {"image", "mask"} <= set(p):
            cases += [
                Case("image to image", self.with_(image=self.png()), names=("image",)),
                Case("inpainting", self.with_(image=self.png(), mask=self.png((64, 64), 255, "L")), names=("mask",)),
                Case("mask without image", self.with_(mask=self.png((64, 64), 255, "L")), names=("mask", "image")),
                Case("black mask", self.with_(image=self.png(), mask=self.png((64, 64), 0, "L")), names=("mask",)),
                Case(
                    "mask of another size",
                    self.with_(image=self.png(), mask=self.png((32, 48), 255, "L")),
                    names=("mask",),
                ),
            ]
        cases += [
            Case("unknown field", self.with_(foo=1), names=("foo",)),
            Case("unknown field, wrong case", self.with_(Prompt="x"), names=("Prompt",)),
            Case("__proto__ field", self.with_(__proto__={"admin": True}), names=("__proto__",)),
            Case("empty field name", self.with_(**{"": 1}), names=("",)),
            Case("200 unknown fields", self.with_(**{f"extra_{i}": i for i in range(200)}), names=()),
            Case("empty input", {}, names=("prompt",)),
        ]
        if {"lora_weights", "extra_lora"} <= set(p):
            cases += self.lora_cases()
        if {"controlnet_1", "controlnet_1_image", "controlnet_3_image"} <= set(p):
            cases += self.control_cases()
        return self.expecting(cases)

    def control_cases(self) -> list[Case]:
        """Structure controls as users mix them: each type alone and together, with image-to-image and inpainting,
        deciding the size, in the wrong order of start and end, a type without a photo, a photo without a type."""
        photo, wide = self.png((64, 64), (40, 200, 90)), self.png((128, 64), (30, 30, 220))
        mask = self.png((64, 64), 255, "L")
        cases = [
            Case(f"control: {kind}", self.with_(controlnet_1=kind, controlnet_1_image=photo), names=("controlnet_1",))
            for kind in ("canny", "depth")
        ]
        cases += [
            Case("control: canny and depth", self.with_(controlnet_1="canny", controlnet_1_image=photo,
                 controlnet_3="depth", controlnet_3_image=wide, controlnet_3_conditioning_scale=2.5),
                 names=("controlnet_1", "controlnet_3")),
            Case("control: three at once", self.with_(**{f"controlnet_{n}": "canny" for n in (1, 2, 3)},
                 **{f"controlnet_{n}_image": photo for n in (1, 2, 3)}), names=("controlnet_1",)),
            Case("control: with image to image", self.with_(image=photo, controlnet_2="canny", controlnet_2_image=wide),
                 names=("controlnet_2", "image")),
            Case("control: with inpainting", self.with_(image=photo, mask=mask, controlnet_1="depth",
                 controlnet_1_image=photo), names=("controlnet_1", "mask")),
            Case("control: sets the size", self.with_(aspect_ratio="match_input_image", width=_DROP, height=_DROP,
                 controlnet_1="canny", controlnet_1_image=wide), names=("controlnet_1",), heavy=True),
            Case("control: start after end", self.with_(controlnet_2="depth", controlnet_2_image=photo,
                 controlnet_2_start=0.8, controlnet_2_end=0.2), names=("controlnet_2_start",)),
            Case("control: start equals end", self.with_(controlnet_1="canny", controlnet_1_image=photo,
                 controlnet_1_start=0.5, controlnet_1_end=0.5), names=("controlnet_1_start",)),
            Case("control: a type without a photo", self.with_(controlnet_3="depth"), names=("controlnet_3",)),
            Case("control: a photo without a type", self.with_(controlnet_2_image=photo), names=("controlnet_2",)),
            Case("control: scale 0 and a short window", self.with_(controlnet_1="canny", controlnet_1_image=photo,
                 controlnet_1_conditioning_scale=0, controlnet_1_start=0.9, controlnet_1_end=1),
                 names=("controlnet_1",)),
        ]  # fmt: skip
        return cases

    def lora_cases(self) -> list[Case]:
        """Style-LoRA sources that name nothing fetchable, or that cannot be fetched from here (the server has no
        network but loopback, and the hub is off or unreachable): each fails naming its input, in seconds."""
        closed = f"http://127.0.0.1:{self.closed}/style.safetensors"
        cases = []
        for label, name, value, problem in [
            ("unreachable URL", "lora_weights", closed, "could not connect to 127.0.0.1"),
            ("unreachable URL with a key", "extra_lora", closed + "?token=fuzz-secret", "could not connect to 127.0.0.1"),
            ("CivitAI-like unreachable", "lora_weights", f"http://127.0.0.1:{self.closed}/api/download/models/1",
             "could not connect to 127.0.0.1"),
            ("hub repo, no hub", "lora_weights", "someone/watercolor", "Hugging Face hub"),
            ("hub file, no hub", "extra_lora", "someone/watercolor/style.safetensors", "Hugging Face hub"),
            ("not a source", "lora_weights", "a watercolor style", "is neither an http(s) URL nor a Hugging Face repo"),
            ("ftp URL", "extra_lora", "ftp://127.0.0.1/style.safetensors", "is not an http(s) URL"),
            ("local file", "lora_weights", "file:///etc/passwd", "is not an http(s) URL"),
            ("data URL", "extra_lora", "data:application/octet-stream;base64,AAAA", "is neither"),
            ("pickle URL", "lora_weights", "https://127.0.0.1/style.ckpt", "is a pickled PyTorch file"),
            ("pickle in a repo", "extra_lora", "someone/watercolor/model.bin", "is a pickled PyTorch file"),
            ("not safetensors in a repo", "lora_weights", "someone/watercolor/README.md", "names a file that is not .safetensors"),
            ("path traversal", "extra_lora", "../../etc/passwd", "is neither"),
            ("repo path traversal", "lora_weights", "someone/style/../../x.safetensors", "does not name a file inside"),
            ("10 000 characters", "lora_weights", "https://127.0.0.1/" + "x" * 10_000, "characters long"),
            ("emoji", "extra_lora", "🎨/🖌️", "is neither"),
            ("whitespace", "lora_weights", " \t ", None),
        ]:  # fmt: skip
            self.lora_values[value] = problem
            cases.append(Case(f"{name}: {label}", self.with_(**{name: value}), names=(name,)))
        cases += [
            Case("lora_scale without a LoRA", self.with_(lora_scale=2.5), names=("lora_scale",)),
            Case("both LoRAs unreachable", self.with_(lora_weights=closed, extra_lora=closed),
                 names=("lora_weights", "extra_lora")),
        ]  # fmt: skip
        return cases

    # -- bodies --

    def body_cases(self) -> list[Case]:
        """Malformed requests. Expected: 400 for what is not JSON, 415 for another content type, 422 for JSON that
        is not a prediction request; a well-formed request gets what its input gets."""
        valid = json.dumps({"input": self.base}).encode()
        j = {"Content-Type": "application/json"}
        huge = self.with_(prompt="a" * 3_000_000)
        raw = [
            ("empty body", b"", "400"),
            ("open brace", b"{", "400"),
            ("not json", b"{not json", "400"),
            ("array", b"[]", "422"),
            ("null", b"null", "422"),
            ("number", b"42", "422"),
            ("string", b'"a cat"', "422"),
            ("input null", b'{"input": null}', "422"),
            ("input array", b'{"input": []}', "422"),
            ("input string", b'{"input": "a cat"}', "422"),
            ("no input", b"{}", "422"),
            ("trailing comma", b'{"input": {"prompt": "a cat",}}', "400"),
            ("NaN literal", b'{"input": {"prompt": "a cat", "guidance_scale": NaN}}', "400"),
            ("Infinity literal", b'{"input": {"prompt": "a cat", "guidance_scale": Infinity}}', "400"),
            ("1e999", b'{"input": {"prompt": "a cat", "guidance_scale": 1e999}}', "400"),
            # of duplicate keys, the last one counts (as in Python's json and JavaScript)
            ("duplicate keys", b'{"input": {"prompt": "a cat", "prompt": ""}}', self.expect({"prompt": ""})),
            ("lone surrogate", b'{"input": {"prompt": "a \\ud800 cat"}}', "400"),
            ("invalid utf-8", b'{"input": {"prompt": "\xff\xfe cat"}}', "400"),
            ("utf-8 BOM", b"\xef\xbb\xbf" + valid, "400"),
            ("nested 100 000 deep", b"[" * 100_000 + b"]" * 100_000, "422"),
            ("nested input", b'{"input": {"prompt": {"prompt": {"prompt": "a"}}}}', "422"),
            ("truncated valid body", valid[: len(valid) // 2], "400"),
            ("single quotes", b"{'input': {'prompt': 'a cat'}}", "400"),
            ("comment", b'{"input": {"prompt": "a cat"} /* hi */}', "400"),
            ("3 MB prompt", json.dumps({"input": huge}).encode(), self.expect(huge)),
        ]
        cases = [Case(f"body: {label}", body=body, headers=j, expect=expect) for label, body, expect in raw]
        valid_outcome = self.expect(self.base)  # the request fields coglet ignores or only logs leave it valid
        cases += [
            Case("body: text/plain", body=valid, headers={"Content-Type": "text/plain"}, expect="415"),
            Case("body: no content type", body=valid, headers={}, expect="422"),  # read as no input at all
            Case(
                "body: form encoded",
                body=b"prompt=a+cat",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                expect="415",
            ),
            Case(
                "body: bad webhook",
                body=json.dumps({"input": self.base, "webhook": "not a url"}).encode(),
                headers=j,
                expect=valid_outcome,
            ),
            Case(
                "body: unreachable webhook",
                body=json.dumps({"input": self.base, "webhook": f"http://127.0.0.1:{self.closed}/hook"}).encode(),
                headers=j,
                expect=valid_outcome,
            ),
            Case(
                "body: bad webhook filter",
                body=json.dumps({"input": self.base, "webhook_events_filter": ["bogus"]}).encode(),
                headers=j,
                expect="422",
            ),
            Case(
                "body: path-like id",
                body=json.dumps({"input": self.base, "id": "../../etc/passwd"}).encode(),
                headers=j,
                expect=valid_outcome,
            ),
            Case(
                "body: output_file_prefix",
                body=json.dumps(
                    {"input": self.base, "output_file_prefix": f"http://127.0.0.1:{self.closed}/"}
                ).encode(),
                headers=j,
                expect=valid_outcome,
            ),
        ]
        return cases

    # -- random mixtures --

    def mixtures(self, count: int, pool: list[Case]) -> list[Case]:
        """Two or three single-field perturbations at once: the first problem found must still be named."""
        singles = [c for c in pool if c.inputs is not None and len(c.names) == 1 and not c.heavy]
        cases = []
        for i in range(count):
            picked = self.random.sample(singles, self.random.choice((2, 3)))
            inputs = dict(self.base)
            for case in picked:
                for k in set(self.base) | set(case.inputs):
                    if k not in case.inputs:
                        inputs.pop(k, None)
                    elif case.inputs[k] != self.base.get(k, _DROP):
                        inputs[k] = case.inputs[k]
            names = tuple(sorted({n for c in picked for n in c.names}))
            cases.append(
                Case(f"mix {i}: " + " + ".join(c.name for c in picked), inputs, names=names, heavy=self.heavy(inputs))
            )
        return self.expecting(cases)

    def heavy(self, inputs: dict) -> bool:
        """Whether a request, if valid, runs at more than a few 256x256 images' worth of pixels."""
        ratio = inputs.get("aspect_ratio", self.properties.get("aspect_ratio", {}).get("default"))
        if ratio in self.properties.get("aspect_ratio", {}).get("enum", ()) and ratio != "custom":
            return True  # the model's native size
        width, height, count = (inputs.get(k) for k in ("width", "height", "num_outputs"))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (width, height)):
            return False
        count = count if isinstance(count, int) and not isinstance(count, bool) and 0 < count < 5 else 1
        return width * height * count > 4 * 256 * 256

    # -- the outcome each case must get --

    def expecting(self, cases: list[Case]) -> list[Case]:
        """`cases`, each request of inputs given the outcome it must get (see expect)."""
        for case in cases:
            if case.inputs is not None and not case.expect:
                case.expect = self.expect(case.inputs, case.heavy)
        return cases

    def expect(self, inputs: dict, heavy: bool = False) -> str:
        """The outcome `inputs` must get: 422 when coglet's schema validation refuses it; a failed prediction
        naming a problem when it passes the schema but not flashsd's input rules (any of the problems it has: the
        first one found is named); otherwise it succeeds, or a heavy one is cancelled (a native-size image on tiny
        weights may also finish in the moment before the cancel lands)."""
        if self.schema_violations(inputs):
            return "422"
        uploads = [self.uploads[inputs[name]] for name in self.file_inputs if isinstance(inputs.get(name), str)]
        downloads = [u.problem for u in uploads if u.before_predict]
        if downloads:  # coglet fails the request before predict() runs
            return f"failed: {downloads[0]}"
        problems = self.input_problems(inputs)
        if problems:
            return " | ".join(f"failed: {problem}" for problem in problems)
        return "canceled | succeeded" if heavy else "succeeded"

    @property
    def file_inputs(self) -> list[str]:
        return [name for name, prop in self.properties.items() if prop.get("format") == "uri"]

    def schema_violations(self, inputs: dict) -> list[str]:
        """What coglet refuses with a 422: a missing required field, or a value that does not match its field's
        JSON schema (type, enum, minimum, maximum; `nullable` is an OpenAPI note JSON Schema does not apply, so
        an explicit null is refused too). Unknown fields are ignored."""
        found = [f"{name}: missing" for name in self.required if name not in inputs]
        types = {
            "string": lambda v: isinstance(v, str),
            "boolean": lambda v: isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            # JSON Schema: a number with no fractional part is an integer (2.0 passes, 1.5 does not)
            "integer": lambda v: (
                (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
            ),
        }
        for name, value in inputs.items():
            prop = self.properties.get(name)
            if prop is None:
                continue
            if "type" in prop and not types.get(prop["type"], lambda _: True)(value):
                found.append(f"{name}: not {prop['type']}")
            elif "enum" in prop and value not in prop["enum"]:
                found.append(f"{name}: not a choice")
            elif "minimum" in prop and isinstance(value, (int, float)) and value < prop["minimum"]:
                found.append(f"{name}: below minimum")
            elif "maximum" in prop and isinstance(value, (int, float)) and value > prop["maximum"]:
                found.append(f"{name}: above maximum")
        return found

    def input_problems(self, inputs: dict) -> list[str]:
        """The problems flashsd's documented input rules find in inputs that passed the schema, each as a text its
        error message contains (for flashsd's predict.py; fields it does not have are skipped)."""
        from flashsd.models import MODELS
        from flashsd.request import CUSTOM, MAX_PROMPT_CHARS, SIZE_MULTIPLE

        defaults = {name: prop.get("default") for name, prop in self.properties.items()}
        v = defaults | inputs
        problems = []
        prompt, negative = v.get("prompt"), v.get("negative_prompt") or ""
        if isinstance(prompt, str) and not prompt.strip():
            problems.append("prompt is empty")
        for name, text in (("prompt", prompt), ("negative_prompt", negative)):
            if isinstance(text, str) and len(text) > MAX_PROMPT_CHARS:
                problems.append(f"{name} is {len(text)} characters long")
        image = self.uploads[v["image"]] if v.get("image") is not None else None  # every value sent is recorded
        mask = self.uploads[v["mask"]] if v.get("mask") is not None else None
        if mask is not None and image is None:
            problems.append("mask was given without image")
        if image is not None and MODELS[self.model].img2img_pipeline is None:
            problems.append("supports text-to-image only")
        for name, upload in (("image", image), ("mask", mask)):
            if upload is not None and upload.problem:
                problems.append(upload.problem.format(name=name))
        if image is not None and mask is not None and image.size and mask.size:
            if image.size != mask.size:
                problems.append(f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x{image.size[1]}")
            elif not mask.white:  # the masks here are one colour: no crop can add or remove white
                problems.append("mask has no white area")
        if "aspect_ratio" in self.properties:
            if v.get("aspect_ratio") == CUSTOM:
                for side in ("width", "height"):
                    value = v.get(side)
                    if value is None:
                        problems.append(f"{side} is required when aspect_ratio is '{CUSTOM}'")
                    elif not isinstance(value, int):
                        problems.append(f"{side} must be a whole number of pixels")
                    elif value % SIZE_MULTIPLE:
                        problems.append(f"{side}={value} is not allowed")
            elif v.get("width") is not None or v.get("height") is not None:
                problems.append(f"width and height are only used with aspect_ratio='{CUSTOM}'")
        problems += self.control_problems(v)
        for name, prop in self.properties.items():  # an integral float passes the schema, not flashsd
            if prop.get("type") == "integer" and name not in ("width", "height") and isinstance(v.get(name), float):
                problems.append(f"{name} must be a whole number")
        # (A negative prompt with guidance_scale <= 1 is accepted and ignored: no problem.)
        for name in ("lora_weights", "extra_lora"):  # checked after every other input, fetched last of all
            value = v.get(name)
            if isinstance(value, str) and value.strip():
                takes = MODELS[self.model].lora_family is not None
                problem = self.lora_values[value] if takes else "takes no style LoRA"  # every value sent is recorded
                if problem:
                    problems.append(problem)
        return problems

    def control_problems(self, v: dict) -> list[str]:
        """What flashsd.control's rules find in the controlnet_1.. slots of inputs `v` (defaults applied) that passed
        the schema: each slot in turn, a photo read only for a type the build holds."""
        from flashsd.control import FAMILIES, MAX_CONTROLS, NONE

        problems = []
        for number in range(1, MAX_CONTROLS + 1):
            name = f"controlnet_{number}"
            if name not in self.properties:
                continue
            kind, image = v.get(name) or NONE, v.get(f"{name}_image")
            upload = self.uploads[image] if image is not None else None  # every value sent is recorded
            start, end = v.get(f"{name}_start"), v.get(f"{name}_end")
            if kind == NONE:
                if upload is not None:
                    problems.append(f"{name}_image was given but {name} is '{NONE}'")
            elif self.model not in FAMILIES:
                problems.append("takes no ControlNet")
            elif kind not in self.controlnets:
                problems.append(f"{name}='{kind}': this model holds")
            elif upload is None:
                problems.append(f"{name}='{kind}' needs {name}_image")
            elif start >= end:
                problems.append(f"{name}_start={start:g} must be below {name}_end={end:g}")
            elif upload.problem:
                problems.append(upload.problem.format(name=f"{name}_image"))
        return problems

    def cases(self, mixtures: int = 200) -> list[Case]:
        pool = self.field_cases() + self.prompt_cases() + self.cross_cases() + self.syntax_cases()
        return pool + self.body_cases() + self.mixtures(mixtures, pool)

    # -- hostile prompt syntax --

    def syntax_cases(self) -> list[Case]:
        """A1111 syntax at its worst, within the 5,000 characters a prompt may have: each is read as A1111 reads it
        and generates, except weights whose product passes float's range, which fail naming the prompt."""
        cases = []
        for label, text in hostile_prompt_values():
            cases.append(Case(f"prompt syntax: {label}", self.with_(prompt=text), names=("prompt",)))
            if label in NEGATIVE_HOSTILE and {"negative_prompt", "guidance_scale"} <= set(self.properties):
                cases.append(
                    Case(
                        f"negative_prompt syntax: {label}",
                        self.with_(negative_prompt=text, guidance_scale=2),
                        names=("negative_prompt",),
                    )
                )
        from flashsd.models import MODELS

        overflow = "(" * 8 + "a lighthouse:" + "9" * 308 + ")" * 8  # 1e308 x 1.1^7: infinite
        for name, extra in (("prompt", {}), ("negative_prompt", {"guidance_scale": 2})):
            if name in self.properties:
                # Its outcome is set here (input_problems does not parse syntax): refused where CLIP reads weights,
                # plain text for PixArt. The second name keeps it out of the random mixtures, whose outcomes come
                # from input_problems alone.
                expect = f"failed: {name}'s weights are too extreme" if MODELS[self.model].prompt_encoding else ""
                cases.append(
                    Case(
                        f"{name} syntax: weight past float's range",
                        self.with_(**{name: overflow}, **extra),
                        names=(name, "weights"),
                        expect=expect,
                    )
                )
        return self.expecting(cases)


class _Drop:
    def __repr__(self) -> str:
        return "<omitted>"


_DROP = _Drop()


# -- running them ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: str
    http: int
    kind: str  # "422", "400", "failed", "succeeded", "canceled", ...
    message: str
    seconds: float
    health: str | None
    health_s: float
    first_health: str | None  # /health-check at once after the response (BUSY for a moment is coglet's normal)
    problems: list[str]
    expected: str = ""  # the outcomes it had to get (Case.expected, joined by " | ")
    as_expected: bool = True


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    worker_pid_before: int = 0
    worker_pid_after: int = 0
    server_alive: bool = True
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        found = [f"{o.case}: {p}" for o in self.outcomes for p in o.problems]
        if self.worker_pid_after != self.worker_pid_before or not self.server_alive:
            found.append(
                f"worker {self.worker_pid_before} replaced by {self.worker_pid_after} (server alive: {self.server_alive})"
            )
        return found

    @property
    def mismatches(self) -> list[str]:
        """Each case that did not get the outcome it must get: the case, what it had to get, what it got."""
        return [
            f"{o.case}: expected {o.expected}, got {o.kind}{': ' + o.message[:300] if o.message else ''}"
            for o in self.outcomes
            if not o.as_expected
        ]

    @property
    def worker_deaths(self) -> int:
        return int(self.worker_pid_after != self.worker_pid_before or not self.server_alive)

    def by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(o.kind for o in self.outcomes).most_common())

    def summary(self) -> dict:
        slowest = max(self.outcomes, key=lambda o: o.seconds) if self.outcomes else None
        return {
            "requests": len(self.outcomes),
            "by_kind": self.by_kind(),
            "problems": len(self.problems),
            "mismatches": len(self.mismatches),
            "worker_deaths": self.worker_deaths,
            "seconds": round(self.seconds, 1),
            "slowest": f"{slowest.case} ({slowest.seconds:.1f} s)" if slowest else None,
            "busy_at_once_after_response": sum(o.first_health != "READY" for o in self.outcomes),
            "longest_until_ready_s": round(max((o.health_s for o in self.outcomes), default=0), 3),
        }


def _mentions(text: str, names: tuple[str, ...]) -> bool:
    if not names:
        return True
    lowered = text.lower()
    return any(n.lower() in lowered or n.replace("_", " ").lower() in lowered for n in names if n)


def judge(case: Case, response: requests.Response) -> tuple[str, str, list[str]]:
    """(kind, message, problems) for one response."""
    problems = []
    code = response.status_code
    text = response.text
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if code >= 500:
        return f"http {code}", text[:300], [f"HTTP {code}: {text[:300]}"]
    if code == 200:
        if not isinstance(payload, dict) or "status" not in payload:
            return "200 without status", text[:300], ["HTTP 200 without a prediction status"]
        status = payload["status"]
        if status == "failed":
            error = str(payload.get("error") or "")
            if not error.strip():
                problems.append("failed without an error message")
            if "Traceback (most recent call last)" in error:
                problems.append(f"the error is a traceback: {error[:200]}")
            if case.inputs is not None and not _mentions(error, case.names) and "Input validation error" not in error:
                problems.append(f"the error does not name {' or '.join(case.names)}: {error[:300]}")
            return "failed", error, problems
        if status == "succeeded":
            output = payload.get("output")
            if not output:
                problems.append("succeeded without output")
            return "succeeded", "", problems
        return status, str(payload.get("error") or ""), problems
    if code == 422:
        detail = payload.get("detail") if isinstance(payload, dict) else None
        message = json.dumps(detail) if detail is not None else text
        if not message.strip():
            problems.append("422 without a message")
        elif case.inputs is not None and case.names and detail is not None and not _mentions(message, case.names):
            problems.append(f"422 does not name {' or '.join(case.names)}: {message[:300]}")
        return "422", message[:500], problems
    if 400 <= code < 500:
        if not text.strip():
            problems.append(f"HTTP {code} without a message")
        return str(code), text[:500], problems
    return f"http {code}", text[:300], [f"unexpected HTTP {code}"]


def send(server: CogServer, case: Case, timeout: float) -> requests.Response:
    if case.body is not None:
        return requests.post(f"{server.url}/predictions", data=case.body, headers=case.headers, timeout=timeout)
    return server.predict(case.inputs, timeout=timeout)


def run_heavy_cancelled(server: CogServer, case: Case, log_marker: str = "Generating") -> requests.Response:
    """Start a heavy case as PUT /predictions/<id>, cancel it once the worker is generating, return the PUT's
    response (its status must be 'canceled')."""
    prediction_id = f"fuzz-heavy-{time.monotonic_ns()}"
    result: dict[str, requests.Response] = {}
    log_before = len(server.logs())

    def put() -> None:
        result["r"] = requests.put(
            f"{server.url}/predictions/{prediction_id}", json={"input": case.inputs}, timeout=900
        )

    thread = threading.Thread(target=put, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and thread.is_alive():
        if log_marker in server.logs()[log_before:]:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    if thread.is_alive():
        requests.post(f"{server.url}/predictions/{prediction_id}/cancel", timeout=10)
    thread.join(timeout=900)
    return result["r"]


def run_cases(
    server: CogServer,
    cases: list[Case],
    *,
    full: bool = False,
    timeout: float = 600,
    progress: Callable[[int, Outcome], None] | None = None,
) -> Report:
    report = Report(worker_pid_before=worker_pid(server))
    started = time.monotonic()
    for i, case in enumerate(cases):
        wait_ready(server)
        t = time.monotonic()
        if case.heavy and not full:
            response = run_heavy_cancelled(server, case)
        else:
            response = send(server, case, timeout)
            for _ in range(50):  # the slot is freed a moment after the previous response
                if response.status_code != 409:
                    break
                wait_ready(server)
                response = send(server, case, timeout)
        seconds = time.monotonic() - t
        kind, message, problems = judge(case, response)
        first_health = server.health()
        health, health_s = wait_ready(server)
        if health != "READY":
            problems.append(f"/health-check says {health} {health_s:.0f} s after the response")
        expected = case.expected(full)
        outcome = Outcome(
            case.name,
            response.status_code,
            kind,
            message,
            seconds,
            health,
            health_s,
            first_health,
            problems,
            expected=" | ".join(expected),
            as_expected=meets(expected, kind, message),
        )
        report.outcomes.append(outcome)
        if progress:
            progress(i, outcome)
        if server.process.poll() is not None:
            report.server_alive = False
            break
    report.seconds = time.monotonic() - started
    report.server_alive = report.server_alive and server.process.poll() is None
    try:
        report.worker_pid_after = worker_pid(server)
    except (RuntimeError, FileNotFoundError):
        report.worker_pid_after = -1
    return report
