"""What structure control costs (flashsd.control), measured as users run it (default thread counts, one process).

1. A prediction's pipeline call with no ControlNet, one (canny) and two (canny + depth), as the engine makes it
   (Engine.pipeline_of and pipeline_arguments: the ControlNet pipelines on the engine's own components), maps made
   beforehand; and the maps themselves (the card's canny, Depth Anything V2 Small's depth map). Tiny random-weight repos in the real layouts (built into a
   temporary folder) unless --weights names a root holding the model and its ControlNets.
2. --real-size KEY: one denoising step at the real sizes, random weights: the UNet of KEY and its ControlNets built
   from the real configs (testkit/real_configs), UNet alone vs UNet + 1 and + 2 ControlNets; and the real-size depth
   estimator at its 518 px input. In the runtime's dtype (fp16 on a GPU). SD1.5 fits a CPU; SDXL wants a GPU.

Medians of interleaved rounds (bench.common.medians); ratios are within one run.

    python -m bench.control                           # tiny sdxl at 256 px on this machine
    python -m bench.control --model sd15 --size 256 --repeats 7
    python -m bench.control --real-size sd15 --size 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import medians, ms, table


def sample_photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=2)
    pixels[height // 4 : height * 3 // 4, width // 5 : width // 2] = (220, 40, 40)
    pixels = pixels + rng.integers(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def pipeline_costs(key: str, root: Path | None, size: int, repeats: int) -> dict:
    from flashsd import control
    from flashsd.engine import Engine
    from flashsd.models import MODELS
    from flashsd.request import build_request
    from flashsd.runtime import select_runtime
    from flashsd.settings import Settings
    from testkit.tiny_repos import build_tiny_weights

    runtime = select_runtime("auto")
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="bench-control-"))
        build_tiny_weights(root, (key,))
    engine = Engine.load(MODELS[key], root, runtime, Settings(controlnets=control.CONTROL_TYPES))
    picture = sample_photo(size, size)

    def request(*kinds):
        slots = [control.ControlInputs(kind, picture) for kind in kinds]
        return build_request(
            engine.model, prompt="a lighthouse at dawn", seed=0, aspect_ratio="custom", width=size, height=size,
            disable_safety_checker=True, controls=slots, controlnets=control.CONTROL_TYPES,
        )  # fmt: skip

    def call(request):
        """The prediction's pipeline call alone, its maps made beforehand (what the engine's generate runs)."""
        pipe, arguments = engine.pipeline_of(request), engine.pipeline_arguments(request)
        return lambda: pipe(**arguments)

    canny, depth = request(control.CANNY), request(control.DEPTH)
    timings = medians(
        {
            "no ControlNet": call(request()),
            "1 ControlNet (canny)": call(canny),
            "2 ControlNets (canny + depth)": call(request(control.CANNY, control.DEPTH)),
            "canny map": lambda: engine.control_maps(canny),
            "depth map (Depth Anything V2 Small)": lambda: engine.control_maps(depth),
        },
        repeats,
    )
    return {"model": key, "weights": str(root), "size": size, "device": str(runtime.device), "seconds": timings}


def real_size_step(key: str, size: int, repeats: int) -> dict:
    """One denoising step at the real sizes: UNet alone, with 1 and with 2 ControlNets; and the depth estimator."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel, UNet2DConditionModel
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    from flashsd.runtime import select_runtime
    from testkit.real_size import real_config
    from testkit.tiny_repos import CONTROLNET_REAL_CONFIGS, REAL_CONFIGS

    runtime = select_runtime("auto")
    device, dtype = runtime.device, runtime.dtype

    def materialise(module):
        module = module.to_empty(device=device).to(dtype)
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in module.parameters():
                p.uniform_(-0.05, 0.05, generator=generator)
        return module.eval()

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(real_config(key))
        nets = [ControlNetModel.from_config(json.loads(CONTROLNET_REAL_CONFIGS[(key, "canny")].read_text()))]
        nets.append(ControlNetModel.from_config(json.loads(CONTROLNET_REAL_CONFIGS[(key, "depth")].read_text())))
        depth_model = DepthAnythingForDepthEstimation(
            DepthAnythingConfig.from_dict(json.loads((REAL_CONFIGS / "depth-anything/config.json").read_text()))
        )
    unet, nets, depth_model = materialise(unet), [materialise(n) for n in nets], materialise(depth_model)
    latents = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=dtype)
    cond = torch.randn(1, 3, size, size, device=device, dtype=dtype)
    t = torch.tensor([999], device=device)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype),
        }

    def step(count: int):
        def run():
            with torch.no_grad():
                down, mid = None, None
                for net in nets[:count]:
                    d, m = net(latents, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False, **extra)
                    down = d if down is None else [a + b for a, b in zip(down, d)]
                    mid = m if mid is None else mid + m
                unet(latents, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, **extra)  # fmt: skip

        return run

    pixels = torch.randn(1, 3, 518, 518, device=device, dtype=dtype)
    timings = medians(
        {
            "UNet step": step(0),
            "UNet + 1 ControlNet": step(1),
            "UNet + 2 ControlNets": step(2),
            "depth estimator (518 px)": lambda: depth_model(pixel_values=pixels),
        },
        repeats,
    )
    bytes_ = {
        "controlnet": sum(p.numel() * p.element_size() for p in nets[0].parameters()),
        "unet": sum(p.numel() * p.element_size() for p in unet.parameters()),
        "depth estimator": sum(p.numel() * p.element_size() for p in depth_model.parameters()),
    }
    return {"model": key, "size": size, "device": str(device), "dtype": str(dtype), "seconds": timings, "bytes": bytes_}


def report(result: dict) -> str:
    seconds = result["seconds"]
    first = next(iter(seconds.values()))
    rows = [(name, ms(s), f"{s / first:.2f}x") for name, s in seconds.items()]
    head = {k: v for k, v in result.items() if k not in ("seconds", "bytes", "weights")}
    lines = [json.dumps(head), table(rows, ("what", "median ms", "vs first row"))]
    if "bytes" in result:
        lines.append(", ".join(f"{k}: {v / 1e9:.2f} GB" for k, v in result["bytes"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.control", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdxl", choices=("sdxl", "sd15"))
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 256; real size 1024)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", type=Path, default=None, help="a weights root with the model and its ControlNets")
    parser.add_argument("--real-size", choices=("sdxl", "sd15"), default=None)
    args = parser.parse_args(argv)
    if args.real_size:
        print(report(real_size_step(args.real_size, args.size or 1024, args.repeats)))
    else:
        print(report(pipeline_costs(args.model, args.weights, args.size or 256, args.repeats)))


if __name__ == "__main__":
    main()
