"""Random weights at Stable Diffusion 1.5's real sizes (UNet 860 M, CLIP-L text encoder, SD VAE, a rank-64
Flash-style LoRA), in the real repo layout, so setup time and memory can be measured against a realistic
weights-on-disk figure without the hub (`python -m bench.run --weights sd15-size`; ~2 GB on disk, built once).

Everything but these three components and the LoRA comes from testkit/tiny_repos.py (tokenizer, scheduler,
model_index.json, the safety checker and any other file the model table lists), so the folder always
matches flashsd.models; it is rebuilt when the table lists files it lacks.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
LORA_RANK = 64
DONE = ".sd15-size-complete"


def default_root() -> Path:
    return Path(tempfile.gettempdir()) / "flashsd-bench-sd15-size"


def build(root: Path | None = None) -> Path:
    """Build (once) and return a weights root holding SD1.5-sized random weights for the `sd15` model."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel

    from flashsd.models import MODELS
    from flashsd.weights import missing_files, repo_dir
    from testkit import tiny_repos

    root = Path(root or default_root())
    model = MODELS["sd15"]
    if (root / DONE).is_file() and not missing_files(model, root):
        return root
    (root / DONE).unlink(missing_ok=True)
    if not missing_files(model, root):  # a full set from before: rebuilt below, on fresh tiny files
        for repo in model.repos:
            shutil.rmtree(repo_dir(root, repo), ignore_errors=True)
    tiny_repos.build_repo_files(root, "sd15")
    base, adapter = repo_dir(root, model.base), repo_dir(root, model.adapter)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), tiny_repos._quiet():
        torch.manual_seed(0)
        vocab, _ = tiny_repos.clip_vocab_and_merges()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
            pad_token_id=1,
        )).eval()  # fmt: skip
        text_encoder.half().save_pretrained(base / "text_encoder", variant="fp16", safe_serialization=True)
        del text_encoder
        vae = AutoencoderKL(**SD15_VAE).eval()
        vae.half().save_pretrained(base / "vae", variant="fp16", safe_serialization=True)
        del vae
        unet = UNet2DConditionModel(**SD15_UNET).eval()
        unet.half().save_pretrained(base / "unet", variant="fp16", safe_serialization=True)
        unet.float()
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=tiny_repos.UNET_LORA_TARGETS))  # fmt: skip
        tiny_repos._randomise_adapter(unet, 0, "sd15-size/lora")
        layers = {k: v.half().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
        StableDiffusionPipeline.save_lora_weights(adapter, unet_lora_layers=layers, safe_serialization=True)
    for repo in model.repos:  # exactly the listed files, as the downloader leaves them
        folder = repo_dir(root, repo)
        for path in folder.rglob("*"):
            if path.is_file() and path.relative_to(folder).as_posix() not in repo.files:
                path.unlink()
    (root / DONE).touch()
    return root


if __name__ == "__main__":
    print(build())
