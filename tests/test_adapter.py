"""The Flash adapter check: one parser for every key scheme the real files use, a check that cannot pass on a file
it found nothing in, damaged files of each real scheme named at setup, and PixArt's wrapper-only layers."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flashsd import adapter
from flashsd.adapter import AdapterError, check_fit, lora_layers
from flashsd.engine import Engine
from flashsd.errors import WeightsError
from flashsd.models import MODELS
from flashsd.runtime import Runtime
from flashsd.weights import repo_dir

CPU32 = Runtime(torch.device("cpu"), torch.float32)


def test_every_real_key_scheme_is_read_with_its_module_and_shapes():
    shapes = {
        # flash-sdxl / flash-sd: old diffusers keys, no alphas (REFERENCE §1b)
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": (64, 640),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": (640, 64),
        # flash-sd3 / flash-pixart: peft save_pretrained keys, incl. a Conv2d (pos_embed.proj: A is 64x16x2x2)
        "base_model.model.pos_embed.proj.lora_A.weight": (64, 16, 2, 2),
        "base_model.model.pos_embed.proj.lora_B.weight": (1536, 64, 1, 1),
        # diffusers' PEFT-era files, and the attention-processor era
        "transformer.norm_out.linear.lora_A.weight": (4, 1536),
        "transformer.norm_out.linear.lora_B.weight": (3072, 4),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight": (4, 1280),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight": (1280, 4),
        # kohya / A1111, with its alpha; a text-encoder layer
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": (8, 1280),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": (1280, 8),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": (),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (8, 768),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (3072, 8),
        "some.unrelated.tensor": (3,),
    }
    layers = lora_layers(shapes)
    found = {key: (layer.down, layer.up) for key, layer in layers.items()}
    assert found == {
        ("denoiser", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"): ((64, 640), (640, 64)),
        ("denoiser", "pos_embed.proj"): ((64, 16, 2, 2), (1536, 64, 1, 1)),
        ("denoiser", "norm_out.linear"): ((4, 1536), (3072, 4)),
        ("denoiser", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"): ((4, 1280), (1280, 4)),
        ("denoiser", "mid_block_attentions_0_proj_in"): ((8, 1280), (1280, 8)),
        ("text_encoder", "text_model_encoder_layers_0_mlp_fc1"): ((8, 768), (3072, 8)),
    }
    assert layers["denoiser", "mid_block_attentions_0_proj_in"].underscored


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(8, 6)
        self.proj = torch.nn.Conv2d(4, 6, 2)


def test_a_file_with_no_lora_layer_is_an_error_not_a_pass():
    with pytest.raises(AdapterError, match="holds no LoRA layer for the Tiny"):
        check_fit(lora_layers({"to_q.weight": (6, 8), "unet.to_q.alpha": ()}), Tiny())


def test_layers_that_fit_are_named_and_kohya_names_are_resolved():
    layers = lora_layers({
        "unet.to_q.lora.down.weight": (2, 8), "unet.to_q.lora.up.weight": (6, 2),
        "lora_unet_proj.lora_down.weight": (3, 4, 2, 2), "lora_unet_proj.lora_up.weight": (6, 3, 1, 1),
    })  # fmt: skip
    assert sorted(check_fit(layers, Tiny()).modules) == ["proj", "to_q"]


@pytest.mark.parametrize(
    "shapes, expected",
    [
        (
            {"unet.to_q.lora.down.weight": (2, 7), "unet.to_q.lora.up.weight": (6, 2)},
            r"down \[2, 7\] and up \[6, 2\] do not fit",
        ),
        (
            {"unet.to_q.lora.down.weight": (2, 8), "unet.to_q.lora.up.weight": (5, 2)},
            r"do not fit its weight of shape \[6, 8\]",
        ),
        ({"unet.to_q.lora.down.weight": (2, 8), "unet.to_q.lora.up.weight": (6, 3)}, r"do not fit"),  # ranks differ
        ({"unet.to_q.lora.down.weight": (2, 8)}, r"its up \(B\) half is missing"),
        ({"base_model.model.proj.lora_B.weight": (6, 3, 1, 1)}, r"its down \(A\) half is missing"),
        ({"unet.to_k.lora.down.weight": (2, 8), "unet.to_k.lora.up.weight": (6, 2)}, r"has no layer 'to_k'"),
    ],
    ids=["wrong-in", "wrong-out", "rank-mismatch", "no-up", "no-down", "no-such-layer"],
)
def test_a_layer_that_does_not_fit_is_named(shapes, expected):
    with pytest.raises(AdapterError, match=expected):
        check_fit(lora_layers(shapes), Tiny())


def test_known_foreign_layers_are_skipped_only_where_the_model_lacks_them():
    shapes = {"base_model.model.adaln.extra.lora_A.weight": (2, 8), "base_model.model.adaln.extra.lora_B.weight": (6, 2),
              "base_model.model.to_q.lora_A.weight": (2, 8), "base_model.model.to_q.lora_B.weight": (6, 2)}  # fmt: skip
    fit = check_fit(lora_layers(shapes), Tiny(), foreign={"adaln.extra", "to_q"})
    assert fit.modules == ("to_q",) and fit.foreign == ("adaln.extra",)
    with pytest.raises(AdapterError, match="has no layer 'adaln.extra'"):
        check_fit(lora_layers(shapes), Tiny())


# -- damaged real-format files fail setup, naming the layer and the fix ---------------------------------------------


def copy_model(src: Path, dst: Path, key: str) -> Path:
    for repo in MODELS[key].repos:
        shutil.copytree(repo_dir(src, repo), repo_dir(dst, repo), dirs_exist_ok=True)
    return dst


def adapter_path(root: Path, key: str) -> Path:
    return adapter.weights_file(MODELS[key], repo_dir(root, MODELS[key].adapter))


def rewrite(path: Path, change) -> None:
    tensors = load_file(path)
    with safe_open(path, framework="pt") as opened:  # keep the file's metadata ({"format": "pt"} for LoRA files)
        metadata = opened.metadata()
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def first_down_key(tensors: dict) -> str:
    """An attention layer's down half (not one of PixArt's wrapper-only layers, which are skipped anyway)."""
    return sorted(k for k in tensors if k.endswith(("lora_A.weight", "lora.down.weight")) and ".to_q." in k)[0]


def widen(tensors: dict) -> None:
    key = first_down_key(tensors)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1, *tensors[key].shape[2:])


def drop_up_half(tensors: dict) -> None:
    key = first_down_key(tensors)
    del tensors[key.replace("lora_A", "lora_B").replace("lora.down", "lora.up")]


@pytest.mark.parametrize("key", ["sdxl", "sd15", "sd3", "pixart"])
@pytest.mark.parametrize("damage, expected", [(widen, "do not fit its weight"), (drop_up_half, "half is missing")],
                         ids=["wrong-shape", "missing-half"])  # fmt: skip
def test_a_damaged_adapter_of_each_real_scheme_fails_setup_naming_the_layer(
    tiny_weights, tmp_path, key, damage, expected
):
    root = copy_model(tiny_weights, tmp_path, key)
    rewrite(adapter_path(root, key), damage)
    with pytest.raises(WeightsError) as caught:
        Engine.load(MODELS[key], root, CPU32)
    message = str(caught.value)
    assert f"The Flash adapter {adapter_path(root, key)} does not fit {MODELS[key].base.id}" in message
    assert expected in message and f"scripts/download-weights --model {key} --verify" in message


def test_pixart_wrapper_only_layers_are_skipped_with_one_log_line(tiny_weights, caplog):
    caplog.set_level(logging.INFO, logger="flashsd")
    Engine.load(MODELS["pixart"], tiny_weights, CPU32)
    lines = [r.getMessage() for r in caplog.records if "trainer's own" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("Flash adapter: 8 layer(s)"), lines
    assert "adaln_single.add_embedding.2.linear_2" in lines[0]


def zero_up_halves(tensors: dict) -> None:
    """Every layer's up half zeroed: the adapter attaches everywhere and changes nothing (a freshly initialised
    LoRA is such a file)."""
    for key in tensors:
        if key.endswith(("lora_B.weight", "lora.up.weight")):
            tensors[key] = torch.zeros_like(tensors[key])


@pytest.mark.parametrize("key", ["sd15", "sd3"])  # a LoRA file and a PEFT adapter
def test_the_merge_counts_the_weights_it_changed_and_an_adapter_that_changes_none_fails(
    tiny_weights, tmp_path, caplog, key
):
    caplog.set_level(logging.INFO, logger="flashsd")
    Engine.load(MODELS[key], tiny_weights, CPU32)
    layers = {m for (c, m), layer in adapter.read_lora_layers(adapter_path(tiny_weights, key)).items()}
    denoiser = MODELS[key].denoiser
    assert f"Flash adapter merged into {len(layers)} {denoiser} weights" in caplog.text  # one weight per LoRA layer
    root = copy_model(tiny_weights, tmp_path, key)
    rewrite(adapter_path(root, key), zero_up_halves)
    with pytest.raises(
        AdapterError, match=rf"of its {len(layers)} {denoiser} layers attached .* and 0 weights changed"
    ):
        Engine.load(MODELS[key], root, CPU32)
