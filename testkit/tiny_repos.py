"""Tiny random-weight Hugging Face repos, on disk in exactly the layout of the real ones.

For every Flash model in flashsd.models.MODELS, `build_repo_files(root, key)` writes each of its HubRepos
under `root / repo.id` with exactly the files `repo.files` lists (nothing more), so the project's real
loading code (plain `from_pretrained(..., local_files_only=True)`, LoRA / PEFT attaching) runs on CPU in
seconds. Configs keep the real repos' structure (class names, scheduler configs, variants and dtypes,
special tokens, shard names, VAE scale factor 8, latent channels, conditioning kinds); only the sizes are
tiny. Same seed → byte-identical files. Every model also lists the safety checker, which lives in SD1.5's
repo folder (a folder shared by several models holds the union of their files, each written identically), and its
second opinion (Falconsai/nsfw_image_detection).

The Flash adapters are in their real files' formats (see "the Flash adapters" below): SDXL / SD1.5 LoRA files
with old diffusers keys at the real ranks on every attention projection; SD3 / PixArt PEFT adapters (r=64,
alpha=8, 12 target names), PixArt's layers named after Jasper's training wrapper by default
(`adapter_naming="diffusers"` or write_pixart_adapter give the diffusers-named variant). Every LoRA layer is
randomised (a fresh LoRA is a no-op).

    python -m testkit.tiny_repos DIR [MODEL ...]      # builds the given models (default: all) under DIR
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import torch

from flashsd.control import CONTROL_TYPES, DEPTH, DEPTH_ESTIMATOR, FAMILIES, control_repos
from flashsd.models import MODELS, FlashModel, HubRepo

# Small English text the tokenizers are trained on (prompts in the style users write).
CORPUS = """\
a photo of an astronaut riding a horse on the moon
a lighthouse at dawn, oil painting, highly detailed
a cat sitting on a red chair in a sunny room
portrait of a woman with long hair, studio lighting, 85mm
a mountain landscape with a lake and pine trees at sunset
a bowl of fresh fruit on a wooden kitchen table
an old man reading a newspaper in a busy cafe
a futuristic city at night with neon lights and flying cars
a small boat on a calm sea under a cloudy sky
a watercolor painting of flowers in a glass vase
a dog running through a field of tall green grass
the interior of a cozy library with a fireplace
a close up photograph of a butterfly on a leaf
a castle on a hill surrounded by fog, fantasy art
a plate of pasta with tomato sauce and basil
children playing football in a park on a summer day
a snowy village street with warm lights in the windows
an astronaut floating in space above the earth
a bright yellow sports car parked by the beach
a robot painting a picture in an art studio
a steaming cup of coffee next to an open book
a forest path in autumn with orange and red leaves
a black and white photo of a jazz musician playing the saxophone
a colorful hot air balloon over the desert at sunrise
a bridge over a river in the city, cinematic lighting
a macro shot of water drops on a spider web
a medieval knight in shining armor holding a sword
a tropical island with palm trees and white sand
a vintage train crossing a stone bridge in the mountains
a detailed pencil sketch of a horse
a wolf howling at the full moon in the snow
a bakery window full of bread, cakes and cookies
a girl with a red umbrella walking in the rain
a sailing ship in a storm, dramatic waves, 4k
a quiet japanese garden with a pond and a wooden bridge
an owl sitting on a branch at night, sharp focus
a street market with fruit, vegetables and people
a portrait of a smiling man wearing glasses
a spaceship landing on a red planet, science fiction
a waterfall in a green jungle, ultra realistic
The Quick Brown Fox Jumps Over The Lazy Dog; A Photo Of Paris In 1920, New York At Night.
THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG: 0 1 2 3 4 5 6 7 8 9 (10%) "quoted" 'single' - & / ? ! @ # + = * _ ~
"""

CLIP_MERGES = 320  # vocabulary: 512 byte symbols + merges + 2 specials
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer pattern (as in the real tokenizer.json of openai/clip-vit-large-patch14).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
T5_EXTRA_IDS = 100
LORA_RELATIVE_NORM = 0.5  # each randomised adapter layer changes its weight by this fraction (Frobenius)


# --- tokenizers -----------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte → printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.cache
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """A byte-level BPE in CLIP's format, its merges learned on CORPUS.

    The vocabulary is laid out as the real one: the 256 byte symbols, the same with "</w>", the merge
    results in merge order, then <|startoftext|> and <|endoftext|> last (so, as in the real CLIP, the
    end-of-text token has the highest id). Every byte is in it, so any text tokenises."""
    from collections import Counter

    from tokenizers import Regex, normalizers, pre_tokenizers

    # CLIP's normalisation and pre-tokenisation (the `tokenizers` components the real tokenizer uses). The
    # merges are learned here rather than with tokenizers' BpeTrainer: that one breaks ties between equally
    # frequent pairs differently from one process to the next, and the files must be byte-identical.
    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    words: Counter[tuple[str, ...]] = Counter()
    for line in CORPUS.splitlines():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words[tuple(word[:-1]) + (word[-1] + "</w>",)] += 1
    learned: list[tuple[str, str]] = []
    while len(learned) < CLIP_MERGES:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda item: (-item[1], item[0]))  # most frequent, then by name
        if count < 2:
            break
        learned.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged

    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges: list[str] = []
    for left, right in learned:
        if left not in vocab or right not in vocab or (left + right) in vocab:
            continue
        vocab[left + right] = len(vocab)
        merges.append(f"{left} {right}")
        if len(merges) == CLIP_MERGES:
            break
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab, tuple(merges)


def _json_dump(path: Path, value, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, **{"indent": 2, **kwargs}) + "\n", encoding="utf-8")


def _added_token(content: str, **extra) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False, **extra}


def write_clip_tokenizer(folder: Path, pad_token: str = CLIP_EOS) -> None:
    """The 4 files of the SD / SDXL / SD3 CLIP tokenizers, in the real (legacy slow-tokenizer) format.
    The real SDXL and SD3 `tokenizer_2` pad with "!", the others with <|endoftext|>."""
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    typed = lambda content: {"__type": "AddedToken", **_added_token(content)}  # noqa: E731
    _json_dump(folder / "special_tokens_map.json", {
        "bos_token": _added_token(CLIP_BOS), "eos_token": _added_token(CLIP_EOS),
        "pad_token": pad_token, "unk_token": _added_token(CLIP_EOS),
    })  # fmt: skip
    _json_dump(folder / "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": typed(CLIP_BOS), "do_lower_case": True, "eos_token": typed(CLIP_EOS),
        "errors": "replace", "model_max_length": 77, "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": pad_token, "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer", "unk_token": typed(CLIP_EOS),
    })  # fmt: skip


@functools.cache
def t5_spiece_model() -> bytes:
    """A real sentencepiece unigram model trained on CORPUS, with T5's special ids (pad 0, eos 1, unk 2,
    no bos)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, model_type="unigram",
        vocab_size=256, hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def t5_spiece_size() -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=t5_spiece_model()).get_piece_size()


