"""testkit/tiny_repos.py: the tiny repos have the real layout and load and run with plain diffusers / peft."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from diffusers import (
    LCMScheduler,
    PixArtTransformer2DModel,
)
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from transformers import CLIPTokenizer, T5Tokenizer

from flashsd.control import FAMILIES
from flashsd.models import MODELS
from testkit.real_size import file_layers
from testkit.recipes import base_pipeline
from testkit.tiny_repos import build_repo_files, build_tiny_weights, control_repo_files, files_under, listed_for

KEYS = list(MODELS)
PROMPT = "A lighthouse at dawn, Zebra-crossing 3pm! 東京の夜景 émigré 🚀"  # words outside the corpus, non-Latin


def base_dir(root, key):
    return root / MODELS[key].base.id


def generate(pipe, key, width=64, height=64, seed=0):
    extra = {"use_resolution_binning": False, "clean_caption": False} if key == "pixart" else {}
    return pipe(
        prompt=PROMPT, width=width, height=height, num_inference_steps=2, guidance_scale=0.0, output_type="np",
        generator=torch.Generator("cpu").manual_seed(seed), **extra,
    ).images[0]  # fmt: skip


def denoiser(pipe, key):
    return getattr(pipe, MODELS[key].denoiser)


@pytest.mark.parametrize("key", KEYS)
def test_each_repo_holds_exactly_the_files_the_product_downloads(tiny_weights, key):
    for repo in MODELS[key].repos:
        # A folder may be shared by several models' rows (the safety checker lives in SD1.5's repo).
        assert files_under(tiny_weights / repo.id) == listed_for(repo.id) >= set(repo.files), repo.id


def test_a_model_built_alone_has_exactly_its_own_files(tmp_path):
    build_repo_files(tmp_path, "sdxl")
    assert files_under(tmp_path) == {f"{repo.id}/{name}" for repo in MODELS["sdxl"].repos for name in repo.files}
    checker = MODELS["sdxl"].safety_checker
    assert set(files_under(tmp_path / checker.id)) == set(checker.files)


def repo_files(root) -> set[str]:
    """The files under `root` but the product's own caches, which live in dot-folders of the weights root
    (`.loras/`, `.torch-compile-cache/`) and fill as other tests run on the shared tiny weights."""
    return {name for name in files_under(root) if not name.startswith(".")}


def test_the_weights_root_holds_nothing_but_the_repos(tiny_weights):
    expected = {f"{repo.id}/{name}" for model in MODELS.values() for repo in model.repos for name in repo.files}
    expected |= {name for key in FAMILIES for name in control_repo_files(key)}  # every ControlNet, both families
    assert repo_files(tiny_weights) == expected


@pytest.mark.parametrize("key", KEYS)
def test_weight_files_are_stored_in_the_real_repos_precision(tiny_weights, key):
    model = MODELS[key]
    for repo in model.repos:
        for name in repo.files:
            if not name.endswith(".safetensors"):
                continue
            with safe_open(tiny_weights / repo.id / name, framework="pt") as f:
                dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
            # fp16 variants are fp16; SD3's plain files are fp16 too; the VAE fix, PixArt and adapters fp32.
            half = name.endswith(".fp16.safetensors") or repo is model.base and key == "sd3"
            assert dtypes == ({"F16"} if half else {"F32"}), f"{repo.id}/{name}: {dtypes}"


@pytest.mark.parametrize("key", KEYS)
def test_tokenizers_load_from_their_files_and_tokenise_any_prompt(tiny_weights, key):
    pipe = base_pipeline(key, tiny_weights)
    base = base_dir(tiny_weights, key)
    if key == "pixart":
        tokenizer = T5Tokenizer.from_pretrained(base / "tokenizer")
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
        ids = tokenizer(PROMPT, padding="max_length", max_length=120, truncation=True).input_ids
        assert len(ids) == 120 and ids[0] != tokenizer.unk_token_id and max(ids) < pipe.text_encoder.config.vocab_size
        assert len(tokenizer) == pipe.text_encoder.config.vocab_size
        return
    pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    for tokenizer_name, encoder_name in pairs:
        if not (base / tokenizer_name).exists():
            continue
        tokenizer = CLIPTokenizer.from_pretrained(base / tokenizer_name)
        encoder = getattr(pipe, encoder_name)
        assert tokenizer.model_max_length == 77 == encoder.config.max_position_embeddings
        assert len(tokenizer) == encoder.config.vocab_size
        ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and max(ids) == tokenizer.eos_token_id
        # CLIP pools at the highest id (eos_token_id 2 in the real configs): <|endoftext|>.
        assert tokenizer.eos_token_id == len(tokenizer) - 1
        assert tokenizer.pad_token == ("!" if tokenizer_name == "tokenizer_2" else "<|endoftext|>")
        assert ids[-1] == tokenizer.pad_token_id
        long = tokenizer("word " * 200, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(long) == 77


@pytest.mark.parametrize("key", KEYS)
def test_the_base_pipeline_loads_and_generates_finite_images(tiny_weights, key):
    pipe = base_pipeline(key, tiny_weights)
    assert pipe.vae_scale_factor == 8
    if key == "sdxl":
        assert pipe.vae.config.force_upcast is False
    if key == "pixart":
        assert isinstance(pipe.transformer, PixArtTransformer2DModel)  # remapped from Transformer2DModel
        assert pipe.transformer.use_additional_conditions  # as the real 1024 px model
    for width, height in [(64, 64), (128, 96)]:
        image = generate(pipe, key, width, height)
        assert image.shape == (height, width, 3)
        assert np.isfinite(image).all()
        assert image.std() > 0.02  # not a flat image


@pytest.mark.parametrize("key", KEYS)
def test_the_model_cards_scheduler_loads_from_the_base_repo(tiny_weights, key):
    base = base_dir(tiny_weights, key)
    config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    if key == "sd3":
        assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler" and config["shift"] == 3.0
        return
    scheduler = LCMScheduler.from_pretrained(base, subfolder="scheduler", timestep_spacing="trailing")
    assert scheduler.config.clip_sample is False
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]


def _lora_layers(module) -> int:
    return sum(1 for m in module.modules() if isinstance(m, BaseTunerLayer))


@pytest.mark.parametrize("key", KEYS)
def test_the_adapter_changes_the_denoiser_and_the_image(tiny_weights, key):
    model = MODELS[key]
    pipe = base_pipeline(key, tiny_weights)
    before = {k: v.clone() for k, v in denoiser(pipe, key).state_dict().items()}
    plain = generate(pipe, key)
    adapter = tiny_weights / model.adapter.id
    weights_file = adapter / next(f for f in model.adapter.files if f.endswith(".safetensors"))
    held = file_layers(weights_file)  # either key scheme
    foreign = set(model.adapter_foreign_layers)
    if model.adapter_format == "lora":
        pipe.load_lora_weights(adapter)
        assert _lora_layers(pipe.unet) == len(held) > 0  # every layer of the file landed in the UNet
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    else:
        with_adapter = PeftModel.from_pretrained(pipe.transformer, adapter)
        # peft adds layers by the config's target names, not by what the file holds: count the file's that landed
        landed = {
            n.removeprefix("base_model.model.")
            for n, m in with_adapter.named_modules()
            if isinstance(m, BaseTunerLayer)
        } & held
        assert landed == held - foreign and landed
        pipe.register_modules(transformer=with_adapter.merge_and_unload())
    after = denoiser(pipe, key).state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(held - foreign)
    assert all(torch.isfinite(v).all() for v in after.values())
    flashed = generate(pipe, key)
    assert np.isfinite(flashed).all()
    assert np.abs(flashed - plain).max() > 10 / 255  # a visible change


def _snapshot(root):
    return {
        name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for name in sorted(repo_files(root))
        for p in [root / name]
    }


def test_building_again_is_a_no_op_and_the_same_seed_gives_the_same_bytes(tiny_weights, tmp_path):
    first = _snapshot(tiny_weights)
    assert build_tiny_weights(tiny_weights) == tiny_weights
    assert _snapshot(tiny_weights) == first  # nothing rewritten

    again = build_tiny_weights(tmp_path / "again")
    assert {k: h for k, (_, h) in _snapshot(again).items()} == {k: h for k, (_, h) in first.items()}

    # A damaged repo (a file missing, a stray one) is rebuilt whole, to the same bytes.
    sdxl = MODELS["sdxl"]
    (again / sdxl.base.id / "unet" / "config.json").unlink()
    (again / sdxl.adapter.id / "README.md").write_text("stray")
    build_repo_files(again, "sdxl")
    assert {k: h for k, (_, h) in _snapshot(again).items()} == {k: h for k, (_, h) in first.items()}


def test_another_seed_gives_other_weights(tmp_path):
    build_repo_files(tmp_path, "sd15", seed=1)
    build_repo_files(tmp_path / "other", "sd15", seed=2)
    name = f"{MODELS['sd15'].base.id}/unet/diffusion_pytorch_model.fp16.safetensors"
    assert (tmp_path / name).read_bytes() != (tmp_path / "other" / name).read_bytes()
