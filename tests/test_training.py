"""Training (flashsd.training): it learns, it is reproducible, its LoRA is diffusers' own format, and what it trains on the
base model serves through flashsd's `lora_weights` exactly as diffusers' `load_lora_weights` serves it on the Flash
model card's pipeline.

Tiny random-weight models (tests/conftest.py), 64 px, a few dozen steps.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from flashsd.errors import Stopped
from flashsd.models import MODELS
from flashsd.request import build_request
from flashsd.runtime import Runtime
from flashsd.training import (
    LORA_FILE,
    RECORD_FILE,
    TrainingError,
    TrainingOptions,
    checked,
    load_training_set,
    run_training,
    train_lora,
)
from flashsd.training import loop as training_loop
from flashsd.training.export import save_lora
from testkit.lora_server import LoraServer
from testkit.training_sets import make_zip, png

CPU = torch.device("cpu")
PROGRESS = re.compile(r"^\s*(\d+)%\s*\|.+?\|\s*(\d+)/(\d+)")  # what Replicate's clients read (REFERENCE §3b)


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    """A memorisable set: two images, one captioned by its file, one by the trigger word."""
    folder = tmp_path_factory.mktemp("two-images")
    archive = make_zip(
        folder / "two.zip",
        {"a.png": png((96, 96), seed=1), "a.txt": b"a lighthouse at dawn", "b.png": png((96, 80), 2)},
    )
    return load_training_set(archive, folder, "TOK", 64).images


def train(tiny_weights, images, key, says=(), stop=None, **options):
    options = TrainingOptions(**({"resolution": 64, "seed": 1234, "lora_rank": 4} | options))
    return train_lora(MODELS[key], tiny_weights, images, options, CPU, says=says, stop=stop)


def mean(values) -> float:
    return sum(values) / len(values)


# -- it learns ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, margin", [("sd15", 0.15), ("sdxl", 0.07)])
def test_a_memorisable_set_drives_the_loss_down_by_a_stated_margin(tiny_weights, two_images, key, margin):
    """40 steps at learning rate 1e-2 against the same 40 steps with the LoRA left as initialised (learning rate 0):
    the same seed gives both runs the same image, noise and timestep at every step, so the losses pair up. The mean
    of the last 20 is at least `margin` lower (measured: 22% on SD1.5, 11% on SDXL, whose tiny UNet has attention
    only at its lowest resolution, as the real one has none in its first block)."""
    trained = train(tiny_weights, two_images, key, steps=40, learning_rate=1e-2, lora_rank=16)
    untrained = train(tiny_weights, two_images, key, steps=40, learning_rate=0.0, lora_rank=16)
    assert trained.losses[0] == untrained.losses[0]  # step 1 runs before any update: the pairing is real
    assert mean(trained.losses[-20:]) <= (1 - margin) * mean(untrained.losses[-20:])


# -- it is reproducible ------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_lora_bit_for_bit(tiny_weights, two_images, tmp_path):
    def lora_bytes(name, **options):
        lora = train(tiny_weights, two_images, "sdxl", steps=3, learning_rate=1e-3, train_text_encoder=True, **options)
        folder = tmp_path / name
        return save_lora(lora, StableDiffusionXLPipeline, folder).read_bytes()

    first = lora_bytes("first")
    torch.manual_seed(99)  # whatever state the process's global generator is in
    again = lora_bytes("again")
    other = lora_bytes("other", seed=1235)
    assert first == again
    assert first != other


# -- its format --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["sd15", "sdxl"])
def test_the_lora_file_is_what_diffusers_training_scripts_save(tiny_weights, two_images, tmp_path, key):
    """The reference: diffusers' train_dreambooth_lora_sdxl.py / train_text_to_image_lora.py recipe written out here
    (add_adapter with their LoraConfig, get_peft_model_state_dict, convert_state_dict_to_diffusers, save_lora_weights)
    on the same base model: the same keys, shapes, dtypes and metadata."""
    pipe_class = StableDiffusionXLPipeline if key == "sdxl" else StableDiffusionPipeline
    lora = train(tiny_weights, two_images, key, steps=1, lora_rank=8, train_text_encoder=True)
    ours = save_lora(lora, pipe_class, tmp_path / "ours")

    pipe = base_pipeline(key, tiny_weights)
    layers = {}
    pipe.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))  # fmt: skip
    layers["unet_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    for name in ("text_encoder", "text_encoder_2")[: 2 if key == "sdxl" else 1]:
        encoder = getattr(pipe, name)
        encoder.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))  # fmt: skip
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
    pipe_class.save_lora_weights(tmp_path / "reference", **layers)

    def described(path):
        with safe_open(path, "pt") as f:
            return f.metadata(), {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}

    reference = described(tmp_path / "reference" / "pytorch_lora_weights.safetensors")
    assert described(ours) == reference
    keys = reference[1]
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"} | (
        {"text_encoder_2"} if key == "sdxl" else set()
    )
    assert all(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys if k.startswith("unet."))


# -- it serves at Flash speed, as diffusers would ----------------------------------------------------------------


def base_pipeline(key: str, root: Path):
    """The base model as the model cards load it with plain diffusers (SDXL with the fp16-fix VAE)."""
    model = MODELS[key]
    base = root / model.base.id
    if key == "sdxl":
        vae = AutoencoderKL.from_pretrained(root / model.vae.id)
        return StableDiffusionXLPipeline.from_pretrained(base, vae=vae, variant="fp16", torch_dtype=torch.float32)
    return StableDiffusionPipeline.from_pretrained(
        base, variant="fp16", torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def card_pipeline(key: str, root: Path):
    """The Flash model card's pipeline with plain diffusers: the base, the Flash LoRA loaded and fused, LCMScheduler
    with trailing timesteps (4 steps, guidance 0 at the call)."""
    model = MODELS[key]
    base = root / model.base.id
    pipe = base_pipeline(key, root)
    pipe.scheduler = LCMScheduler.from_pretrained(base, subfolder="scheduler", timestep_spacing="trailing")
    pipe.load_lora_weights(root / model.adapter.id)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("key", ["sd15", "sdxl"])
def test_the_trained_lora_serves_through_lora_weights_as_diffusers_load_lora_weights_serves_it(
    tiny_weights, two_images, engines, tmp_path, key
):
    lora = train(tiny_weights, two_images, key, steps=10, learning_rate=1e-2, lora_rank=16, train_text_encoder=True)
    pipe_class = StableDiffusionXLPipeline if key == "sdxl" else StableDiffusionPipeline
    lora_file = save_lora(lora, pipe_class, tmp_path)
    prompt, seed = "a photo of TOK", 1234

    reference_pipe = card_pipeline(key, tiny_weights)
    reference_pipe.load_lora_weights(str(lora_file))  # diffusers' own loader, the trained file as saved
    reference = reference_pipe(
        prompt=prompt, width=64, height=64, num_inference_steps=4, guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]  # fmt: skip

    engine = engines(key)
    try:
        with LoraServer() as server:
            url = server.add("/lora.safetensors", lora_file.read_bytes())
            inputs = dict(
                prompt=prompt, aspect_ratio="custom", width=64, height=64, seed=seed, disable_safety_checker=True
            )
            (served,) = engine.generate(build_request(engine.model, lora_weights=url, **inputs))
            (plain,) = engine.generate(build_request(engine.model, **inputs))
    finally:
        engine.loras.apply(())  # the session engine goes back to the Flash model alone
    assert np.abs(pixels(served.image) - pixels(plain.image)).max() > 10  # the LoRA matters: the next check bites
    assert np.abs(pixels(served.image) - pixels(reference)).max() <= 1  # within 1/255


@pytest.mark.parametrize("dtype, scaling", [(torch.bfloat16, False), (torch.float16, True)])
def test_the_mixed_precision_path_of_a_gpu_trains_fp32_lora_weights(tiny_weights, two_images, dtype, scaling):
    """What a GPU runs (frozen weights in bf16, or fp16 with loss scaling; autocast; gradient checkpointing), run on
    the CPU: the LoRA weights stay fp32 and move, the losses are finite."""
    precision = training_loop.Precision(CPU, dtype, autocast=True, loss_scaling=scaling, gradient_checkpointing=True)
    lora = train_lora(MODELS["sdxl"], tiny_weights, two_images, TrainingOptions(
        steps=3, resolution=64, seed=1, lora_rank=4, learning_rate=1e-2, train_text_encoder=True,
    ), CPU, precision=precision)  # fmt: skip
    assert all(np.isfinite(lora.losses)) and lora.precision.name == f"{str(dtype).removeprefix('torch.')} mixed"
    for component in ("unet", "text_encoder", "text_encoder_2"):
        ups = [v for k, v in lora.layers[component].items() if ".up." in k]
        assert ups and all(v.dtype == torch.float32 for v in lora.layers[component].values())
        assert any(v.abs().max() > 0 for v in ups), component  # B starts at zero: it moved


# -- progress, cancel, memory ------------------------------------------------------------------------------------


def test_each_step_logs_a_progress_line_with_its_loss_that_replicate_reads(tiny_weights, two_images):
    lines = []
    lora = train(tiny_weights, two_images, "sd15", steps=5, says=[lambda level, msg, *args: lines.append(msg % args)])
    progress = [(line, PROGRESS.match(line)) for line in lines if PROGRESS.match(line)]
    assert [(int(m.group(2)), int(m.group(3))) for _, m in progress] == [(i, 5) for i in range(1, 6)]
    assert progress[-1][1].group(1) == "100"
    assert [float(re.search(r"loss=([\d.]+)", line).group(1)) for line, _ in progress] == pytest.approx(
        lora.losses, abs=1e-4
    )


def test_stop_ends_the_training_before_the_next_step(tiny_weights, two_images):
    progress = []

    def say(level, message, *args):
        if PROGRESS.match(message % args):
            progress.append(message % args)

    with pytest.raises(Stopped, match="training stopped after step 2 of 50"):
        train(tiny_weights, two_images, "sd15", steps=50, stop=lambda: len(progress) == 2, says=[say])
    assert len(progress) == 2


def test_out_of_memory_is_a_message_saying_what_to_lower(tiny_weights, two_images, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(training_loop.F, "mse_loss", out_of_memory)
    with pytest.raises(TrainingError, match="Out of memory training at resolution 64 with batch_size 2: lower"):
        train(tiny_weights, two_images, "sd15", steps=2, batch_size=2)


# -- options -----------------------------------------------------------------------------------------------------


def test_options_out_of_bounds_are_refused_naming_each():
    with pytest.raises(TrainingError) as error:
        checked(MODELS["sdxl"], TrainingOptions(steps=0, lora_rank=129, resolution=1000, batch_size=9, seed=-1,
                                                learning_rate=0.5, trigger_word=" "))  # fmt: skip
    message = str(error.value)
    for part in ("steps must be 1-10000 (it is 0)", "lora_rank must be 1-128 (it is 129)",
                 "resolution must be a multiple of 64 from 256 to 2048 (it is 1000; Flash SDXL's native size is 1024)",
                 "batch_size must be 1-8 (it is 9)", "seed must be 0-9007199254740991 (it is -1)",
                 "learning_rate must be 1e-06-0.01 (it is 0.5)", "trigger_word must not be empty"):  # fmt: skip
        assert part in message
    with pytest.raises(
        TrainingError, match="Flash PixArt has no LoRA training here; trainable base models: Flash SDXL"
    ):
        checked(MODELS["pixart"], TrainingOptions())


def test_defaults_are_the_models_native_size_and_a_recorded_random_seed():
    sd15 = checked(MODELS["sd15"], TrainingOptions(trigger_word=" sks "))
    assert (sd15.resolution, sd15.trigger_word, sd15.steps, sd15.lora_rank) == (512, "sks", 1000, 16)
    seeds = {checked(MODELS["sdxl"], TrainingOptions()).seed for _ in range(5)}
    assert len(seeds) > 1 and checked(MODELS["sdxl"], TrainingOptions()).resolution == 1024


# -- the whole run -----------------------------------------------------------------------------------------------


def training_folders() -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob("flashsd-training-work-*"))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's folder pointed at a fresh one, so what a training leaves there can be seen."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_run_writes_the_tar_and_removes_its_folder_whatever_the_outcome(tiny_weights, tmp_path, private_tmp):
    archive = make_zip(tmp_path / "set.zip", {"a.png": png((160, 160), 1), "a.txt": b"a lighthouse",
                                              "b.png": png((128, 200), 2), "notes.md": b"#"})  # fmt: skip
    model, runtime = MODELS["sd15"], Runtime(CPU, torch.float32)
    options = TrainingOptions(steps=2, lora_rank=4, resolution=256, seed=7, trigger_word="sks")
    tar_path = run_training(archive, options, model, tiny_weights, runtime, tmp_path / "out")
    assert tar_path == tmp_path / "out" / "trained_model.tar"
    assert training_folders() == []
    with tarfile.open(tar_path) as tar:
        assert tar.getnames() == [LORA_FILE, RECORD_FILE]
        record = json.load(tar.extractfile(RECORD_FILE))
        (tmp_path / "unpacked").mkdir()
        (tmp_path / "unpacked" / LORA_FILE).write_bytes(tar.extractfile(LORA_FILE).read())
    with safe_open(tmp_path / "unpacked" / LORA_FILE, "pt") as f:
        assert f.keys() and all(k.startswith("unet.") for k in f.keys())
    assert record["base_model"] == {
        "key": "sd15", "title": "Flash SD", "repo": model.base.id, "revision": model.base.revision, "vae": None,
        "lora_family": "SD1.5",
    }  # fmt: skip
    assert {k: record[k] for k in ("trigger_word", "steps", "lora_rank", "learning_rate", "seed", "resolution")} == {
        "trigger_word": "sks", "steps": 2, "lora_rank": 4, "learning_rate": 1e-4, "seed": 7, "resolution": 256,
    }  # fmt: skip
    assert record["data"]["images"] == 2 and record["data"]["captions_from_files"] == 1
    assert record["data"]["skipped"] == [{"name": "notes.md", "reason": record["data"]["skipped"][0]["reason"]}]
    assert len(record["data"]["sha256"]) == 64 and isinstance(record["final_loss"], float)

    with pytest.raises(TrainingError, match="the archive has no image file"):
        run_training(make_zip(tmp_path / "empty.zip", {}), options, model, tiny_weights, runtime, tmp_path / "out2")
    assert training_folders() == []
    with pytest.raises(Stopped):
        run_training(archive, options, model, tiny_weights, runtime, tmp_path / "out3", stop=lambda: True)
    assert training_folders() == []
    assert not (tmp_path / "out3").exists() or not any((tmp_path / "out3").iterdir())


def test_a_training_logs_its_inputs_and_figures(tiny_weights, two_images, caplog):
    with caplog.at_level(logging.INFO, logger="flashsd"):
        train(tiny_weights, two_images, "sd15", steps=2)
    assert "Training a rank-4 LoRA" in caplog.text and "on 2 image(s) for 2 steps at 64x64, batch 1" in caplog.text
    assert re.search(r"Trained 2 steps in [\d.]+ s \([\d.]+ steps/s\); final loss [\d.]+", caplog.text)