def write_t5_tokenizer(folder: Path) -> None:
    """PixArt's T5 tokenizer folder: spiece.model, added_tokens.json, special_tokens_map.json and
    tokenizer_config.json (T5's 100 <extra_id_N> sentinels after the sentencepiece pieces, N=0 last)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(t5_spiece_model())
    size = t5_spiece_size()
    extras = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    _json_dump(folder / "added_tokens.json", {e: size + T5_EXTRA_IDS - 1 - i for i, e in enumerate(extras)})
    _json_dump(folder / "special_tokens_map.json", {
        "additional_special_tokens": extras, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
    })  # fmt: skip
    _json_dump(folder / "tokenizer_config.json", {
        "additional_special_tokens": extras, "clean_up_tokenization_spaces": True, "eos_token": "</s>",
        "extra_ids": T5_EXTRA_IDS, "legacy": True, "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>", "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>",
    })  # fmt: skip


# --- components -----------------------------------------------------------------------------------------


def _seeded(seed: int, salt: str) -> None:
    """A fixed seed per component, so each component's weights depend only on (seed, component)."""
    torch.manual_seed(zlib.crc32(f"{seed}/{salt}".encode()))


def clip_text_model(seed: int, salt: str, *, projection: bool, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = clip_vocab_and_merges()
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act=hidden_act,
        # As in the real CLIP configs: eos_token_id 2 makes CLIP pool at the highest token id, which is
        # <|endoftext|> (last in the vocabulary), whatever the pad token.
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    _seeded(seed, salt)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def vae(seed: int, salt: str, *, latent_channels: int = 4, **config):
    """An AutoencoderKL with 4 blocks (vae_scale_factor 8) and tiny channels."""
    from diffusers import AutoencoderKL

    _seeded(seed, salt)
    model = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, **config,
    )  # fmt: skip
    return model.eval()


# --- the Flash adapters, in their real files' formats ----------------------------------------------------
#
# Sources: the training code, gojasper/flash-diffusion @ 3ffd9a8389fbb161c173068fac1377a21d518a01
# (examples/train_flash_{sdxl,sd,sd3,pixart}.py, examples/configs/*.yaml, setup.py), and
# /work/shared/REFERENCE.md §1b (the hub files' sizes, which these layouts match). The files themselves were not
# seen: where a detail is inferred, the comment says so.

# SDXL and SD1.5: `unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
# target_modules=["to_k", "to_q", "to_v", "to_out.0"]))` (train_flash_sdxl.py, train_flash_sd.py): every
# attention's four projections, nothing else.
FLASH_UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# LORA_RANK: 64 (configs/flash_sdxl.yaml, flash_sd3.yaml, flash_pixart.yaml), 128 (configs/flash_sd.yaml).
FLASH_LORA_RANK = {"sdxl": 64, "sd15": 128, "sd3": 64, "pixart": 64}
# SD3 and PixArt: `get_peft_model(student, LoraConfig(r=64, target_modules=[...these 12...]))`
# (train_flash_sd3.py, train_flash_pixart.py); lora_alpha is not given, so it is peft's default, 8.
FLASH_PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj",
                      "linear", "linear_1", "linear_2"]  # fmt: skip
FLASH_PEFT_ALPHA = 8
# The trainer's own model classes, which peft records in adapter_config.json's `auto_mapping` (peft's
# PeftModel.save_pretrained does so for a model without a task type). Both live in
# src/flash/models/transformers/tranformers.py (sic), module flash.models.transformers.tranformers. PixArt's is
# REFERENCE §1b's reading of the real config; SD3's follows from train_flash_sd3.py (an assumption: not seen).
FLASH_WRAPPER_LIBRARY = "flash.models.transformers.tranformers"
PIXART_WRAPPER_CLASS = "DiffusersTransformer2DWrapper"
SD3_WRAPPER_CLASS = "DiffusersSD3Transformer2DWrapper"
# Jasper's PixArt wrapper names its AdaLN embedders differently from diffusers' PixArtTransformer2DModel. The
# file holds LoRA layers for the wrapper's names; diffusers' model has the other names instead.
PIXART_WRAPPER_ONLY_LAYERS = tuple(
    f"adaln_single.{embedder}.{linear}"
    for embedder in ("timestep_embedder", "add_embedding.0", "add_embedding.1", "add_embedding.2")
    for linear in ("linear_1", "linear_2")
)
PIXART_DIFFUSERS_ONLY_LAYERS = tuple(
    f"adaln_single.emb.{embedder}.{linear}"
    for embedder in ("timestep_embedder", "resolution_embedder", "aspect_ratio_embedder")
    for linear in ("linear_1", "linear_2")
)
ADAPTER_NAMINGS = ("wrapper", "diffusers")  # PixArt adapter fixtures: Jasper's wrapper's names or diffusers'


