"""Faults inside the worker, in process: out of memory, cancellation, over-long prompts, bad weights, revoked tokens.

The Cog HTTP server runs the predictor in a separate worker process, where nothing can be injected; here the
same Predictor (setup() and predict(), as coglet calls them) and Engine run in this process, with errors raised
from forward hooks exactly where a CUDA allocation would fail. tests/test_robustness_http.py checks the same
contract through the real server.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import re
import shutil
import struct
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flashsd import cog_files, recovery
from flashsd.download import download
from flashsd.engine import Engine
from flashsd.errors import InputError, WeightsError
from flashsd.models import MODELS
from flashsd.recovery import OutOfMemory, is_out_of_memory
from flashsd.request import MAX_PROMPT_CHARS, build_request
from flashsd.runtime import Runtime
from flashsd.weights import safetensors_problem
from testkit.fake_hub import FakeHub, _Handler, closed_port
from testkit.fake_model import ADAPTER_FILES, ADAPTER_REV, BASE_REV, Log, tiny_model
from testkit.predictors import predictor_inputs
from testkit.weight_files import adapter_file, copy_model, denoiser_file, truncate

CPU32 = Runtime(torch.device("cpu"), torch.float32)
SMALL = dict(aspect_ratio="custom", width=64, height=64)
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which 3.19 GiB "
    "is free."
)


# -- helpers -----------------------------------------------------------------------------------------------------


def new_predictor(monkeypatch, root: Path, key: str):
    from predict import Predictor

    monkeypatch.setenv("FLASHSD_WEIGHTS", str(root))
    monkeypatch.setenv("FLASHSD_MODEL", key)
    predictor = Predictor()
    predictor.setup()
    return predictor


class Loaded:
    """A set-up predictor for one model, shared by a module; outputs go to a private temporary folder."""

    def __init__(self, predictor, tmp: Path):
        self.predictor = predictor
        self.engine = predictor.engine
        self.tmp = tmp

    def predict(self, **inputs):
        previous = tempfile.tempdir
        tempfile.tempdir = str(self.tmp)
        try:
            inputs = predictor_inputs(type(self.predictor), **(SMALL | {"prompt": "a lighthouse at dawn"} | inputs))
            return asyncio.run(self.predictor.predict(**inputs))
        finally:
            tempfile.tempdir = previous

    def pixels(self, **inputs) -> list[np.ndarray]:
        return [np.asarray(Image.open(path).convert("RGB")) for path in self.predict(output_format="png", **inputs)]

    def output_files(self) -> list[Path]:
        return sorted(p for p in self.tmp.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def loaded(tiny_weights, tmp_path_factory):
    cache: dict[str, Loaded] = {}
    patch = pytest.MonkeyPatch()

    def get(key: str) -> Loaded:
        if key not in cache:
            cache[key] = Loaded(new_predictor(patch, tiny_weights, key), tmp_path_factory.mktemp(f"out-{key}"))
        return cache[key]

    yield get
    patch.undo()


def hook_state(engine) -> dict[str, int]:
    """How many hooks each component carries (what a test's own hooks must leave as they found)."""
    counts = {}
    for name, component in engine.pipe.components.items():
        if isinstance(component, torch.nn.Module):
            counts[name] = sum(
                len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in component.modules()
            )
    return counts


class FailOnCall:
    """A forward pre-hook that raises `error` on the n-th call, keeping only a weak reference to its input."""

    def __init__(self, error: BaseException, on_call: int = 2, before=None):
        self.error, self.on_call, self.before = error, on_call, before
        self.calls = 0
        self.seen: weakref.ref | None = None

    def __call__(self, module, args, kwargs):
        self.calls += 1
        if self.calls == self.on_call:
            tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            self.seen = weakref.ref(tensor) if tensor is not None else None
            if self.before:
                self.before()
            raise self.error


def hooked(module: torch.nn.Module, hook: FailOnCall):
    return module.register_forward_pre_hook(hook, with_kwargs=True)


# -- out of memory -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError(CUDA_OOM),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        MemoryError(),
    ],
    ids=["cuda-oom", "cuda-error", "cpu-allocator", "cublas", "memoryerror"],
)
def test_allocation_failures_are_recognised(error):
    assert is_out_of_memory(error)


def test_other_errors_are_not_taken_for_out_of_memory():
    for error in (RuntimeError("size mismatch"), ValueError("out of range"), KeyboardInterrupt()):
        assert not is_out_of_memory(error)


