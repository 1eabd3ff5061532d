"""What reusing the previous prediction's prompt embeddings saves: A1111-syntax prompts encoded by flashsd's
PromptEncoder with text encoders of the real sizes (random weights: the time does not depend on their values).

    python -m bench.prompt_cache                  # SDXL's CLIP-L + CLIP-bigG, and SD1.5's CLIP-L
    python -m bench.prompt_cache --repeats 20

It prints, per family, the median time of: the check a plain prompt pays (tokenising it, then the text goes to the
pipeline as before), encoding a weighted two-chunk prompt and a negative prompt, and the same call when both were
the previous prediction's (reused). On CUDA the encoders run in fp16, on a CPU in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from bench.common import synchronize
from flashsd.prompts import PromptEncoder
from testkit import tiny_repos

# The real text encoders' shapes: CLIP ViT-L/14's text model (SD1.5's text_encoder, SDXL's text_encoder) and
# OpenCLIP ViT-bigG/14's (SDXL's text_encoder_2), as in the config.json files of those repos' text encoders.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu")  # fmt: skip

# A prompt as pasted from CivitAI (weights, nesting, two chunks) and a default negative prompt.
PROMPT = (
    "(masterpiece:1.2), ((best quality)), a lighthouse at dawn on a rocky coast, (dramatic clouds:1.3), "
    "[lens flare], oil painting, highly detailed, warm light on the water, seagulls, (crashing waves:1.1), "
    "by a famous painter, golden hour, mist over the sea, long shadows, a small boat in the distance, "
    "intricate rocks, moss, wet stones, (cinematic lighting:1.15), volumetric light, sharp focus"
)
NEGATIVE = "(worst quality:1.4), (low quality:1.4), blurry, watermark, text, deformed"
PLAIN = "a lighthouse at dawn, oil painting, highly detailed"


def encoders(folder: Path, family: str, device: torch.device, dtype: torch.dtype) -> SimpleNamespace:
    parts = {}
    shapes = [("", CLIPTextModel, CLIP_L, None)]
    if family == "sdxl":
        shapes.append(("_2", CLIPTextModelWithProjection, CLIP_BIG_G, "!"))  # SDXL's second tokenizer pads with "!"
    for suffix, model_class, shape, pad in shapes:
        tiny_repos.write_clip_tokenizer(folder / f"tokenizer{suffix}", **({"pad_token": pad} if pad else {}))
        parts[f"tokenizer{suffix}"] = CLIPTokenizer.from_pretrained(folder / f"tokenizer{suffix}")
        tokenizer = parts[f"tokenizer{suffix}"]
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, **shape)  # fmt: skip
        parts[f"text_encoder{suffix}"] = model_class(config).to(device, dtype).eval()
    return SimpleNamespace(**parts)


def measure(family: str, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory(prefix="flashsd-prompt-cache-") as folder:
        prompts = PromptEncoder(encoders(Path(folder), family, device, dtype), family)

        def cold():
            prompts.forget()
            prompts.pipeline_arguments(PROMPT, NEGATIVE)

        def reused():
            prompts.pipeline_arguments(PROMPT, NEGATIVE)
            assert prompts.reused == 2

        def plain():
            assert prompts.pipeline_arguments(PLAIN, "") == {}

        times = _medians({"plain": plain, "encode": cold, "reused": reused}, repeats)
        chunks = prompts._encode("prompt", PROMPT).chunks
    return times | {"chunks": chunks}


def _medians(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds of each function, interleaved after one warm-up round. The CPU time of
    the whole process (all of torch's threads) is the steadier figure on a machine shared with other jobs."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize()
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
        for name, values in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", default="sdxl,sd", help="sdxl (CLIP-L + CLIP-bigG) and/or sd (CLIP-L)")
    args = parser.parse_args(argv)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"prompt embeddings, weighted {PROMPT.count('(')}-bracket prompt + negative prompt; {where}")
    for family in args.families.split(","):
        t = measure(family.strip(), args.repeats)
        ms = {
            name: f"{t[name][0] * 1000:.1f} ms (CPU {t[name][1] * 1000:.1f} ms)"
            for name in ("plain", "encode", "reused")
        }
        print(
            f"{family:5} prompt in {t['chunks']} chunks + negative prompt: encoded {ms['encode']}, reused {ms['reused']}, "
            f"saving {(t['encode'][0] - t['reused'][0]) * 1000:.0f} ms a prediction; a plain prompt's check {ms['plain']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
