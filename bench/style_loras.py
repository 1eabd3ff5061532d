"""What a style LoRA costs (flashsd.loras), in two parts:

1. Swapping, at the real denoisers' sizes on random weights: the UNet of SDXL and of SD1.5 built from their real
   configs (testkit/real_configs), and a kohya LoRA at rank 32 on every linear layer of their transformer blocks
   (kohya's default targets; SDXL with its SGM names), in the runtime's dtype. Timed, median of `repeats`: reading
   the file's header and checking the fit, reading the file into a state dict, diffusers' load_lora_weights (adapter
   layers attached; flashsd copies the originals of the weights they wrap), fuse_lora + unload_lora_weights, and the
   restore that puts the originals back. Only the UNet: the text encoders are left out (a UNet-only LoRA, as most
   SDXL LoRAs are).
2. A prediction with a cached LoRA against one without: two predictors on the same weights, one always with the
   same LoRA (fused once, then "already fused"), one without, called interleaved; the ratio of their medians.

    python -m bench.run --sections style_loras                        # SDXL / SD1.5 sizes; tiny --model weights
    python -m bench.run --sections style_loras --model sd15 --weights sd15-size   # the ratio at SD1.5 sizes
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import medians, ms, synchronize, table

RANK = 32
# kohya's networks/lora.py targets every Linear / 1x1 Conv2d inside a Transformer2DModel: these suffixes.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def real_unet(key: str, device: torch.device, dtype: torch.dtype):
    """The real `key` UNet's module tree (committed config) with random weights, built without initialising twice."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from testkit.real_size import real_config

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(real_config(key))
    unet = unet.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.uniform_(-0.05, 0.05, generator=generator)  # values do not matter for timing; denormals would
    return unet.eval()


def write_kohya_lora(path: Path, key: str, unet) -> tuple[int, int]:
    """A kohya-format LoRA (fp16, rank RANK, alpha RANK / 2) on TARGETS; returns (layers, bytes)."""
    from testkit.lora_files import _write_kohya, random_layers

    layers = random_layers(unet, TARGETS, 0, f"bench/{key}", RANK, RANK / 2)
    _write_kohya(path, key, {"unet": unet}, {"unet": layers}, RANK, RANK / 2)
    return len(layers), path.stat().st_size


def _pipeline(key: str, unet):
    """The model's pipeline class around the UNet alone (the LoRA has no text-encoder layers)."""
    import inspect

    import diffusers

    from flashsd.models import MODELS

    cls = getattr(diffusers, MODELS[key].pipeline)
    parameters = inspect.signature(cls.__init__).parameters
    others = {name: None for name in parameters if name not in ("self", "unet", "requires_safety_checker")}
    extra = {"requires_safety_checker": False} if "requires_safety_checker" in parameters else {}
    return cls(unet=unet, **others, **extra)