class FlashPixArtAdaLN(torch.nn.Module):
    """The parameterised modules of the AdaLN that Jasper's PixArt wrapper uses instead of diffusers' own
    (gojasper/flash-diffusion, src/flash/models/transformers/utils.py, class AdaLayerNormSingle, as
    examples/train_flash_pixart.py builds it: use_concat_conditioning=True, num_vector_conditionings=3,
    projection_class_embeddings_input_dim=256, timesteps_embedding_num_channels=256): a timestep embedder, an
    `add_embedding` ModuleList of one TimestepEmbedding per vector conditioning (height, width, aspect ratio),
    each `dim // 3` wide, and the 6-way modulation `linear`. Only the layout matters here (it names the LoRA
    layers and fixes their shapes); it has no forward."""

    def __init__(self, dim: int, conditionings: int = 3, channels: int = 256):
        from diffusers.models.embeddings import TimestepEmbedding

        super().__init__()
        self.timestep_embedder = TimestepEmbedding(in_channels=channels, time_embed_dim=dim)
        self.add_embedding = torch.nn.ModuleList(
            TimestepEmbedding(in_channels=channels, time_embed_dim=dim // conditionings) for _ in range(conditionings)
        )
        self.linear = torch.nn.Linear(dim, 6 * dim, bias=True)


def as_flash_pixart_wrapper(transformer: torch.nn.Module) -> torch.nn.Module:
    """A copy of a diffusers PixArtTransformer2DModel laid out as Jasper's DiffusersTransformer2DWrapper (a
    Transformer2DModel whose `adaln_single` is FlashPixArtAdaLN), its AdaLN weights taken from diffusers' as
    examples/train_flash_pixart.py does: timestep_embedder <- emb.timestep_embedder, add_embedding[0] and [1]
    (height, width) <- emb.resolution_embedder, add_embedding[2] <- emb.aspect_ratio_embedder. Works on the meta
    device too (nothing is allocated there)."""
    import copy

    wrapper = copy.deepcopy(transformer)
    emb = transformer.adaln_single.emb
    sources = {
        "timestep_embedder": emb.timestep_embedder, "add_embedding.0": emb.resolution_embedder,
        "add_embedding.1": emb.resolution_embedder, "add_embedding.2": emb.aspect_ratio_embedder,
        "linear": transformer.adaln_single.linear,
    }  # fmt: skip
    weight = transformer.adaln_single.linear.weight
    with torch.device(weight.device):
        adaln = FlashPixArtAdaLN(dim=weight.shape[1]).to(weight.dtype)
    modules = dict(adaln.named_modules())
    with torch.no_grad():
        for name, source in sources.items():
            target = modules[name].state_dict()
            assert target.keys() == source.state_dict().keys(), name
            for key, value in source.state_dict().items():
                assert target[key].shape == value.shape, (name, key)
                target[key].copy_(value)
    wrapper.adaln_single = adaln
    return wrapper


def peft_adapter_config(model_key: str, naming: str = "wrapper") -> dict:
    """adapter_config.json of the Flash PEFT adapters, as peft 0.9.0 (setup.py pins peft==0.9.0) writes it for
    `LoraConfig(r=64, target_modules=[12 names])` on the trainer's model: its LoraConfig fields with their
    defaults, inference_mode true, no base_model_name_or_path (diffusers models have no `name_or_path`) and the
    auto_mapping of the trainer's class. target_modules is a set in peft: saved in arbitrary order; sorted here.
    (A reconstruction: the real files were not seen. peft of today reads it, filling in its newer fields.)"""
    if model_key == "sd3":
        base_class, library = SD3_WRAPPER_CLASS, FLASH_WRAPPER_LIBRARY
    elif model_key == "pixart" and naming == "wrapper":
        base_class, library = PIXART_WRAPPER_CLASS, FLASH_WRAPPER_LIBRARY
    elif model_key == "pixart" and naming == "diffusers":  # what peft records on diffusers' own PixArt
        base_class, library = "PixArtTransformer2DModel", "diffusers.models.transformers.pixart_transformer_2d"
    else:
        raise ValueError(f"no PEFT adapter for {model_key!r} with naming {naming!r}")
    return {
        "alpha_pattern": {}, "auto_mapping": {"base_model_class": base_class, "parent_library": library},
        "base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": FLASH_PEFT_ALPHA, "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "peft_type": "LORA", "r": FLASH_LORA_RANK[model_key], "rank_pattern": {},
        "revision": None, "target_modules": sorted(FLASH_PEFT_TARGETS), "task_type": None, "use_dora": False,
        "use_rslora": False,
    }  # fmt: skip


def write_peft_adapter_config(folder: Path, model_key: str, naming: str = "wrapper") -> None:
    """peft 0.9.0's PeftConfig.save_pretrained: json.dumps(indent=2, sort_keys=True), no final newline."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(peft_adapter_config(model_key, naming), indent=2, sort_keys=True)
    (folder / "adapter_config.json").write_text(text, encoding="utf-8")


def lora_file_key(module: str, peft_key: str) -> str:
    """The old diffusers key of a LoRA file layer: `unet.<module>.lora.down.weight` / `.lora.up.weight` (what
    diffusers' convert_state_dict_to_diffusers + save_lora_weights wrote from a peft UNet adapter in 2024)."""
    part = {"lora_A": "down", "lora_B": "up"}[peft_key]
    return f"unet.{module}.lora.{part}.weight"


def peft_file_key(module: str, peft_key: str) -> str:
    """The key of a PEFT adapter layer as peft's save_pretrained writes it (adapter name removed)."""
    return f"base_model.model.{module}.{peft_key}.weight"


def _randomise_adapter(model: torch.nn.Module, seed: int, salt: str) -> int:
    """Give every LoRA layer random A and B (a fresh LoRA has B = 0: a no-op), B scaled so that the layer's
    weight changes by LORA_RELATIVE_NORM of its norm: a visible change that stays finite (also in fp16). Each
    layer draws from its own seed (seed, salt, module name), so a layer's values do not depend on which other
    layers the adapter has: two adapters with the same salt agree on the layers they share."""
    from peft.tuners.lora import LoraLayer

    count = 0
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            layer = module_name.removeprefix("base_model.model.")
            base_norm = module.get_base_layer().weight.norm()
            assert base_norm > 0, f"{layer}: a zero base weight would make its LoRA a no-op"
            for name in module.lora_A:
                _seeded(seed, f"{salt}/{layer}")
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                a.normal_(0.0, 1.0 / math.sqrt(a[0].numel()))
                b.normal_(0.0, 1.0)
                delta = module.get_delta_weight(name).norm()
                b.mul_(LORA_RELATIVE_NORM * base_norm / delta)
                count += 1
    return count


def _save_lora_file(unet, folder: Path, seed: int, salt: str, rank: int) -> None:
    """pytorch_lora_weights.safetensors as the Flash SDXL / SD1.5 repos ship it (REFERENCE §1b): fp32, metadata
    {"format": "pt"} (diffusers' save_lora_weights), old diffusers keys `unet.<module>.lora.down.weight` /
    `.lora.up.weight`, every attention's to_q / to_k / to_v / to_out.0 at the real rank, no `.alpha` keys (alpha
    = rank in training, so scale 1, which is also what loaders assume without one), no text-encoder layers."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=FLASH_UNET_LORA_TARGETS))  # fmt: skip
    assert _randomise_adapter(unet, seed, salt) > 0
    layers = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module, peft_key, _ = key.rsplit(".", 2)
        layers[lora_file_key(module, peft_key)] = value.float().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(layers, folder / "pytorch_lora_weights.safetensors", metadata={"format": "pt"})


def _save_peft_adapter(model, folder: Path, seed: int, salt: str, model_key: str, naming: str = "wrapper") -> None:
    """A Flash PEFT adapter folder: adapter_config.json (peft_adapter_config) and adapter_model.safetensors as
    peft's save_pretrained writes it: fp32, metadata {"format": "pt"}, keys
    `base_model.model.<module>.lora_A.weight` / `lora_B.weight` for every module of `model` that peft's suffix
    matching of FLASH_PEFT_TARGETS selects (Linear and Conv2d alike), at rank 64."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = LoraConfig(r=FLASH_LORA_RANK[model_key], lora_alpha=FLASH_PEFT_ALPHA, target_modules=FLASH_PEFT_TARGETS)
    peft_model = get_peft_model(model, config)
    assert _randomise_adapter(peft_model, seed, salt) > 0
    weights = {k: v.float().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert all(k.startswith("base_model.model.") for k in weights), sorted(weights)[:3]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    write_peft_adapter_config(folder, model_key, naming)


def _save_pipeline_index(pipeline, folder: Path, **listed) -> None:
    """model_index.json as pipe.save_pretrained writes it. `listed` names, as the real repo does, the
    components the pipeline object was built without: the tokenizers (written as files here) and those
    the real repo has but the product loads as None (T5 for SD3, the SD 1.5 safety checker)."""
    if listed:
        pipeline.register_to_config(**{name: list(value) for name, value in listed.items()})
    pipeline.save_config(folder)


def _save_scheduler_config(folder: Path, config: dict) -> None:
    """The real repo's scheduler_config.json, verbatim: keys its own class ignores (clip_sample,
    set_alpha_to_one, ...) are read by LCMScheduler.from_pretrained(base, subfolder="scheduler")."""
    _json_dump(folder / "scheduler" / "scheduler_config.json", config)


# The real repos' scheduler configs.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}  # fmt: skip
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}  # fmt: skip
SD3_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000, "shift": 3.0,
}  # fmt: skip
PIXART_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0", "algorithm_type": "dpmsolver++",
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False, "lambda_min_clipped": -math.inf, "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint",
    "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
    "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None,
}  # fmt: skip


