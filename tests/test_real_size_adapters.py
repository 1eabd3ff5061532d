"""The Flash adapters in their real files' formats: the tiny fixtures (testkit/tiny_repos.py) and real-size sparse
files (testkit/real_size.py) against the real denoisers' configs, attached with the plain diffusers / peft loaders.

Figures from /work/shared/REFERENCE.md §1b: layer counts 560 (SDXL), 128 (SD1.5), 222 (SD3), 293 (PixArt, wrapper
naming); flash-sdxl's file is 371,758,976 bytes and flash-sd3's 350,646,280; flash-sd ~102 MB and flash-pixart
~221 MB (hub sizes, not to the byte).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from flashsd.models import MODELS
from testkit import real_size
from testkit.real_size import (
    file_layers,
    meta_denoiser,
    meta_state_dict,
    read_header,
    real_config,
    safetensors_header,
    write_real_size_adapter,
)
from testkit.recipes import base_pipeline
from testkit.tiny_repos import (
    FLASH_LORA_RANK,
    FLASH_PEFT_TARGETS,
    PIXART_DIFFUSERS_ONLY_LAYERS,
    PIXART_WRAPPER_CLASS,
    PIXART_WRAPPER_ONLY_LAYERS,
    build_repo_files,
    pixart_adapter_naming,
    write_pixart_adapter,
)

LORA_KEY = re.compile(r"^unet\.(.+)\.lora\.(down|up)\.weight$")
PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")

# (model, naming): (layers, file size in bytes). SDXL's and SD3's sizes are the hub's (REFERENCE §1b); SD1.5's and
# PixArt's are what these layouts give, in line with the hub's rounded ~102 MB and ~221 MB.
REAL_FILES = {
    ("sdxl", "wrapper"): (560, 371_758_976),
    ("sd15", "wrapper"): (128, 102_078_152),
    ("sd3", "wrapper"): (222, 350_646_280),
    ("pixart", "wrapper"): (293, 221_407_288),
    ("pixart", "diffusers"): (291, 221_046_384),
}
HUB_MEGABYTES = {"sd15": 102, "pixart": 221}


def _adapter_file(root, key):
    return root / MODELS[key].adapter.id / real_size.weights_name(key)


def _lora_modules(model) -> dict[str, torch.nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _attention_projections(model) -> set[str]:
    """Every to_q / to_k / to_v / to_out.0 of every diffusers Attention module: the Flash UNet LoRAs' layer set."""
    from diffusers.models.attention_processor import Attention

    return {
        f"{name}.{projection}"
        for name, module in model.named_modules()
        if isinstance(module, Attention)
        for projection in ATTENTION_PROJECTIONS
    }


def _sd3_expected_layers(config: dict) -> set[str]:
    """Flash SD3's layers, written out: peft's suffix matching of the 12 targets on SD3Transformer2DModel."""
    layers = {"pos_embed.proj", "norm_out.linear", "proj_out"} | {
        f"time_text_embed.{embedder}.{linear}"
        for embedder in ("timestep_embedder", "text_embedder")
        for linear in ("linear_1", "linear_2")
    }
    last = config["num_layers"] - 1
    for i in range(config["num_layers"]):
        block = f"transformer_blocks.{i}"
        layers |= {f"{block}.attn.{p}" for p in ATTENTION_PROJECTIONS}
        layers |= {f"{block}.{name}" for name in ("ff.net.0.proj", "ff.net.2", "norm1.linear", "norm1_context.linear")}
        if i != last:  # the last block is context_pre_only: no ff_context
            layers.add(f"{block}.ff_context.net.0.proj")
    return layers


def _pixart_expected_layers(config: dict, naming: str) -> set[str]:
    layers = {"pos_embed.proj", "caption_projection.linear_1", "caption_projection.linear_2", "adaln_single.linear",
              "proj_out"}  # fmt: skip
    for i in range(config["num_layers"]):
        block = f"transformer_blocks.{i}"
        layers |= {f"{block}.{attn}.{p}" for attn in ("attn1", "attn2") for p in ATTENTION_PROJECTIONS}
        layers |= {f"{block}.ff.net.0.proj", f"{block}.ff.net.2"}
    return layers | set(PIXART_WRAPPER_ONLY_LAYERS if naming == "wrapper" else PIXART_DIFFUSERS_ONLY_LAYERS)