def swap_times(key: str, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    from flashsd import loras
    from flashsd.loras.cache import Loaded
    from flashsd.loras.header import read_header
    from flashsd.models import MODELS
    from flashsd.request import parse_lora_source
    from flashsd.settings import LoraSettings
    from testkit.lora_server import LoraServer

    started = time.perf_counter()
    unet = real_unet(key, device, dtype)
    build_s = time.perf_counter() - started
    pipe = _pipeline(key, unet)
    with tempfile.TemporaryDirectory(prefix="flashsd-bench-loras-") as tmp, LoraServer() as server:
        layers, size = write_kohya_lora(Path(tmp) / "style.safetensors", key, unet)
        url = server.add("/style.safetensors", (Path(tmp) / "style.safetensors").read_bytes())
        settings = LoraSettings(cache_bytes=10**11, max_file_bytes=10**11, memory_bytes=1, timeout_s=60)
        manager = loras.StyleLoras(MODELS[key], pipe, Path(tmp) / "root", settings)  # memory cache off: disk reads
        lora = loras.StyleLora("lora_weights", parse_lora_source(url, "lora_weights"), 1.0)
        manager.apply([lora])  # downloaded into the disk cache once; the originals copied, once
        first_originals = manager.timings["originals"]
        manager.restore()
        samples: dict[str, list[float]] = {}
        cached = manager.disk.lookup(lora.source)
        from safetensors.torch import load_file

        for _ in range(repeats):
            gc.collect()
            t = time.perf_counter()
            header = read_header(cached.path, "lora_weights", "style")
            manager.check(lora, Loaded(cached.path, header, "style", "", size))
            samples.setdefault("check", []).append(time.perf_counter() - t)
            t = time.perf_counter()
            load_file(cached.path, device="cpu")
            samples.setdefault("read", []).append(time.perf_counter() - t)
            t = time.perf_counter()
            manager.apply([lora])  # read, check, load, originals kept, fuse, unload (each timed by StyleLoras)
            synchronize()
            samples.setdefault("apply", []).append(time.perf_counter() - t)
            kept = manager.originals_bytes
            restored = manager.restore()
            for name, seconds in manager.timings.items():
                samples.setdefault(name, []).append(seconds)
    parameters = sum(p.numel() for p in unet.parameters())
    del pipe, unet, manager
    gc.collect()
    return {
        "unet": f"{parameters / 1e6:.0f} M parameters ({str(dtype).removeprefix('torch.')}, {device.type})",
        "lora": f"kohya, rank {RANK}, {layers} layers, {size / 1e6:.1f} MB (fp16)",
        "weights_restored": restored, "originals_kept_gb": round(kept / 1e9, 2), "build_s": round(build_s, 1),
        "first_originals_ms": ms(first_originals),
        "ms": {name: ms(statistics.median(values)) for name, values in samples.items()},
    }  # fmt: skip


def cached_lora_ratio(model, root: Path, size: int, repeats: int) -> dict:
    """Two predictors on the same weights, interleaved: one with the same LoRA every time, one without."""
    from bench.pipeline import load_predictor
    from testkit.lora_files import write_lora
    from testkit.lora_server import LoraServer
    from testkit.predictors import predictor_inputs

    plain, _ = load_predictor(model, root)
    styled, _ = load_predictor(model, root)
    with tempfile.TemporaryDirectory(prefix="flashsd-bench-loras-") as tmp, LoraServer() as server:
        path = write_lora(
            Path(tmp) / "style.safetensors", root, model.key, "kohya" if model.key != "sd3" else "diffusers"
        )
        url = server.add("/style.safetensors", path.read_bytes())
        common = dict(prompt="a lighthouse at dawn", aspect_ratio="custom", width=size, height=size, seed=1234,
                      output_format="webp", output_quality=80)  # fmt: skip
        without = predictor_inputs(type(plain), **common)
        with_lora = predictor_inputs(type(styled), **common, lora_weights=url, lora_scale=0.8)

        def predict(predictor, inputs):  # predict() is a coroutine (concurrent predictions): run it to its end
            return asyncio.run(predictor.predict(**inputs))

        predict(styled, with_lora)  # downloaded, loaded and fused once: what follows is the cached case
        times = medians({"without": lambda: predict(plain, without), "cached": lambda: predict(styled, with_lora)},
                        repeats)  # fmt: skip
        # What a cached LoRA adds to a prediction, alone: the check that it is the one already fused.
        from flashsd.request import build_request

        request = build_request(model, prompt="x", lora_weights=url, lora_scale=0.8)
        check = medians({"check": lambda: styled.engine.apply_loras(request)}, 200, warmup=5)["check"]
    return {
        "size": f"{size}x{size}", "without_ms": ms(times["without"]), "cached_lora_ms": ms(times["cached"]),
        "ratio": round(times["cached"] / times["without"], 3), "cached_check_us": round(check * 1e6, 1),
    }  # fmt: skip


def run(model, root: Path, device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> dict:
    result = {"swap": {}}
    for key in ("sd15", "sdxl"):
        result["swap"][key] = swap_times(key, device, dtype, max(3, repeats // 2))
    result["prediction"] = cached_lora_ratio(model, root, size, max(15, 3 * repeats))
    result["prediction"]["model"] = model.key
    return result


def report(result: dict) -> str:
    rows = []
    for key, r in result["swap"].items():
        t = r["ms"]
        rows.append((key, r["lora"], t["check"], t["read"], t["load"], f"{r['first_originals_ms']} ({t['originals']})",
                     t["fuse"], t["unload"],
                     t["apply"], t["restore"], f"{r['weights_restored']} ({r['originals_kept_gb']} GB)"))  # fmt: skip
    p = result["prediction"]
    return "\n".join([
        "Style LoRAs: swapping at real UNet sizes on random weights (ms, medians)",
        table(rows, ("UNet", "LoRA", "header + fit check", "read file", "diffusers load",
                     "copy originals: first LoRA (later)", "fuse",
                     "unload", "apply (all of it)", "restore", "weights restored (copies kept)")),
        f"cached-LoRA / no-LoRA prediction ({p['model']}, {p['size']}): {p['cached_lora_ms']} / {p['without_ms']} ms "
        f"= {p['ratio']} (target <= 1.02); the cached LoRA's own cost per prediction: {p['cached_check_us']} µs",
    ])  # fmt: skip