def _save_fp16(model, folder: Path) -> None:
    model.to(torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=True)


def _build_sdxl(model: FlashModel, dirs: dict[str, Path], seed: int) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers import EulerDiscreteScheduler

    base = dirs[model.base.id]
    te = clip_text_model(seed, "sdxl/text_encoder", projection=False)
    te2 = clip_text_model(seed, "sdxl/text_encoder_2", projection=True, hidden_act="gelu")
    _seeded(seed, "sdxl/unet")
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=64, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ).eval()  # fmt: skip
    fix_vae = vae(seed, "sdxl/vae", sample_size=1024, scaling_factor=0.13025, force_upcast=False)
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe = StableDiffusionXLPipeline(
        vae=fix_vae, text_encoder=te, text_encoder_2=te2, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=scheduler,
    )  # fmt: skip
    _save_pipeline_index(pipe, base, tokenizer=("transformers", "CLIPTokenizer"),
                         tokenizer_2=("transformers", "CLIPTokenizer"))  # fmt: skip
    _save_scheduler_config(base, SDXL_SCHEDULER)
    write_clip_tokenizer(base / "tokenizer")
    write_clip_tokenizer(base / "tokenizer_2", pad_token="!")
    _save_fp16(te, base / "text_encoder")
    _save_fp16(te2, base / "text_encoder_2")
    fix_vae.save_pretrained(dirs[model.vae.id], safe_serialization=True)  # the fix ships fp32 only
    _save_fp16(unet, base / "unet")
    _save_lora_file(unet.float(), dirs[model.adapter.id], seed, "sdxl/lora", FLASH_LORA_RANK["sdxl"])