@pytest.mark.parametrize("key", ["sdxl", "sd3"])
def test_out_of_memory_mid_denoising_says_what_to_lower_frees_memory_and_the_next_prediction_is_unchanged(loaded, key):
    run = loaded(key)
    baseline = run.pixels(seed=7)
    hooks_before = hook_state(run.engine)
    denoiser = getattr(run.engine.pipe, run.engine.model.denoiser)
    fail = FailOnCall(torch.cuda.OutOfMemoryError(CUDA_OOM), on_call=2)  # the second denoising step
    handle = hooked(denoiser, fail)
    gc.disable()  # the only collection is the one the recovery makes: the test must not free memory for it
    try:
        with pytest.raises(OutOfMemory) as caught:
            run.predict(seed=7, num_outputs=3, aspect_ratio="custom", width=128, height=96)
        freed_by_the_recovery = fail.seen is not None and fail.seen() is None
    finally:
        gc.enable()
        handle.remove()
    assert freed_by_the_recovery, "the failed call's activations are still referenced after the out-of-memory error"

    message = str(caught.value)
    assert isinstance(caught.value, InputError)  # the user's to fix: Cog reports it as a failed prediction
    assert message.startswith("Out of memory generating 3 image(s) at 128x96")
    assert "num_outputs (it is 3" in message and "the size (it is 128x96" in message and "aspect_ratio" in message
    assert "CUDA out of memory" not in message and "Traceback" not in message
    assert hook_state(run.engine) == hooks_before
    scheduler = run.engine.pipe.scheduler
    assert getattr(scheduler, "_generators", None) is None
    after = run.pixels(seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(after, baseline, strict=True))


def test_out_of_memory_message_names_guidance_when_it_doubles_the_batch():
    request = build_request(
        MODELS["sdxl"],
        prompt="x",
        negative_prompt="blurry",
        guidance_scale=3,
        num_outputs=1,
        aspect_ratio="custom",
        width=2048,
        height=2048,
    )
    message = recovery.out_of_memory_message(request, torch.device("cuda"))
    assert message.startswith("Out of GPU memory generating 1 image(s) at 2048x2048")
    assert "4.2 megapixels" in message and "guidance_scale to 1 or less" in message
    assert "num_outputs" not in message  # already 1: nothing to lower there


def test_a_component_cast_before_an_out_of_memory_error_is_restored(loaded):
    """diffusers upcasts a float16 VAE to float32 for decoding (upcast_vae) and casts it back afterwards; an
    out-of-memory error in between would leave it upcast. Simulated here by a cast then the error."""
    run = loaded("sdxl")
    baseline = run.pixels(seed=11)
    vae = run.engine.pipe.vae
    dtype = next(vae.parameters()).dtype
    fail = FailOnCall(RuntimeError("CUDA error: out of memory"), on_call=1, before=lambda: vae.to(torch.float64))
    handle = hooked(vae.decoder, fail)
    try:
        with pytest.raises(OutOfMemory, match="Out of memory generating 1 image"):
            run.predict(seed=11)
    finally:
        handle.remove()
    assert {p.dtype for p in vae.parameters()} == {dtype}
    assert all(np.array_equal(a, b) for a, b in zip(run.pixels(seed=11), baseline, strict=True))


def test_other_errors_propagate_unchanged_and_the_engine_is_restored(loaded):
    run = loaded("sdxl")
    baseline = run.pixels(seed=5)
    denoiser = run.engine.pipe.unet
    handle = hooked(denoiser, FailOnCall(ValueError("a bug"), on_call=2))
    try:
        with pytest.raises(ValueError, match="a bug"):
            run.predict(seed=5)
    finally:
        handle.remove()
    assert all(np.array_equal(a, b) for a, b in zip(run.pixels(seed=5), baseline, strict=True))