# --- the tiny fixtures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["sdxl", "sd15"])
def test_tiny_lora_files_are_in_the_real_format(tiny_weights, key):
    from diffusers import UNet2DConditionModel

    path = _adapter_file(tiny_weights, key)
    header, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    assert {info["dtype"] for info in header.values()} == {"F32"}
    assert all(LORA_KEY.match(k) for k in header), [k for k in header if not LORA_KEY.match(k)]  # no alpha, no TE
    rank = FLASH_LORA_RANK[key]
    for name, info in header.items():
        assert (info["shape"][0] if name.endswith(".down.weight") else info["shape"][1]) == rank, name
    unet = UNet2DConditionModel.from_pretrained(tiny_weights / MODELS[key].base.id, subfolder="unet", variant="fp16")
    assert file_layers(path) == _attention_projections(unet)
    assert len(header) == 2 * len(file_layers(path))


@pytest.mark.parametrize("key", ["sdxl", "sd15"])
def test_diffusers_loads_every_layer_of_the_tiny_lora_files(tiny_weights, key):
    pipe = base_pipeline(key, tiny_weights)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(tiny_weights / MODELS[key].adapter.id, adapter_name="flash")
    held = file_layers(_adapter_file(tiny_weights, key))
    assert set(_lora_modules(pipe.unet)) == held
    for module in _lora_modules(pipe.unet).values():
        assert module.scaling == {"flash": 1.0}  # no alpha in the file: alpha = rank
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    changed = {k.removesuffix(".weight") for k in before if not torch.equal(before[k], after[k])}
    assert changed == held  # every layer of the file changed its weight (randomised: not a no-op)


def test_tiny_sd3_adapter_holds_exactly_the_layers_peft_matches_on_sd3(tiny_weights):
    from diffusers import SD3Transformer2DModel

    folder = tiny_weights / MODELS["sd3"].adapter.id
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (64, 8, sorted(FLASH_PEFT_TARGETS))
    header, metadata = read_header(folder / "adapter_model.safetensors")
    assert metadata == {"format": "pt"} and {i["dtype"] for i in header.values()} == {"F32"}
    assert all(PEFT_KEY.match(k) for k in header)
    transformer = SD3Transformer2DModel.from_pretrained(tiny_weights / MODELS["sd3"].base.id, subfolder="transformer")
    held = file_layers(folder / "adapter_model.safetensors")
    assert held == _sd3_expected_layers(transformer.config)
    for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.net.2", "context_embedder"):
        assert not any(layer.endswith(name) for layer in held), name
    assert header["base_model.model.pos_embed.proj.lora_A.weight"]["shape"] == [64, 16, 2, 2]  # a Conv2d's LoRA

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(transformer, folder)
    assert not [w for w in caught if "adapter keys" in str(w.message)]
    assert set(_lora_modules(model)) == held


@pytest.fixture(scope="module")
def pixart_adapters(tiny_weights, tmp_path_factory):
    """{naming: adapter folder}: the tiny PixArt repo's own adapter (wrapper naming) and the diffusers-named one."""
    diffusers_named = tmp_path_factory.mktemp("flash-pixart-diffusers")
    write_pixart_adapter(diffusers_named, naming="diffusers")
    return {"wrapper": tiny_weights / MODELS["pixart"].adapter.id, "diffusers": diffusers_named}


@pytest.mark.parametrize("naming", ["wrapper", "diffusers"])
def test_tiny_pixart_adapters_attach_all_but_the_wrapper_only_layers(tiny_weights, pixart_adapters, naming):
    from diffusers import PixArtTransformer2DModel

    folder = pixart_adapters[naming]
    assert pixart_adapter_naming(folder) == naming
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (64, 8, sorted(FLASH_PEFT_TARGETS))
    assert (config["auto_mapping"]["base_model_class"] == PIXART_WRAPPER_CLASS) == (naming == "wrapper")
    base = tiny_weights / MODELS["pixart"].base.id
    transformer = PixArtTransformer2DModel.from_pretrained(base, subfolder="transformer")
    held = file_layers(folder / "adapter_model.safetensors")
    assert held == _pixart_expected_layers(transformer.config, naming)

    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(transformer, folder)
    attached = held & set(_lora_modules(model))
    foreign = set(PIXART_WRAPPER_ONLY_LAYERS) if naming == "wrapper" else set()
    assert attached == held - foreign  # held − 8 wrapper-only layers with the wrapper naming, all otherwise
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    if naming == "wrapper":
        # peft injects by the config's target names, so diffusers' own embedders get a LoRA the file lacks (left
        # at B = 0) and warns about those; the 8 wrapper-only layers of the file it drops without a word.
        assert len(missing) == 1
        assert all(layer in missing[0] for layer in PIXART_DIFFUSERS_ONLY_LAYERS)
        assert not any(f"{layer}.lora" in missing[0] for layer in PIXART_WRAPPER_ONLY_LAYERS)
    else:
        assert not missing
    merged = model.merge_and_unload().state_dict()
    changed = {k.removesuffix(".weight") for k in before if not torch.equal(before[k], merged[k])}
    assert changed == attached