def _build_sd15(model: FlashModel, dirs: dict[str, Path], seed: int) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    base = dirs[model.base.id]
    te = clip_text_model(seed, "sd15/text_encoder", projection=False)
    _seeded(seed, "sd15/unet")
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8,
    ).eval()  # fmt: skip
    sd_vae = vae(seed, "sd15/vae", sample_size=512, scaling_factor=0.18215)
    pipe = StableDiffusionPipeline(
        vae=sd_vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=True,
    )  # fmt: skip
    _save_pipeline_index(
        pipe, base, tokenizer=("transformers", "CLIPTokenizer"),
        safety_checker=("stable_diffusion", "StableDiffusionSafetyChecker"),
        feature_extractor=("transformers", "CLIPImageProcessor"),
    )  # fmt: skip
    _save_scheduler_config(base, SD15_SCHEDULER)
    write_clip_tokenizer(base / "tokenizer")
    _save_fp16(te, base / "text_encoder")
    _save_fp16(unet, base / "unet")
    _save_fp16(sd_vae, base / "vae")
    _save_lora_file(unet.float(), dirs[model.adapter.id], seed, "sd15/lora", FLASH_LORA_RANK["sd15"])


def _build_sd3(model: FlashModel, dirs: dict[str, Path], seed: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    base = dirs[model.base.id]
    te = clip_text_model(seed, "sd3/text_encoder", projection=True)
    te2 = clip_text_model(seed, "sd3/text_encoder_2", projection=True, hidden_act="gelu")
    _seeded(seed, "sd3/transformer")
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=96, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=128,  # 128 patches x 2 x 8 = 2048 px, the largest size allowed (real: 192)
    ).eval()  # fmt: skip
    sd3_vae = vae(
        seed, "sd3/vae", latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER), vae=sd3_vae,
        text_encoder=te, tokenizer=None, text_encoder_2=te2, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    _save_pipeline_index(
        pipe, base, tokenizer=("transformers", "CLIPTokenizer"), tokenizer_2=("transformers", "CLIPTokenizer"),
        text_encoder_3=("transformers", "T5EncoderModel"), tokenizer_3=("transformers", "T5TokenizerFast"),
    )  # fmt: skip
    _save_scheduler_config(base, SD3_SCHEDULER)
    write_clip_tokenizer(base / "tokenizer")
    write_clip_tokenizer(base / "tokenizer_2", pad_token="!")
    # The real repo's plain files already hold fp16 weights.
    te.to(torch.float16).save_pretrained(base / "text_encoder", safe_serialization=True)
    te2.to(torch.float16).save_pretrained(base / "text_encoder_2", safe_serialization=True)
    transformer.to(torch.float16).save_pretrained(base / "transformer", safe_serialization=True)
    sd3_vae.to(torch.float16).save_pretrained(base / "vae", safe_serialization=True)
    _save_peft_adapter(transformer.float(), dirs[model.adapter.id], seed, "sd3/peft", "sd3")


def _pixart_transformer(seed: int):
    """The tiny PixArt transformer (fp32) of the base repo: the same weights for the same seed."""
    from diffusers import PixArtTransformer2DModel

    _seeded(seed, "pixart/transformer")
    return PixArtTransformer2DModel(
        # sample_size 128 as in the real 1024 px model: the pipeline and the model then use the resolution
        # and aspect-ratio conditioning (use_additional_conditions); position embeddings follow any size.
        # Inner size 24: divisible by 3, as the resolution / aspect-ratio embeddings need (real: 1152).
        sample_size=128, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, in_channels=4,
        out_channels=8, cross_attention_dim=24, caption_channels=32, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
        activation_fn="gelu-approximate",
    ).eval()  # fmt: skip


def _write_pixart_adapter(folder: Path, transformer, seed: int, naming: str) -> None:
    if naming not in ADAPTER_NAMINGS:
        raise ValueError(f"adapter_naming must be one of {ADAPTER_NAMINGS}, not {naming!r}")
    # The same salt for both namings: the layers they share hold the same values.
    model = as_flash_pixart_wrapper(transformer) if naming == "wrapper" else transformer
    _save_peft_adapter(model, folder, seed, "pixart/peft", "pixart", naming)