@pytest.mark.parametrize("key", ["sd15", "sd3"])  # LCMScheduler, the Flash flow-match scheduler
def test_a_failure_mid_way_through_an_image_to_image_call_leaves_the_next_calls_unchanged(loaded, tmp_path, key):
    """The scheduler is left part-way (image-to-image starts at a begin index; the failure lands after a step):
    the next calls, text-to-image and image-to-image, run their whole schedule as before."""
    run = loaded(key)
    image = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (200, 120, 40)).save(image)
    from_image = dict(seed=4, image=image, prompt_strength=0.8)  # 3 of the 4 steps: begin index 1
    baseline, baseline_from_image = run.pixels(seed=4), run.pixels(**from_image)
    denoiser = getattr(run.engine.pipe, run.engine.model.denoiser)
    handle = hooked(denoiser, FailOnCall(ValueError("a bug"), on_call=3))  # after the first two steps
    try:
        with pytest.raises(ValueError, match="a bug"):
            run.predict(**from_image)
    finally:
        handle.remove()
    assert all(np.array_equal(a, b) for a, b in zip(run.pixels(seed=4), baseline, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(run.pixels(**from_image), baseline_from_image, strict=True))


# -- cancellation ------------------------------------------------------------------------------------------------


def cancelation():
    from coglet import CancelationException

    return CancelationException()


def test_cancellation_between_denoising_steps_propagates_and_the_next_prediction_is_unchanged(loaded):
    run = loaded("sd3")  # the Flash scheduler holds per-call noise generators
    baseline = run.pixels(seed=3, num_outputs=2)
    files = run.output_files()
    handle = hooked(run.engine.pipe.transformer, FailOnCall(cancelation(), on_call=2))
    try:
        with pytest.raises(BaseException) as caught:
            run.predict(seed=3, num_outputs=2)
    finally:
        handle.remove()
    assert type(caught.value).__name__ == "CancelationException"  # not turned into a failure
    assert run.output_files() == files  # nothing written
    assert run.engine.pipe.scheduler._generators is None
    assert all(np.array_equal(a, b) for a, b in zip(run.pixels(seed=3, num_outputs=2), baseline, strict=True))


def test_cancellation_while_writing_the_images_leaves_no_partial_files(loaded, monkeypatch):
    import flashsd.images as images

    run = loaded("sdxl")
    run.predict(seed=1)  # its files were delivered: the next prediction removes them when it writes its own
    written = []
    real = images.encode_image

    def encode_then_cancel(image, path, *args):
        written.append(real(image, path, *args))
        if len(written) == 2:
            raise cancelation()
        return written[-1]

    monkeypatch.setattr(images, "encode_image", encode_then_cancel)
    with pytest.raises(BaseException) as caught:
        run.predict(seed=2, num_outputs=3)
    assert type(caught.value).__name__ == "CancelationException"
    assert written and not any(p.exists() for p in written)
    assert run.output_files() == []
    monkeypatch.undo()
    assert len(run.predict(seed=2)) == 1


# -- over-long prompts -------------------------------------------------------------------------------------------

LONG = "a lighthouse at dawn, oil painting, highly detailed, dramatic clouds, " * 12 + "THE-END-MARKER"


def test_what_the_t5_text_encoder_cuts_off_a_long_prompt_is_logged(loaded, caplog):
    run = loaded("pixart")
    caplog.set_level(logging.WARNING, logger="flashsd")
    run.predict(prompt=LONG, seed=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "flashsd" and "tokens long" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "prompt is " in lines[0] and "T5 text encoder reads only the first 119" in lines[0]
    assert "the rest is ignored: '" in lines[0] and "marker' (" in lines[0].lower() and len(lines[0]) < 600


@pytest.mark.parametrize("key", ["sdxl", "sd3", "sd15"])
def test_clip_models_read_a_long_prompt_whole_in_chunks_and_log_no_cut(loaded, caplog, key):
    caplog.set_level(logging.INFO, logger="flashsd")
    loaded(key).predict(prompt=LONG, seed=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "flashsd"]
    assert not [line for line in lines if "tokens long" in line]
    assert [line for line in lines if line.startswith("prompt: ") and " chunk(s) of up to 75" in line]


def test_a_short_prompt_logs_no_truncation(loaded, caplog):
    caplog.set_level(logging.WARNING, logger="flashsd")
    loaded("sdxl").predict(prompt="a cat on a chair", seed=1)
    assert not [r for r in caplog.records if "tokens long" in r.getMessage()]


def test_negative_prompt_truncation_is_logged_only_when_it_is_used(loaded, caplog):
    caplog.set_level(logging.WARNING, logger="flashsd")
    loaded("pixart").predict(prompt="a cat", negative_prompt=LONG, guidance_scale=1, seed=1)
    assert not any(r.getMessage().startswith("negative_prompt is ") for r in caplog.records)
    loaded("pixart").predict(prompt="a cat", negative_prompt=LONG, guidance_scale=2, seed=1)
    assert any(r.getMessage().startswith("negative_prompt is ") for r in caplog.records)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_huge_prompt_is_refused_at_once_with_its_length_and_the_limit(field):
    text = "日本語 " * 25_000  # 100 000 characters
    inputs = {"prompt": "a cat", field: text, "guidance_scale": 2}
    with pytest.raises(
        InputError, match=rf"^{field} is 100000 characters long; at most {MAX_PROMPT_CHARS} are accepted"
    ):
        build_request(MODELS["sdxl"], **inputs)
    build_request(MODELS["sdxl"], **{**inputs, field: "x" * MAX_PROMPT_CHARS})


def test_the_longest_prompts_in_any_script_fit_in_jpeg_metadata(loaded):
    """4-byte characters are the worst case for the EXIF UserComment (UTF-16); JPEG segments hold 64 kB."""
    worst = "\U0001f600" * MAX_PROMPT_CHARS
    paths = loaded("sd15").predict(prompt=worst, negative_prompt=worst, guidance_scale=2, output_format="jpg", seed=1)
    assert Image.open(paths[0]).getexif()


# -- bad weights -------------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """No hub: ensure_weights must fail at once instead of fetching."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")


def scramble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


def append_garbage(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0garbage")


def rename_adapter_keys(path: Path) -> None:
    tensors = load_file(path)
    save_file({k.replace("blocks.", "nowhere."): v for k, v in tensors.items()}, path)


DAMAGE = {
    "truncated": (truncate, r"truncated: \d+ bytes, its header needs \d+"),
    "scrambled header": (scramble_header, r"its header is not valid JSON"),
    "bytes appended": (append_garbage, r"8 unexpected bytes after the last tensor"),
}


def setup_error(monkeypatch, root: Path, key: str) -> str:
    with pytest.raises(WeightsError) as caught:
        new_predictor(monkeypatch, root, key)
    return str(caught.value)


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_weight_file_fails_setup_naming_it_and_the_fix(
    tiny_weights, tmp_path, monkeypatch, offline, key, damage
):
    root = copy_model(tiny_weights, tmp_path, key)
    broken = denoiser_file(root, key)
    breaker, expected = DAMAGE[damage]
    breaker(broken)
    message = setup_error(monkeypatch, root, key)
    assert str(broken.relative_to(root)) in message
    assert f"scripts/download-weights --model {key} --verify" in message
    assert re.search(expected, message), message


@pytest.mark.parametrize("key", ["sd15", "sd3"])
def test_a_missing_adapter_fails_setup_naming_it_and_the_command(tiny_weights, tmp_path, monkeypatch, offline, key):
    root = copy_model(tiny_weights, tmp_path, key)
    missing = adapter_file(root, key)
    missing.unlink()
    message = setup_error(monkeypatch, root, key)
    assert str(missing.relative_to(root)) in message and f"scripts/download-weights --model {key}" in message


@pytest.mark.parametrize("key, other", [("sd15", "sdxl"), ("sdxl", "sd15"), ("sd3", "pixart"), ("pixart", "sd3")])
def test_an_adapter_of_another_model_fails_setup_naming_the_file(
    tiny_weights, tmp_path, monkeypatch, offline, key, other
):
    root = copy_model(tiny_weights, tmp_path, key)
    shutil.copyfile(adapter_file(tiny_weights, other), adapter_file(root, key))
    message = setup_error(monkeypatch, root, key)
    assert f"The Flash adapter {adapter_file(root, key)} does not fit {MODELS[key].base.id}" in message
    assert f"scripts/download-weights --model {key} --verify" in message


@pytest.mark.parametrize("key", list(MODELS))
def test_adapter_keys_that_match_no_layer_are_an_error_not_a_partial_load(
    tiny_weights, tmp_path, monkeypatch, offline, key
):
    root = copy_model(tiny_weights, tmp_path, key)
    rename_adapter_keys(adapter_file(root, key))
    message = setup_error(monkeypatch, root, key)
    assert "does not fit" in message and "has no layer" in message and "nowhere." in message


@pytest.mark.parametrize("key", ["sdxl", "pixart"])
def test_a_pickle_only_folder_fails_setup_naming_the_missing_safetensors_and_the_pickle(
    tiny_weights, tmp_path, monkeypatch, offline, key
):
    root = copy_model(tiny_weights, tmp_path, key)
    weights = denoiser_file(root, key)
    torch.save(load_file(weights), weights.parent / "diffusion_pytorch_model.bin")
    weights.unlink()
    message = setup_error(monkeypatch, root, key)
    assert str(weights.relative_to(root)) in message and f"scripts/download-weights --model {key}" in message
    assert (
        f"{weights.parent.relative_to(root)}/diffusion_pytorch_model.bin" in message and "never loads pickle" in message
    )


@pytest.mark.parametrize("key", list(MODELS))
def test_nothing_is_ever_unpickled_even_with_pickle_files_beside_the_safetensors(
    tiny_weights, tmp_path, unpickling, key
):
    root = copy_model(tiny_weights, tmp_path, key)
    for path in [denoiser_file(root, key), adapter_file(root, key)]:
        tensors = load_file(path)
        for name in (
            "diffusion_pytorch_model.bin",
            "pytorch_lora_weights.bin",
            "adapter_model.bin",
            "pytorch_model.bin",
        ):
            torch.save(tensors, path.parent / name)
    unpickled = unpickling
    Engine.load(MODELS[key], root, CPU32)
    assert unpickled == []


def test_safetensors_check_reads_only_the_header(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.float16)}, path)
    assert safetensors_problem(path) is None
    (tmp_path / "p.safetensors").write_bytes(pickle.dumps({"a": 1}))
    assert "not a safetensors file" in safetensors_problem(tmp_path / "p.safetensors")
    (tmp_path / "e.safetensors").write_bytes(b"")
    assert "too short" in safetensors_problem(tmp_path / "e.safetensors")
    header = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}'
    (tmp_path / "i.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert "described inconsistently" in safetensors_problem(tmp_path / "i.safetensors")


# -- downloads: what tests/test_weights.py does not cover --------------------------------------------------------

REVOKED = "hf_revokedTOKEN1234567890abcdefgh"


class RevokingHub(FakeHub):
    """The real hub answers 401 "Invalid credentials in Authorization header" to any request carrying a revoked
    or deleted token, public repos included."""

    def _serve(self, name):
        from http.server import ThreadingHTTPServer

        hub = self

        class Handler(_Handler):
            fake = hub
            server_name = name

            def _handle(self, body):
                if self.server_name == "hub" and self.headers.get("Authorization") == f"Bearer {REVOKED}":
                    return self._error(401, None, "Invalid credentials in Authorization header", body)
                return super()._handle(body)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        self._servers.append(server)
        return server


def test_a_revoked_token_on_a_public_repo_says_the_token_was_rejected_without_showing_it(
    hf_env, monkeypatch, tmp_path, base_files
):
    with RevokingHub() as hub:
        hub.add_repo("fake-org/tiny-base", BASE_REV, base_files)
        hub.add_repo("fake-org/tiny-flash", ADAPTER_REV, ADAPTER_FILES)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", REVOKED)
        log = Log()
        with pytest.raises(WeightsError) as caught:
            download(tiny_model(base_files), tmp_path / "weights", log=log)
    message = str(caught.value)
    assert "HTTP 401" in message and "token" in message and "HF_TOKEN" in message, message
    assert REVOKED not in message and REVOKED not in log.text and REVOKED[:12] not in message
    assert (
        "Traceback" not in message
        and not (tmp_path / "weights" / "fake-org" / "tiny-base" / "model_index.json").exists()
    )


# -- temporary files -----------------------------------------------------------------------------------------------


def test_input_copies_left_by_rejected_requests_are_swept_and_only_in_the_private_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    shared = tmp_path / "tmpabcd1234.png"
    shared.write_bytes(b"someone else's")
    assert cog_files.use_private_tempdir() is None  # not a Cog worker: nothing changes
    assert cog_files.sweep_input_copies() == 0 and shared.exists()  # a shared TMPDIR is never swept

    folder = cog_files.use_private_tempdir(force=True)
    assert folder.parent == tmp_path and os.environ["TMPDIR"] == str(folder) == tempfile.gettempdir()
    stale, current = folder / "tmpq1w2e3r4.png", folder / "tmpz9x8c7v6file.png"
    outputs = folder / "flashsd-abc" / "flash-sdxl-1-0a1b2c3d.webp"
    outputs.parent.mkdir()
    for path in (stale, current, outputs):
        path.write_bytes(b"x")

    assert cog_files.sweep_input_copies(keep=(current, None)) == 1
    assert not stale.exists() and current.exists() and outputs.exists() and shared.exists()