def test_the_two_pixart_namings_agree_on_every_layer_they_share(pixart_adapters):
    files = {naming: folder / "adapter_model.safetensors" for naming, folder in pixart_adapters.items()}
    with safe_open(files["wrapper"], "pt") as wrapper, safe_open(files["diffusers"], "pt") as diffusers_named:
        shared = set(wrapper.keys()) & set(diffusers_named.keys())
        assert len(shared) == 2 * (len(file_layers(files["wrapper"])) - len(PIXART_WRAPPER_ONLY_LAYERS))
        for key in shared:
            assert torch.equal(wrapper.get_tensor(key), diffusers_named.get_tensor(key)), key


def test_pixart_adapter_naming_is_chosen_and_rebuilt_as_asked(tiny_weights, pixart_adapters, tmp_path):
    # The helper writes the same bytes as the repo build for the same seed and naming.
    write_pixart_adapter(tmp_path / "again", naming="wrapper")
    for name in MODELS["pixart"].adapter.files:
        assert (tmp_path / "again" / name).read_bytes() == (pixart_adapters["wrapper"] / name).read_bytes()
    with pytest.raises(ValueError, match="PixArt adapter only"):
        build_repo_files(tmp_path, "sdxl", adapter_naming="diffusers")
    with pytest.raises(ValueError, match="adapter_naming must be one of"):
        build_repo_files(tmp_path, "pixart", adapter_naming="jasper")
    root = tmp_path / "weights"
    build_repo_files(root, "pixart", adapter_naming="diffusers")
    adapter = root / MODELS["pixart"].adapter.id
    assert pixart_adapter_naming(adapter) == "diffusers"
    for name in MODELS["pixart"].adapter.files:
        assert (adapter / name).read_bytes() == (pixart_adapters["diffusers"] / name).read_bytes()
    build_repo_files(root, "pixart")  # the default naming differs: rebuilt
    assert pixart_adapter_naming(adapter) == "wrapper"


# --- the real configs ------------------------------------------------------------------------------------

# sha256 and size of the hub's own files (testkit/real_configs/SOURCES.md).
HUB_CONFIG_FILES = {
    "sdxl": (1680, "30ebc70750223e59006f7f2b4e1e6c102570aa19a9c4ae3e1fbe7591332dbae6"),
    "sd15": (743, "78f474de6bab3d893868f37be97b636ae65c0df3073ed3256ca458ff599b5f96"),
}


@pytest.mark.parametrize("key", sorted(HUB_CONFIG_FILES))
def test_committed_unet_configs_are_the_hub_files_byte_for_byte(key):
    data = (real_size.REAL_CONFIGS / real_size.DENOISER_CONFIGS[key]).read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == HUB_CONFIG_FILES[key]


@pytest.mark.parametrize("key", list(MODELS))
def test_the_meta_denoisers_are_the_real_models_and_hold_no_memory(key):
    model = meta_denoiser(key)
    expected = {"sdxl": "UNet2DConditionModel", "sd15": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel",
                "pixart": "PixArtTransformer2DModel"}[key]  # fmt: skip
    assert type(model).__name__ == expected
    assert {p.device.type for p in model.parameters()} == {"meta"}
    config = real_config(key)
    if key == "pixart":
        assert model.config.num_layers == config["num_layers"] == 28 and model.use_additional_conditions
    elif key == "sd3":
        assert model.config.pos_embed_max_size == 192 and len(model.transformer_blocks) == 24


