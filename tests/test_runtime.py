"""FLASHSD_DEVICE: auto / cuda / cpu, and the container's refusal to run on the CPU by accident."""

import re
import warnings

import pytest
import torch
import yaml

from flashsd import runtime
from flashsd.errors import DeviceError
from flashsd.runtime import Runtime, select_runtime
from testkit.cog_server import PROJECT_ROOT

CPU32 = Runtime(torch.device("cpu"), torch.float32)
CUDA16 = Runtime(torch.device("cuda"), torch.float16)


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """A machine whose torch sees no GPU and that has no NVIDIA driver (whatever this one has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "DRIVER_VERSION_FILE", tmp_path / "no-such-file")


def test_auto_is_the_default_and_uses_the_cpu_without_a_gpu(no_gpu):
    assert select_runtime() == CPU32
    assert select_runtime("auto") == CPU32


def test_auto_and_cuda_use_the_gpu_in_fp16_when_torch_can(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_runtime() == CUDA16
    assert select_runtime("cuda") == CUDA16


def test_cpu_is_the_cpu_even_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_runtime("cpu") == CPU32


def test_cuda_without_a_gpu_on_a_cpu_only_build_says_so(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError) as error:
        select_runtime("cuda")
    message = str(error.value)
    assert "a CPU-only build" in message
    assert "no NVIDIA driver found" in message
    assert "FLASHSD_DEVICE=cpu" in message


def test_cuda_without_a_driver_names_the_build_the_driver_it_needs_and_the_fix(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(DeviceError) as error:
        select_runtime("cuda")
    message = str(error.value)
    assert "CUDA 13.0" in message  # the build
    assert "no NVIDIA driver found" in message  # what is here
    assert "580 or newer" in message  # what it needs
    assert "host with" in message and "rebuild the image" in message and "README" in message  # what to do


def test_cuda_with_an_old_driver_reports_torchs_finding(monkeypatch, tmp_path):
    """torch only warns ("driver too old") and reports no GPU: the warning is turned into the reason."""

    def is_available():
        warnings.warn(
            "CUDA initialization: The NVIDIA driver on your system is too old (found version 12080). Please "
            "update your GPU driver by downloading and installing a new version from the URL: "
            "http://www.nvidia.com/Download/index.aspx",
            UserWarning,
            stacklevel=2,
        )
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(runtime, "DRIVER_VERSION_FILE", tmp_path / "no-such-file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DeviceError) as error:
            select_runtime("cuda")
        assert select_runtime() == CPU32  # auto still falls back
    message = str(error.value)
    assert "supports CUDA up to 12.8" in message and "12080" in message
    assert "580 or newer" in message


@pytest.mark.parametrize(
    "text, version",
    [
        (
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
            "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n",
            "535.104.05",
        ),
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
            "(dvs-builder@U16-I3-B03-4-3)  Thu Jan 23 22:44:48 UTC 2025\n",
            "570.86.15",
        ),
    ],
)
def test_cuda_reads_the_driver_version_from_the_kernel_module(no_gpu, monkeypatch, tmp_path, text, version):
    driver_file = tmp_path / "version"
    driver_file.write_text(text)
    monkeypatch.setattr(runtime, "DRIVER_VERSION_FILE", driver_file)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(DeviceError) as error:
        select_runtime("cuda")
    message = str(error.value)
    assert f"NVIDIA driver {version}" in message and "CUDA 12.8" in message and "570 or newer" in message


def test_an_unlisted_cuda_version_points_to_nvidias_release_notes(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "11.8")
    with pytest.raises(DeviceError, match="NVIDIA's CUDA release notes"):
        select_runtime("cuda")


def _cog_yaml() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "cog.yaml").read_text())


def test_the_container_requires_the_gpu():
    assert "FLASHSD_DEVICE=cuda" in _cog_yaml()["environment"]


def test_the_image_gets_the_cog_sdk_the_tests_run():
    pins = re.findall(r"^cog==(\S+)\s*$", (PROJECT_ROOT / "requirements-dev.txt").read_text(), re.MULTILINE)
    assert len(pins) == 1, pins
    assert _cog_yaml()["build"]["sdk_version"] == pins[0]
