"""The ControlNet and depth-estimator fixtures are in their real repos' layouts and formats, and the real configs
they are scaled from give the hub's sizes (testkit/real_configs/SOURCES.md)."""

import hashlib
import json

import pytest
import torch
from diffusers import ControlNetModel
from safetensors import safe_open
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

from flashsd import control
from testkit.tiny_repos import CONTROLNET_REAL_CONFIGS, REAL_CONFIGS, files_under

ROWS = [(key, kind) for key, family in control.FAMILIES.items() for kind in family.controlnets]


@pytest.mark.parametrize("key, kind", ROWS)
def test_each_controlnet_repo_holds_its_listed_files_in_fp16_with_the_real_config_keys(tiny_weights, key, kind):
    repo = control.FAMILIES[key].controlnets[kind]
    assert files_under(tiny_weights / repo.id) == set(repo.files)
    with safe_open(tiny_weights / repo.id / "diffusion_pytorch_model.fp16.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    written = json.loads((tiny_weights / repo.id / "config.json").read_text())
    real = json.loads(CONTROLNET_REAL_CONFIGS[(key, kind)].read_text())
    assert written.keys() == real.keys() and written["_class_name"] == "ControlNetModel"


@pytest.mark.parametrize("key, kind", ROWS)
def test_the_tiny_controlnets_act(tiny_weights, key, kind):
    """A fresh ControlNet's zero convolutions make it a no-op: the fixtures' are randomised."""
    repo = control.FAMILIES[key].controlnets[kind]
    net = ControlNetModel.from_pretrained(tiny_weights / repo.id, variant="fp16")
    assert all(block.weight.abs().sum() > 0 for block in [*net.controlnet_down_blocks, net.controlnet_mid_block])


def test_the_depth_estimator_repo_has_the_real_processor_config_and_a_scaled_down_real_config(tiny_weights):
    folder = tiny_weights / control.DEPTH_ESTIMATOR.id
    assert files_under(folder) == set(control.DEPTH_ESTIMATOR.files)
    processor = (folder / "preprocessor_config.json").read_bytes()
    assert len(processor) == 775  # the hub's size of the real file
    assert processor == (REAL_CONFIGS / "depth-anything" / "preprocessor_config.json").read_bytes()
    assert hashlib.sha256(processor).hexdigest().startswith("d41175c0")
    tiny, real = (
        json.loads(p.read_text()) for p in (folder / "config.json", REAL_CONFIGS / "depth-anything/config.json")
    )
    assert real.keys() <= tiny.keys() and real["backbone_config"].keys() <= tiny["backbone_config"].keys()
    assert tiny["patch_size"] == real["patch_size"] == 14 and tiny["reassemble_factors"] == real["reassemble_factors"]
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # the real file is fp32 only


def test_the_real_depth_config_gives_depth_anything_v2_smalls_parameter_count():
    config = DepthAnythingConfig.from_dict(json.loads((REAL_CONFIGS / "depth-anything/config.json").read_text()))
    with torch.device("meta"):
        model = DepthAnythingForDepthEstimation(config)
    parameters = sum(p.numel() for p in model.state_dict().values())
    assert round(parameters / 1e6, 1) == 24.8  # the hub's "24.8M params"
    # model.safetensors is 99,173,660 bytes (fp32): the parameters plus a header of a few tens of kB
    assert 0 < 99_173_660 - 4 * parameters < 50_000


@pytest.mark.parametrize("key, kind, hub_gb", [("sdxl", "canny", 2.5), ("sdxl", "depth", 2.5), ("sd15", "canny", 0.723),
                                               ("sd15", "depth", 0.723)])  # fmt: skip
def test_the_real_controlnet_configs_give_the_hubs_fp16_file_sizes(key, kind, hub_gb):
    config = json.loads(CONTROLNET_REAL_CONFIGS[(key, kind)].read_text())
    with torch.device("meta"):
        net = ControlNetModel.from_config(config)
    fp16_gb = 2 * sum(p.numel() for p in net.state_dict().values()) / 1e9
    assert abs(fp16_gb - hub_gb) / hub_gb < 0.01, fp16_gb  # the tree pages' rounded sizes