# --- real-size files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    """real_files(key, naming): the real-size sparse adapter folder, written once per module."""
    root = tmp_path_factory.mktemp("real-size")
    written = {}

    def get(key, naming="wrapper"):
        if (key, naming) not in written:
            written[key, naming] = write_real_size_adapter(key, root / f"{key}-{naming}", naming)
        return written[key, naming]

    return get


def test_the_header_is_what_safetensors_itself_writes():
    shapes = {"unet.b.lora.up.weight": (5, 3), "unet.a.lora.down.weight": (3, 7), "x.lora_A.weight": (2, 1, 2, 2)}
    raw = safetensors_save({k: torch.zeros(s) for k, s in shapes.items()}, metadata={"format": "pt"})
    header = safetensors_header(shapes, {"format": "pt"})
    assert raw == header + bytes(len(raw) - len(header))


@pytest.mark.parametrize(("key", "naming"), sorted(REAL_FILES))
def test_real_size_files_have_the_real_layer_counts_and_sizes(real_files, key, naming):
    path = real_files(key, naming)
    layers, size = REAL_FILES[key, naming]
    assert len(file_layers(path)) == layers
    assert os.path.getsize(path) == size
    if key in HUB_MEGABYTES:
        assert round(size / 1e6) == HUB_MEGABYTES[key]
    assert os.stat(path).st_blocks * 512 < 1 << 20  # sparse: the data region takes no disk
    with safe_open(path, "pt") as f:  # safetensors accepts it (it checks the data region's length)
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    header, _ = read_header(path)
    assert keys == set(header) and len(keys) == 2 * layers
    if real_size.is_peft(key):
        config = LoraConfig.from_pretrained(path.parent)  # today's peft reads the peft 0.9-style config
        assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (64, 8, sorted(FLASH_PEFT_TARGETS))


@pytest.mark.parametrize("key", ["sdxl", "sd15"])
def test_real_size_lora_layer_sets_are_every_attention_projection(real_files, key):
    layers = file_layers(real_files(key))
    assert layers == _attention_projections(meta_denoiser(key))
    header, _ = read_header(real_files(key))
    rank = FLASH_LORA_RANK[key]
    assert {info["shape"][0] for k, info in header.items() if k.endswith("down.weight")} == {rank}


def test_real_size_sd3_and_pixart_layer_sets_follow_peft_suffix_matching(real_files):
    assert file_layers(real_files("sd3")) == _sd3_expected_layers(real_config("sd3"))
    for naming in ("wrapper", "diffusers"):
        assert file_layers(real_files("pixart", naming)) == _pixart_expected_layers(real_config("pixart"), naming)
    header, _ = read_header(real_files("sd3"))
    assert header["base_model.model.pos_embed.proj.lora_A.weight"]["shape"] == [64, 16, 2, 2]
    assert header["base_model.model.pos_embed.proj.lora_B.weight"]["shape"] == [1536, 64, 1, 1]
    wrapper, _ = read_header(real_files("pixart", "wrapper"))
    # Jasper's AdaLN: add_embedding.i is a TimestepEmbedding(256 -> 1152 // 3) (flash/models/transformers/utils.py).
    assert wrapper["base_model.model.adaln_single.add_embedding.2.linear_1.lora_A.weight"]["shape"] == [64, 256]
    assert wrapper["base_model.model.adaln_single.add_embedding.2.linear_2.lora_B.weight"]["shape"] == [384, 64]
    assert wrapper["base_model.model.adaln_single.timestep_embedder.linear_2.lora_B.weight"]["shape"] == [1152, 64]


# --- attaching at real size with the real loaders ---------------------------------------------------------


@pytest.mark.parametrize("key", ["sdxl", "sd15"])
def test_diffusers_attaches_every_layer_of_the_real_size_lora_file(real_files, key):
    """The pipeline class's own path (lora_state_dict, then load_lora_into_unet → UNet.load_lora_adapter), on
    the real UNet on the meta device, the state dict built from the file's header (meta tensors)."""
    import diffusers

    pipeline_class = getattr(diffusers, MODELS[key].pipeline)
    path = real_files(key)
    unet = meta_denoiser(key)
    state_dict, network_alphas = pipeline_class.lora_state_dict(meta_state_dict(path))
    assert network_alphas is None and all(k.startswith("unet.") for k in state_dict)  # no text-encoder layers
    pipeline_class.load_lora_into_unet(state_dict, network_alphas, unet, adapter_name="flash", low_cpu_mem_usage=True)
    header, _ = read_header(path)
    attached = _lora_modules(unet)
    assert set(attached) == file_layers(path)  # held = attached
    for name, module in attached.items():
        assert list(module.lora_A["flash"].weight.shape) == header[f"unet.{name}.lora.down.weight"]["shape"]
        assert list(module.lora_B["flash"].weight.shape) == header[f"unet.{name}.lora.up.weight"]["shape"]
        assert module.scaling["flash"] == 1.0
        assert module.lora_A["flash"].weight.device.type == "meta"  # nothing was allocated