def write_pixart_adapter(folder: Path, *, naming: str, seed: int = 0) -> None:
    """Write only the Flash PixArt adapter folder (adapter_config.json, adapter_model.safetensors) for the tiny
    PixArt of `seed`, its layers named after Jasper's wrapper ("wrapper", what the real file most likely holds:
    REFERENCE §1b) or after diffusers' PixArtTransformer2DModel ("diffusers", what peft gives on the pipeline's
    own transformer). Same seed: the same bytes as that naming's adapter in build_repo_files."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), _quiet():
        _write_pixart_adapter(Path(folder), _pixart_transformer(seed), seed, naming)


def _build_pixart(model: FlashModel, dirs: dict[str, Path], seed: int, adapter_naming: str = "wrapper") -> None:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
    from transformers import T5Config, T5EncoderModel

    base = dirs[model.base.id]
    write_t5_tokenizer(base / "tokenizer")
    config = T5Config(
        vocab_size=t5_spiece_size() + T5_EXTRA_IDS, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    _seeded(seed, "pixart/text_encoder")
    te = T5EncoderModel(config).eval()
    transformer = _pixart_transformer(seed)
    pixart_vae = vae(seed, "pixart/vae", sample_size=512, scaling_factor=0.18215)
    pipe = PixArtAlphaPipeline(
        tokenizer=None, text_encoder=te, vae=pixart_vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler.from_config(PIXART_SCHEDULER),
    )  # fmt: skip
    # The real repo names its transformer with the old class Transformer2DModel (diffusers remaps it).
    _save_pipeline_index(pipe, base, tokenizer=("transformers", "T5Tokenizer"),
                         transformer=("diffusers", "Transformer2DModel"))  # fmt: skip
    _save_scheduler_config(base, PIXART_SCHEDULER)
    _save_t5_two_shards(te, base / "text_encoder")
    transformer.save_pretrained(base / "transformer", safe_serialization=True)
    config_file = base / "transformer" / "config.json"
    transformer_config = json.loads(config_file.read_text())
    transformer_config["_class_name"] = "Transformer2DModel"
    _json_dump(config_file, transformer_config, sort_keys=True)
    pixart_vae.save_pretrained(base / "vae", safe_serialization=True)
    _write_pixart_adapter(dirs[model.adapter.id], transformer, seed, adapter_naming)


def _save_t5_two_shards(te, folder: Path) -> None:
    """fp32, in exactly two shards (model-00001-of-00002.safetensors, ...) plus the index, as the real one."""
    total = sum(p.numel() * p.element_size() for p in te.state_dict().values())
    te.save_pretrained(folder, safe_serialization=True, max_shard_size=total * 6 // 10)
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], names


BUILDERS = {"sdxl": _build_sdxl, "sd3": _build_sd3, "sd15": _build_sd15, "pixart": _build_pixart}

# The real feature_extractor/preprocessor_config.json of the SD1.5 repo, at the tiny checker's 32 px.
SAFETY_FEATURE_EXTRACTOR = {
    "crop_size": 32, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 32,
}  # fmt: skip
# The tiny checker's thresholds: above any cosine similarity (at most 1, + 0.01 adjustment), so it never flags
# on its own and the other tests are not filtered at random. Tests that need a flag lower them on the loaded
# checker (safety_checker.concept_embeds_weights), which is the real code path with other thresholds.
SAFETY_NEVER_FLAG = 2.0


def build_safety_checker(folder: Path, seed: int = 0) -> None:
    """`safety_checker/` (config + model.fp16.safetensors) and `feature_extractor/` of the SD1.5 repo: a
    StableDiffusionSafetyChecker with a tiny CLIP vision tower and random concept embeddings. Its weights depend
    only on the seed, whichever model's build writes them (they share one folder)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    vocab, _ = clip_vocab_and_merges()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=32),
        projection_dim=32,
    )  # fmt: skip
    config.architectures = ["StableDiffusionSafetyChecker"]
    _seeded(seed, "safety_checker")
    checker = StableDiffusionSafetyChecker(config).eval()
    checker.concept_embeds.normal_()
    checker.special_care_embeds.normal_()
    checker.concept_embeds_weights.fill_(SAFETY_NEVER_FLAG)
    checker.special_care_embeds_weights.fill_(SAFETY_NEVER_FLAG)
    _save_fp16(checker, folder / "safety_checker")
    _json_dump(folder / "feature_extractor" / "preprocessor_config.json", SAFETY_FEATURE_EXTRACTOR)


# The second safety opinion, Falconsai/nsfw_image_detection at the pin in flashsd.models (SAFETY_SECOND_OPINION).
# config.json verbatim: the text added by the hub commit 121fba2 ("Upload 4 files") with `_name_or_path` as the
# pinned commit 63e0a066 sets it (stored copies of the hub's commit pages; 724 bytes as transformers writes it,
# json indent 2, sorted, final newline: the hub's size). Its weights, model.safetensors, are fp32 with the key names
# transformers 4.31 saved (vit.encoder.layer.N.attention.attention.query...), metadata {"format": "pt"}.
SECOND_OPINION_CONFIG = {
    "_name_or_path": "Falconsai/nsfw_image_detection", "architectures": ["ViTForImageClassification"],
    "attention_probs_dropout_prob": 0.0, "encoder_stride": 16, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
    "hidden_size": 768, "id2label": {"0": "normal", "1": "nsfw"}, "image_size": 224, "initializer_range": 0.02,
    "intermediate_size": 3072, "label2id": {"normal": "0", "nsfw": "1"}, "layer_norm_eps": 1e-12, "model_type": "vit",
    "num_attention_heads": 12, "num_channels": 3, "num_hidden_layers": 12, "patch_size": 16,
    "problem_type": "single_label_classification", "qkv_bias": True, "torch_dtype": "float32",
    "transformers_version": "4.31.0",
}  # fmt: skip
# preprocessor_config.json verbatim (a stored copy of a duplicate of the repo; 325 bytes, the hub's size).
SECOND_OPINION_PREPROCESSOR = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "ViTImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 2,
    "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224},
}  # fmt: skip
# What the tiny fixture changes: the sizes (a 32 px image in 8 px patches; encoder_stride follows the patch).
SECOND_OPINION_TINY = {
    "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32,
    "patch_size": 8, "encoder_stride": 8,
}  # fmt: skip
# The tiny classifier's logit for `nsfw` is raised by this much, so it confirms every flag of the CompVis checker
# (whose tiny thresholds flag nothing unless a test lowers them): tests that lower the thresholds see the images
# left out as before. Tests that need `normal` change the loaded classifier's bias (the real code path).
SECOND_OPINION_NSFW_MARGIN = 10.0


def second_opinion_config(tiny: bool = True) -> dict:
    return {**SECOND_OPINION_CONFIG, **(SECOND_OPINION_TINY if tiny else {})}


