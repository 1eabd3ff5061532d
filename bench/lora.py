"""What a LoRA costs at inference: denoiser forward time of the base model, of the model with the LoRA
fused and unloaded (what flashsd runs), and with the LoRA attached but unfused (what it must never run).

The model is a random-weight UNet2DConditionModel big enough that compute dominates the forward (an
SD1.5-shaped UNet on a GPU; a narrower one on a CPU, so the section stays within seconds), with a random
rank-64 LoRA on the same layers the Flash LoRAs cover.
"""

from __future__ import annotations

import copy
import math

import torch

from bench.common import medians, ms, table

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "conv1", "conv2", "time_emb_proj"]  # fmt: skip
RANK = 64

GPU_UNET = dict(  # Stable Diffusion 1.5's UNet (860 M parameters)
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip
CPU_UNET = dict(
    block_out_channels=(96, 192, 384), layers_per_block=1, cross_attention_dim=384, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip


def _randomise(model: torch.nn.Module) -> int:
    """Non-zero B matrices (a fresh LoRA is a no-op), scaled to change each weight by ~10 %."""
    from peft.tuners.lora import LoraLayer

    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    a, b = module.lora_A[name].weight, module.lora_B[name].weight
                    a.normal_(0.0, 1.0 / math.sqrt(a[0].numel()))
                    b.normal_(0.0, 1.0)
                    b.mul_(0.1 * module.get_base_layer().weight.norm() / module.get_delta_weight(name).norm())
                    count += 1
    return count


def build(device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    torch.manual_seed(0)
    config = GPU_UNET if device.type == "cuda" else CPU_UNET
    base = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, **config).eval()
    unfused = copy.deepcopy(base)
    unfused.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    layers = _randomise(unfused)
    fused = copy.deepcopy(unfused)
    fused.fuse_lora(lora_scale=1.0)
    fused.unload_lora()
    assert not any(isinstance(m, BaseTunerLayer) for m in fused.modules())
    models = {"base": base, "fused": fused, "unfused": unfused}
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []"
    try:
        for model in models.values():
            model.to(device=device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    return models, layers, config


def run(device: torch.device, dtype: torch.dtype, repeats: int = 7) -> dict:
    models, layers, config = build(device, dtype)
    latent = 64 if device.type == "cuda" else 32  # 512² and 256² images
    generator = torch.Generator("cpu").manual_seed(1)
    sample = torch.randn(1, 4, latent, latent, generator=generator).to(device, dtype)
    context = torch.randn(1, 77, config["cross_attention_dim"], generator=generator).to(device, dtype)
    timestep = torch.tensor([999], device=device)

    def forward(model):
        with torch.inference_mode():
            return model(sample, timestep, encoder_hidden_states=context).sample

    with torch.inference_mode():
        outputs = {name: forward(m).float() for name, m in models.items()}
    times = medians({name: (lambda m=m: forward(m)) for name, m in models.items()}, repeats)
    parameters = sum(p.numel() for p in models["base"].parameters())
    return {
        "unet": f"{parameters / 1e6:.0f} M parameters, {config['block_out_channels']}",
        "input": f"1x4x{latent}x{latent} latents ({latent * 8}² image), {str(dtype).removeprefix('torch.')}",
        "lora": f"rank {RANK} on {layers} layers",
        "ms": {name: ms(t) for name, t in times.items()},
        "fused_over_base": round(times["fused"] / times["base"], 3),
        "unfused_over_base": round(times["unfused"] / times["base"], 3),
        "fused_vs_unfused_max_abs_diff": float((outputs["fused"] - outputs["unfused"]).abs().max()),
    }


def report(result: dict) -> str:
    rows = [(name, value) for name, value in result["ms"].items()]
    return "\n".join([
        f"LoRA cost ({result['unet']}; {result['input']}; {result['lora']})",
        table(rows, ("denoiser", "ms/forward")),
        f"fused / base {result['fused_over_base']} (target <= 1.02), unfused / base {result['unfused_over_base']}; "
        f"fused vs unfused output max |diff| {result['fused_vs_unfused_max_abs_diff']:.2e}",
    ])  # fmt: skip