@pytest.fixture
def header_only_peft_weights(monkeypatch):
    """PeftModel.from_pretrained reads the adapter's header only (meta tensors) instead of its data."""
    import peft.peft_model

    def load_peft_weights(model_id, device=None, **kwargs):
        return meta_state_dict(os.path.join(model_id, "adapter_model.safetensors"))

    monkeypatch.setattr(peft.peft_model, "load_peft_weights", load_peft_weights)


@pytest.mark.parametrize(("key", "naming"), [("sd3", "wrapper"), ("pixart", "wrapper"), ("pixart", "diffusers")])
def test_peft_attaches_the_real_size_adapters(real_files, header_only_peft_weights, key, naming):
    """The card's PeftModel.from_pretrained on the real transformer (meta device): SD3 and the diffusers-named
    PixArt adapter attach every layer; the wrapper-named PixArt adapter all but the 8 wrapper-only ones."""
    path = real_files(key, naming)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(meta_denoiser(key), path.parent, adapter_name="flash", low_cpu_mem_usage=True)
    held = file_layers(path)
    injected = _lora_modules(model)
    foreign = set(PIXART_WRAPPER_ONLY_LAYERS) if naming == "wrapper" and key == "pixart" else set()
    attached = held & set(injected)
    assert attached == held - foreign
    assert len(attached) == REAL_FILES[key, naming][0] - len(foreign)
    header, _ = read_header(path)
    for name in attached:
        file_shape = header[f"base_model.model.{name}.lora_A.weight"]["shape"]
        assert list(injected[name].lora_A["flash"].weight.shape) == file_shape
    missing = " ".join(str(w.message) for w in caught if "missing adapter keys" in str(w.message))
    if foreign:
        # Injected from the config's target names but absent from the file: diffusers' own AdaLN embedders.
        assert set(injected) - held == set(PIXART_DIFFUSERS_ONLY_LAYERS)
        assert all(layer in missing for layer in PIXART_DIFFUSERS_ONLY_LAYERS)
        assert not any(f"{layer}.lora" in missing for layer in PIXART_WRAPPER_ONLY_LAYERS)  # dropped silently
    else:
        assert set(injected) == held and not missing


def test_the_two_pixart_namings_differ_only_in_the_adaln_embedders(real_files):
    wrapper = file_layers(real_files("pixart", "wrapper"))
    diffusers_named = file_layers(real_files("pixart", "diffusers"))
    assert wrapper - diffusers_named == set(PIXART_WRAPPER_ONLY_LAYERS)
    assert diffusers_named - wrapper == set(PIXART_DIFFUSERS_ONLY_LAYERS)


@pytest.mark.parametrize(("key", "naming"), sorted(REAL_FILES))
def test_the_product_check_passes_every_layer_of_the_real_size_files(real_files, key, naming):
    """flashsd.adapter's own parser and fit check, on the real key set and shapes against the real denoiser: every
    layer fits, PixArt's 8 wrapper-only layers are the only ones skipped, and a wrong base model is refused."""
    from flashsd.adapter import AdapterError, check_fit, read_lora_layers

    path = real_files(key, naming)
    layers, _ = REAL_FILES[key, naming]
    foreign = MODELS[key].adapter_foreign_layers
    fit = check_fit(read_lora_layers(path), meta_denoiser(key), foreign=foreign)
    skipped = 8 if (key, naming) == ("pixart", "wrapper") else 0
    assert len(fit.modules) == layers - skipped and len(fit.foreign) == skipped
    assert set(fit.modules) | set(fit.foreign) == file_layers(path)
    other = {"sdxl": "sd15", "sd15": "sdxl", "sd3": "pixart", "pixart": "sd3"}[key]
    with pytest.raises(AdapterError, match="do not match"):
        check_fit(read_lora_layers(path), meta_denoiser(other), foreign=foreign)