def build_second_opinion(folder: Path, seed: int = 0) -> None:
    """config.json, model.safetensors and preprocessor_config.json of Falconsai/nsfw_image_detection: a tiny random
    ViTForImageClassification in the real file's format, its configs the real ones at the tiny sizes."""
    from transformers import ViTConfig, ViTForImageClassification

    config = second_opinion_config()
    _seeded(seed, "second_opinion")
    model = ViTForImageClassification(ViTConfig(**{k: v for k, v in config.items() if not k.startswith("_")})).eval()
    nsfw = int(config["label2id"]["nsfw"])
    model.classifier.bias[nsfw] += SECOND_OPINION_NSFW_MARGIN
    model.save_pretrained(folder, safe_serialization=True)  # fp32, the 4.31 key names, {"format": "pt"}
    _json_dump(folder / "config.json", config, sort_keys=True)
    size = config["image_size"]
    _json_dump(
        folder / "preprocessor_config.json", {**SECOND_OPINION_PREPROCESSOR, "size": {"height": size, "width": size}}
    )


def listed_for(repo_id: str) -> set[str]:
    """Every file of `repo_id` that some model lists (models may share a repo's folder)."""
    return {name for model in MODELS.values() for repo in model.repos if repo.id == repo_id for name in repo.files}


# --- the API ----------------------------------------------------------------------------------------------


