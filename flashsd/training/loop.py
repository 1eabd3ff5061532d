"""The training loop: a LoRA on the base model's UNet (and, as an option, its text encoders), trained with the base
model's own objective as diffusers' LoRA scripts define it.

Sources (huggingface/diffusers, examples/text_to_image/train_text_to_image_lora_sdxl.py and train_text_to_image_lora.py,
examples/dreambooth/train_dreambooth_lora_sdxl.py), followed step for step:
- LoRA: peft `LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian")` on the UNet's attention projections
  `to_k, to_q, to_v, to_out.0`, and on the text encoders' `q_proj, k_proj, v_proj, out_proj` when they are trained;
- the noise scheduler: `DDPMScheduler.from_pretrained(base, subfolder="scheduler")`; each step draws Gaussian noise,
  a timestep uniformly in [0, num_train_timesteps) per image, noises the latents with `add_noise`, and takes the MSE
  (in fp32) between the UNet's output and the target of the scheduler's prediction type (`epsilon`: the noise;
  `v_prediction`: `get_velocity`);
- SDXL's micro-conditioning: `add_time_ids` = original size (h, w) + crop top-left (y, x) + target size, with the
  pooled embedding of the second text encoder; prompt embeddings are the penultimate hidden states of both encoders;
- images resized to the resolution on their shorter side and centre-cropped; the VAE's latent distribution cached
  once per image and sampled each step (the dreambooth script's `--cache_latents`); prompt embeddings cached per
  caption unless the text encoders are trained;
- AdamW (betas 0.9/0.999, weight decay 1e-2, eps 1e-8), constant learning rate, gradients clipped to norm 1.
- Precision: fp32 on the CPU. On a GPU, the frozen weights in bf16 (fp16 with loss scaling where bf16 is not
  supported), the LoRA weights in fp32 (`cast_training_params`), the forward pass under autocast, and gradient
  checkpointing.

Same seed, same data, same options: the same LoRA bit for bit on the CPU (the LoRA's initial values, the order of the
images, the noise and the timesteps all come from the seed).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import Stopped
from ..logs import Say
from ..models import FlashModel
from ..recovery import free_memory, is_out_of_memory
from ..weights import repo_dir, weights_problems
from .data import TrainingImage, open_image
from .options import TrainingError, TrainingOptions

log = logging.getLogger("flashsd")

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAMW = dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
MAX_GRAD_NORM = 1.0
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

Stop = Callable[[], bool] | None


@dataclass(frozen=True)
class Precision:
    """How the training computes on a device."""

    device: torch.device
    weight_dtype: torch.dtype  # the frozen weights
    autocast: bool  # forward passes under torch.autocast(weight_dtype)
    loss_scaling: bool  # fp16: a GradScaler
    gradient_checkpointing: bool

    @property
    def name(self) -> str:
        return (
            "fp32" if self.weight_dtype == torch.float32 else f"{str(self.weight_dtype).removeprefix('torch.')} mixed"
        )


def precision_for(device: torch.device) -> Precision:
    if device.type != "cuda":
        return Precision(device, torch.float32, autocast=False, loss_scaling=False, gradient_checkpointing=False)
    bf16 = torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float16
    return Precision(device, dtype, autocast=True, loss_scaling=not bf16, gradient_checkpointing=True)


@dataclass
class TrainedLora:
    """What a training made: the LoRA layers of each component in diffusers' format (CPU, fp32), and its figures."""

    layers: dict[str, dict[str, torch.Tensor]]  # "unet", "text_encoder", "text_encoder_2" -> state dict
    losses: list[float]
    seconds: float  # the optimisation steps alone
    precision: Precision
    peak_gpu_bytes: int | None = None
    parameters: int = 0  # trainable LoRA parameters

    @property
    def final_loss(self) -> float:
        """The mean loss of the last tenth of the steps (1 to 100 of them): one step's loss depends on its random
        timestep more than on the LoRA."""
        window = min(100, max(1, len(self.losses) // 10))
        return sum(self.losses[-window:]) / window


# -- the base model ----------------------------------------------------------------------------------------------


class BaseModel:
    """The base model's components (no Flash adapter: LoRAs are trained on the base, and the Flash adapter runs them
    at 4 steps when serving), loaded from the weights layout."""

    def __init__(self, model: FlashModel, root: Path, precision: Precision):
        import diffusers

        self.model, self.precision = model, precision
        base = repo_dir(root, model.base)
        common = dict(dtype=precision.weight_dtype, local_files_only=True, use_safetensors=True)
        components: dict = {name: None for name in model.absent_components}
        with weights_problems(model, root), _no_progress_bars():
            if model.vae is not None:
                components["vae"] = diffusers.AutoencoderKL.from_pretrained(repo_dir(root, model.vae), **common)
            if "safety_checker" in model.absent_components:
                components["requires_safety_checker"] = False
            pipe = getattr(diffusers, model.pipeline).from_pretrained(
                base, variant=model.variant, **common, **components
            )
            self.noise_scheduler = diffusers.DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        self.pipeline_class = type(pipe)
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.text_encoders = [pipe.components[n] for n in TEXT_ENCODERS if pipe.components.get(n) is not None]
        self.tokenizers = [pipe.components[n] for n in ("tokenizer", "tokenizer_2") if pipe.components.get(n)]
        self.sdxl = len(self.text_encoders) == 2  # SDXL's two encoders, pooled embedding and time ids
        for module in (self.unet, self.vae, *self.text_encoders):
            module.requires_grad_(False)
            module.to(precision.device)

    def component_names(self) -> list[str]:
        return ["unet", *TEXT_ENCODERS[: len(self.text_encoders)]]

    def tokenize(self, captions: Sequence[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer, padded and truncated to the tokenizer's length (the scripts' tokenize_prompt)."""
        return [
            tokenizer(
                list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
            for tokenizer in self.tokenizers
        ]  # fmt: skip

    def encode_prompts(self, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, pooled embedding or None) as the pipelines compute them: SDXL the penultimate hidden
        states of both encoders concatenated and the second one's pooled output; SD1.5 the last hidden state."""
        device = self.precision.device
        if not self.sdxl:
            return self.text_encoders[0](ids[0].to(device))[0], None
        states, pooled = [], None
        for encoder, token_ids in zip(self.text_encoders, ids):
            output = encoder(token_ids.to(device), output_hidden_states=True)
            pooled = output[0]  # the final encoder's projected pooled output
            states.append(output.hidden_states[-2])
        return torch.cat(states, dim=-1), pooled


# -- the training ------------------------------------------------------------------------------------------------


@dataclass
class _Example:
    latent_mean: torch.Tensor  # CPU, fp32
    latent_std: torch.Tensor
    caption: str
    time_ids: tuple[int, ...]  # SDXL: original (h, w), crop top-left (y, x), target (h, w)


def crop_to_square(image: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """Resized so its shorter side is `resolution` (torchvision's Resize(int)), then centre-cropped (CenterCrop);
    returns it with the crop's top-left (y, x) in the resized image, as the SDXL script computes it."""
    width, height = image.size
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    resized = image.resize(size, Image.Resampling.LANCZOS)
    top = max(0, int(round((size[1] - resolution) / 2.0)))
    left = max(0, int(round((size[0] - resolution) / 2.0)))
    return resized.crop((left, top, left + resolution, top + resolution)), (top, left)


def _pixels(image: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize([0.5], [0.5]): (3, H, W) in [-1, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
    return data.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def _batches(count: int, size: int, rng: random.Random) -> Iterator[list[int]]:
    """Indices of `size` examples per step: the examples shuffled, epoch after epoch."""
    order: list[int] = []
    while True:
        while len(order) < size:
            epoch = list(range(count))
            rng.shuffle(epoch)
            order += epoch
        yield order[:size]
        order = order[size:]


def _check_stop(stop: Stop, done: int, total: int) -> None:
    if stop is not None and stop():
        raise Stopped(f"training stopped after step {done} of {total}")


def train_lora(
    model: FlashModel,
    root: Path,
    images: Sequence[TrainingImage],
    options: TrainingOptions,
    device: torch.device,
    *,
    stop: Stop = None,
    says: Sequence[Say] = (),
    precision: Precision | None = None,
) -> TrainedLora:
    """Train a LoRA on `images` (options already checked: resolution and seed set). One tqdm-format progress line per
    step, with the loss, through `says` (default: the flashsd logger); `stop()` true before a step ends the training
    with Stopped. Out of memory is a TrainingError saying what to lower. `precision`: default, the device's
    (precision_for)."""
    precision = precision or precision_for(device)
    say_all = list(says) or [log.log]

    def say(level: int, message: str, *args) -> None:
        for s in say_all:
            s(level, message, *args)

    try:
        return _train(model, root, images, options, precision, stop, say)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        free_memory()
        memory = "GPU memory" if precision.device.type == "cuda" else "memory"
        raise TrainingError(
            f"Out of {memory} training at resolution {options.resolution} with batch_size {options.batch_size}"
            f"{' and the text encoders' if options.train_text_encoder else ''}: lower batch_size or resolution"
            f"{' or leave train_text_encoder off' if options.train_text_encoder else ''}, then try again."
        ) from None


def _encode_images(base: BaseModel, images, resolution: int, stop: Stop, steps: int) -> list[_Example]:
    """Each image's latent distribution (the VAE once per image) and SDXL time ids."""
    precision, examples = base.precision, []
    for image in images:
        with open_image(image) as decoded:
            original = (decoded.height, decoded.width)
            square, (top, left) = crop_to_square(decoded, resolution)
        with torch.no_grad(), _autocast(precision):
            pixels = _pixels(square).unsqueeze(0).to(precision.device, precision.weight_dtype)
            latent = base.vae.encode(pixels).latent_dist
        examples.append(_Example(
            latent.mean[0].float().cpu(), latent.std[0].float().cpu(), image.caption,
            (*original, top, left, resolution, resolution),
        ))  # fmt: skip
        _check_stop(stop, 0, steps)
    base.vae.to("cpu")  # not needed on the device any more
    return examples


def _encode_captions(base: BaseModel, token_ids: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Each caption's prompt embeddings (and SDXL's pooled one), when the text encoders are not trained."""
    precision, cached = base.precision, {}
    with torch.no_grad(), _autocast(precision):
        for caption, ids in token_ids.items():
            embeds, pooled = base.encode_prompts([i.unsqueeze(0) for i in ids])
            cached[caption] = (embeds[0].to("cpu", precision.weight_dtype),
                               None if pooled is None else pooled[0].to("cpu", precision.weight_dtype))  # fmt: skip
    for encoder in base.text_encoders:
        encoder.to("cpu")
    return cached


def _add_lora(base: BaseModel, options: TrainingOptions) -> list[torch.nn.Module]:
    """LoRA layers on the UNet (and the text encoders), their initial values from the seed alone; returns the
    modules that train, ready to (LoRA weights fp32, gradient checkpointing as the precision says)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    def config(targets):
        return LoraConfig(r=options.lora_rank, lora_alpha=options.lora_rank, init_lora_weights="gaussian",
                          target_modules=targets)  # fmt: skip

    trained = [base.unet, *(base.text_encoders if options.train_text_encoder else [])]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        base.unet.add_adapter(config(UNET_TARGETS))
        for encoder in trained[1:]:
            encoder.add_adapter(config(TEXT_ENCODER_TARGETS))
    cast_training_params(trained, dtype=torch.float32)
    if base.precision.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for encoder in trained[1:]:
            encoder.gradient_checkpointing_enable()  # after add_adapter: transformers then makes inputs need grads
    for module in trained:
        module.train()
    return trained


def _lora_layers(base: BaseModel, options: TrainingOptions) -> dict[str, dict[str, torch.Tensor]]:
    """The trained layers in diffusers' format, per component (CPU, fp32), as the scripts hand them to
    save_lora_weights."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    modules = {"unet": base.unet}
    if options.train_text_encoder:
        modules |= dict(zip(TEXT_ENCODERS, base.text_encoders))
    return {
        name: {
            key: value.detach().to("cpu", torch.float32).contiguous()
            for key, value in convert_state_dict_to_diffusers(get_peft_model_state_dict(module)).items()
        }
        for name, module in modules.items()
    }


def _train(model, root, images, options, precision: Precision, stop: Stop, say: Say) -> TrainedLora:
    from tqdm import tqdm

    seed, resolution, device = options.seed, options.resolution, precision.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = time.perf_counter()
    base = BaseModel(model, root, precision)
    scheduler = base.noise_scheduler
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise TrainingError(f"{model.title}'s scheduler predicts {prediction_type!r}: not a trainable objective here")
    say(logging.INFO, "%s base model loaded on %s (%s) in %.1f s", model.title, device, precision.name,
        time.perf_counter() - clock)  # fmt: skip
    _check_stop(stop, 0, options.steps)

    clock = time.perf_counter()
    examples = _encode_images(base, images, resolution, stop, options.steps)
    scaling, shift = base.vae.config.scaling_factor, getattr(base.vae.config, "shift_factor", None) or 0.0
    captions = sorted({e.caption for e in examples})
    token_ids = dict(zip(captions, zip(*[ids.unbind(0) for ids in base.tokenize(captions)])))
    cached = {} if options.train_text_encoder else _encode_captions(base, token_ids)
    say(logging.INFO, "Encoded %d image(s) and %d caption(s) in %.1f s", len(examples), len(captions),
        time.perf_counter() - clock)  # fmt: skip

    trained = _add_lora(base, options)
    parameters = [p for module in trained for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=options.learning_rate, **ADAMW)
    scaler = torch.amp.GradScaler(device.type) if precision.loss_scaling else None
    count = sum(p.numel() for p in parameters)
    say(
        logging.INFO, "Training a rank-%d LoRA (%s parameters%s) on %d image(s) for %d steps at %dx%d, batch %d, "
        "learning rate %g, seed %d, %s", options.lora_rank, f"{count:,}",
        ", text encoders included" if options.train_text_encoder else "", len(examples), options.steps, resolution,
        resolution, options.batch_size, options.learning_rate, seed, precision.name,
    )  # fmt: skip
    generator = torch.Generator("cpu").manual_seed(seed)  # noise, timesteps and latent samples: on the CPU, any device
    batches = _batches(len(examples), options.batch_size, random.Random(seed))
    losses: list[float] = []
    clock = time.perf_counter()
    for step in range(options.steps):
        _check_stop(stop, step, options.steps)
        batch = [examples[i] for i in next(batches)]
        mean = torch.stack([e.latent_mean for e in batch])
        std = torch.stack([e.latent_std for e in batch])
        latents = (mean + std * torch.randn(mean.shape, generator=generator) - shift) * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        with _autocast(precision):
            if options.train_text_encoder:
                ids = [torch.stack([token_ids[e.caption][i] for e in batch]) for i in range(len(base.tokenizers))]
                embeds, pooled = base.encode_prompts(ids)
            else:
                embeds = torch.stack([cached[e.caption][0] for e in batch]).to(device)
                pooled = torch.stack([cached[e.caption][1] for e in batch]).to(device) if base.sdxl else None
            conditions = {}
            if base.sdxl:
                time_ids = torch.tensor([e.time_ids for e in batch], dtype=precision.weight_dtype, device=device)
                conditions = {"added_cond_kwargs": {"time_ids": time_ids, "text_embeds": pooled}}
            prediction = base.unet(
                noisy.to(device, precision.weight_dtype), timesteps.to(device), embeds, return_dict=False,
                **conditions,
            )[0]  # fmt: skip
        loss = F.mse_loss(prediction.float(), target.to(device).float(), reduction="mean")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        line = tqdm.format_meter(step + 1, options.steps, time.perf_counter() - clock, postfix=f"loss={losses[-1]:.4f}")
        say(logging.INFO, "%s", line)
    seconds = time.perf_counter() - clock

    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    lora = TrainedLora(_lora_layers(base, options), losses, seconds, precision, peak, count)
    say(logging.INFO, "Trained %d steps in %.1f s (%.2f steps/s); final loss %.4f", options.steps, seconds,
        options.steps / max(seconds, 1e-9), lora.final_loss)  # fmt: skip
    return lora


@contextlib.contextmanager
def _no_progress_bars():
    """diffusers' and transformers' loading bars off while the base model loads: the training's own progress lines
    are the ones Replicate reads."""
    import diffusers
    import transformers

    bars = (diffusers.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled())
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars[0]:
            diffusers.utils.logging.enable_progress_bar()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()


def _autocast(precision: Precision):
    if not precision.autocast:
        return contextlib.nullcontext()
    return torch.autocast(precision.device.type, dtype=precision.weight_dtype)