def files_under(folder: Path) -> set[str]:
    """Every file under `folder`, as POSIX paths relative to it."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def _complete(root: Path, repos: tuple[HubRepo, ...]) -> bool:
    return all((root / repo.id / name).is_file() for repo in repos for name in repo.files)


def pixart_adapter_naming(folder: Path) -> str | None:
    """Which naming a PixArt adapter folder holds ("wrapper" or "diffusers", from its config's auto_mapping);
    None without one."""
    config = Path(folder) / "adapter_config.json"
    if not config.is_file():
        return None
    mapping = json.loads(config.read_text(encoding="utf-8")).get("auto_mapping") or {}
    return "wrapper" if mapping.get("base_model_class") == PIXART_WRAPPER_CLASS else "diffusers"


def build_repo_files(root: Path, model_key: str, *, seed: int = 0, adapter_naming: str | None = None) -> None:
    """Write every HubRepo of MODELS[model_key] under `root / repo.id`, each with exactly `repo.files`.
    Does nothing when all those files exist already; otherwise rebuilds that model's repos whole.
    `adapter_naming` (PixArt only): the adapter's layers named after Jasper's wrapper ("wrapper", the default:
    what the real file most likely holds) or after diffusers' PixArtTransformer2DModel ("diffusers"); a root
    holding the other naming is rebuilt."""
    model = MODELS[model_key]
    root = Path(root)
    if model_key == "pixart":
        adapter_naming = adapter_naming or "wrapper"
        if adapter_naming not in ADAPTER_NAMINGS:
            raise ValueError(f"adapter_naming must be one of {ADAPTER_NAMINGS}, not {adapter_naming!r}")
    elif adapter_naming is not None:
        raise ValueError(f"adapter_naming applies to the PixArt adapter only, not to {model_key!r}")
    naming_ok = model_key != "pixart" or pixart_adapter_naming(root / model.adapter.id) == adapter_naming
    if _complete(root, model.repos) and naming_ok:
        return
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tiny-{model_key}-", dir=root))
    try:
        dirs = {repo.id: staging / repo.id for repo in model.repos}
        for folder in dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        # fork_rng: the caller's torch RNG is left as it was.
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _quiet():
            extra = {"adapter_naming": adapter_naming} if model_key == "pixart" else {}
            BUILDERS[model_key](model, dirs, seed, **extra)
            if model.safety_checker is not None:
                build_safety_checker(dirs[model.safety_checker.id], seed)
            if model.safety_second_opinion in model.repos:
                build_second_opinion(dirs[model.safety_second_opinion.id], seed)
        for repo in model.repos:
            folder = dirs[repo.id]
            extra = files_under(folder) - set(repo.files)
            for name in extra:  # README.md, tokenizer.json, the base repo's own VAE...
                (folder / name).unlink()
            _remove_empty_folders(folder)
            missing = set(repo.files) - files_under(folder)
            assert not missing, f"{repo.id}: not written: {sorted(missing)}"
        for repo in model.repos:
            # File by file: a folder may also hold another model's files (SD1.5's base beside the safety
            # checker every model uses). Those stay; this repo's files are replaced, strays removed.
            target = root / repo.id
            keep = listed_for(repo.id) - set(repo.files)
            for name in files_under(target) - keep if target.exists() else ():
                (target / name).unlink()
            for name in repo.files:
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(dirs[repo.id] / name, target / name)
            _remove_empty_folders(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_empty_folders(folder: Path) -> None:
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(sub.iterdir()):
            sub.rmdir()


def build_tiny_weights(root: Path, model_keys=tuple(MODELS), controlnets=CONTROL_TYPES) -> Path:
    """Build the tiny repos of every model in `model_keys` under `root`, and for those that take ControlNets the
    ControlNets of the types `controlnets` (with the depth estimator when depth is among them); returns `root`."""
    root = Path(root)
    for key in model_keys:
        build_repo_files(root, key)
        if key in FAMILIES and controlnets:
            build_control_files(root, key, controlnets)
    return root


# --- structure control (flashsd.control): ControlNets and the depth estimator, in their repos' layouts ----------

REAL_CONFIGS = Path(__file__).resolve().parent / "real_configs"
# The real ControlNet configs (testkit/real_configs/SOURCES.md) whose key sets the tiny ones are written in.
CONTROLNET_REAL_CONFIGS = {
    (model, kind): REAL_CONFIGS / "controlnet" / f"{model}-{kind}" / "config.json"
    for model, family in FAMILIES.items() for kind in family.controlnets
}  # fmt: skip
CONTROLNET_RESIDUAL_STD = 1.0  # the zero convolutions, randomised: std / sqrt(fan in) (a fresh ControlNet is a no-op)


def control_repo_files(model_key: str, controlnets=CONTROL_TYPES) -> set[str]:
    """`<repo id>/<file>` of every file the ControlNet repos of `model_key` hold in a tiny weights root."""
    return {f"{r.id}/{name}" for r in control_repos(MODELS[model_key], controlnets) for name in r.files}


def build_control_files(root: Path, model_key: str, controlnets=CONTROL_TYPES, *, seed: int = 0) -> None:
    """The ControlNet repos of `model_key` for the types `controlnets`, and the depth estimator's repo when depth is
    among them, each with exactly its listed files (the model's own repos must be built first: the ControlNets are
    made from its tiny UNet, as diffusers' training script makes them from the real one). Repos already complete are
    left as they are."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    root, model = Path(root), MODELS[model_key]
    with torch.random.fork_rng(devices=[]), torch.no_grad(), _quiet():
        for kind in controlnets:
            repo = FAMILIES[model_key].controlnets[kind]
            if _complete(root, (repo,)):
                continue
            unet = UNet2DConditionModel.from_pretrained(root / model.base.id / "unet", variant=model.variant).float()
            _seeded(seed, f"{model_key}/controlnet/{kind}")
            net = ControlNetModel.from_unet(unet).eval()
            zero_convolutions = [
                net.controlnet_cond_embedding.conv_out,
                *net.controlnet_down_blocks,
                net.controlnet_mid_block,
            ]
            for conv in zero_convolutions:
                fan_in = conv.weight[0].numel()
                conv.weight.normal_(0.0, CONTROLNET_RESIDUAL_STD / math.sqrt(fan_in))
                conv.bias.normal_(0.0, 0.1)
            _write_repo(root, repo, lambda folder, net=net, kind=kind: _save_controlnet(net, folder, model_key, kind))
        if DEPTH in controlnets and not _complete(root, (DEPTH_ESTIMATOR,)):
            _write_repo(root, DEPTH_ESTIMATOR, lambda folder: build_depth_estimator(folder, seed))


def _write_repo(root: Path, repo: HubRepo, write) -> None:
    """`write(folder)` into a staging folder, then exactly `repo.files` moved into `root / repo.id`."""
    staging = Path(tempfile.mkdtemp(prefix=".tiny-control-", dir=root))
    try:
        write(staging)
        assert files_under(staging) >= set(repo.files), (repo.id, sorted(files_under(staging)))
        target = root / repo.id
        shutil.rmtree(target, ignore_errors=True)
        for name in repo.files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_controlnet(net, folder: Path, model_key: str, kind: str) -> None:
    """diffusion_pytorch_model.fp16.safetensors as save_pretrained writes it, and config.json in the real repo's
    key set: the real file's keys with the tiny model's values; a key the real file lacks is left out only where
    its value is diffusers' default, so the file loads back into exactly this model."""
    import inspect

    net.to(torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=True)
    real = json.loads(CONTROLNET_REAL_CONFIGS[(model_key, kind)].read_text(encoding="utf-8"))
    tiny = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    defaults = {k: p.default for k, p in inspect.signature(type(net).__init__).parameters.items()}
    for key, value in tiny.items():
        if key not in real and not key.startswith("_"):
            default = defaults.get(key)
            assert json.loads(json.dumps(default)) == value, (
                f"{key}={value!r} is not the default and not in the real file"
            )
    written = {key: (real[key] if key.startswith("_") else tiny[key]) for key in real}
    _json_dump(folder / "config.json", written, sort_keys=True)


# The tiny Depth Anything V2: the real config (testkit/real_configs/depth-anything/config.json) with its sizes scaled
# down (DINOv2 backbone 32 wide, 4 layers, the neck and head to match); patch size 14 and the processor's 518 px
# input are the real ones, so the real preprocessor_config.json is copied as it is.
DEPTH_TINY_SIZES = {
    "backbone_config": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 4,
                        "out_features": ["stage1", "stage2", "stage3", "stage4"], "out_indices": [1, 2, 3, 4]},
    "fusion_hidden_size": 16, "head_hidden_size": 8, "neck_hidden_sizes": [8, 16, 32, 32], "reassemble_hidden_size": 32,
}  # fmt: skip


def depth_estimator_config() -> dict:
    config = json.loads((REAL_CONFIGS / "depth-anything" / "config.json").read_text(encoding="utf-8"))
    config["backbone_config"] |= DEPTH_TINY_SIZES["backbone_config"]
    config |= {key: value for key, value in DEPTH_TINY_SIZES.items() if key != "backbone_config"}
    return config


def build_depth_estimator(folder: Path, seed: int = 0) -> None:
    """config.json, model.safetensors (fp32, as the real file) and the real preprocessor_config.json."""
    from safetensors.torch import save_file
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    config = depth_estimator_config()
    _seeded(seed, "depth-anything")
    model = DepthAnythingForDepthEstimation(DepthAnythingConfig.from_dict(config)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: value.float().contiguous() for name, value in model.state_dict().items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _json_dump(folder / "config.json", config, sort_keys=True)
    shutil.copyfile(REAL_CONFIGS / "depth-anything" / "preprocessor_config.json", folder / "preprocessor_config.json")


class _quiet:
    """Silence diffusers' / transformers' info and warning logs while building."""

    def __enter__(self):
        import diffusers
        import transformers

        self.levels = (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity())
        self.bars = transformers.utils.logging.is_progress_bar_enabled()
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

    def __exit__(self, *exc):
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity(self.levels[0])
        transformers.utils.logging.set_verbosity(self.levels[1])
        if self.bars:
            transformers.utils.logging.enable_progress_bar()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    keys = tuple(sys.argv[2:]) or tuple(MODELS)
    print(build_tiny_weights(Path(sys.argv[1]), keys))
