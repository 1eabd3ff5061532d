"""Style LoRAs in process (flashsd.loras): the recipe's images, exact restore, the caches, the checks made before
anything is loaded, failures and cancellation mid-way, the metadata. LoRA files are in the formats users bring
(testkit/lora_files.py), served over loopback (testkit/lora_server.py); tests/test_loras_http.py runs the same
contract through the real Cog server.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flashsd import loras
from flashsd.engine import Engine
from flashsd.errors import InputError
from flashsd.images import write_outputs
from flashsd.loras import LoraError
from flashsd.loras.cache import FOLDER, Loaded, StateDicts
from flashsd.loras.header import Header, read_header
from flashsd.models import MODELS
from flashsd.request import build_request, parse_lora_source
from flashsd.runtime import Runtime
from testkit.fake_hub import FakeHub
from testkit.lora_files import addnet_hash, write_pickle, write_real_shaped
from testkit.lora_server import LoraServer
from testkit.pixels import max_difference
from testkit.recipes import card_pipeline, run_card
from testkit.style_loras import FILES, fresh_loras, same_weights, style, weights_of_manager

CPU32 = Runtime(torch.device("cpu"), torch.float32)
SMALL = dict(aspect_ratio="custom", width=64, height=64, disable_safety_checker=True, seed=1234)
PROMPT = "a lighthouse at dawn"


# -- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with LoraServer() as s:
        yield s


@pytest.fixture(scope="module")
def url(server, lora_file):
    def get(name: str) -> str:
        path = f"/{name}.safetensors"
        return server.add(path, lora_file(name).read_bytes()) if path not in server.routes else f"{server.url}{path}"

    return get


@pytest.fixture
def engine(engines, request):
    """A session engine, its style LoRAs removed after the test (other tests share it)."""
    used = []

    def get(key: str) -> Engine:
        e = engines(key)
        used.append(e)
        return e

    yield get
    for e in used:
        e.loras.apply(())


def generate(engine: Engine, **inputs):
    return engine.generate(build_request(engine.model, prompt=PROMPT, **(SMALL | inputs)))


def weights_of(engine: Engine) -> dict[str, torch.Tensor]:
    """Every parameter the style LoRAs may touch, copied."""
    return {
        f"{name}.{key}": value.detach().clone()
        for name, module in engine.loras.components().items()
        for key, value in module.state_dict().items()
    }


# -- 1. the recipe's images, fused -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, scale",
    [("sd15-kohya", 0.8), ("sd15-diffusers", 1.0), ("sd15-diffusers-plain", 2.5), ("sd15-kohya", -0.7),
     ("sdxl-kohya", 1.0), ("sdxl-diffusers", 0.6), ("sd3-diffusers", 1.3), ("sd3-diffusers-plain", 1.0)],
)  # fmt: skip
def test_a_style_lora_gives_jaspers_two_adapter_recipe_within_one_level(
    engine, url, lora_file, tiny_weights, name, scale
):
    key = FILES[name][0]
    e = engine(key)
    without = generate(e)[0].image
    (styled,) = generate(e, lora_weights=url(name), lora_scale=scale)
    recipe = card_pipeline(key, tiny_weights, fuse=False, styles=[(lora_file(name), scale)])
    (reference,) = run_card(recipe, key, [1234], width=64, height=64)
    assert max_difference(styled.image, without) > 10  # the LoRA matters: the comparison below is not vacuous
    assert max_difference(styled.image, reference) <= 1


def test_two_loras_at_once_give_the_recipe_with_three_adapters(engine, url, lora_file, tiny_weights):
    e = engine("sdxl")
    (one,) = generate(e, lora_weights=url("sdxl-diffusers"), lora_scale=0.8)
    (both,) = generate(e, lora_weights=url("sdxl-diffusers"), lora_scale=0.8, extra_lora=url("sdxl-kohya"),
                       extra_lora_scale=1.5)  # fmt: skip
    styles = [(lora_file("sdxl-diffusers"), 0.8), (lora_file("sdxl-kohya"), 1.5)]
    recipe = card_pipeline("sdxl", tiny_weights, fuse=False, styles=styles)
    (reference,) = run_card(recipe, "sdxl", [1234], width=64, height=64)
    assert max_difference(both.image, one.image) > 10
    assert max_difference(both.image, reference) <= 1
    assert [(a.name, a.scale) for a in both.loras] == [("sdxl-diffusers", 0.8), ("sdxl-kohya", 1.5)]


def test_the_forward_pass_runs_fused_with_no_adapter_layer_left(engine, url):
    from peft.tuners.tuners_utils import BaseTunerLayer

    e = engine("sdxl")
    before = weights_of(e)
    generate(e, lora_weights=url("sdxl-kohya"), extra_lora=url("sdxl-diffusers"))
    for name, module in e.loras.components().items():
        assert not any(isinstance(m, BaseTunerLayer) for m in module.modules()), name
        assert not getattr(module, "peft_config", None), name
    changed = same_weights(before, weights_of(e))
    # the text encoders' weights changed too (both files have text-encoder layers)
    assert {k.split(".")[0] for k in changed} == {"denoiser", "text_encoder", "text_encoder_2"}


def test_a_lora_loads_the_modules_the_header_check_predicted(tiny_weights, lora_file):
    """kohya's SDXL names (SGM blocks) are resolved by flashsd.adapter to the very modules diffusers attaches to."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from flashsd.adapter import check_fit, read_lora_layers

    pipe = card_pipeline("sdxl", tiny_weights, fuse=False, styles=[(lora_file("sdxl-kohya"), 1.0)])
    layers = read_lora_layers(lora_file("sdxl-kohya"))
    assert any(module.startswith("input_blocks_") for _, module in layers)  # the SGM names are there
    for component, module in (("denoiser", pipe.unet), ("text_encoder", pipe.text_encoder),
                              ("text_encoder_2", pipe.text_encoder_2)):  # fmt: skip
        predicted = set(check_fit(layers, module, component=component).modules)
        attached = {n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer) and "style0" in m.lora_A}
        assert predicted == attached and predicted, component


# -- 2. exact restore ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_1000_random_swaps_leave_the_weights_identical_to_a_fresh_load(tiny_weights, url):
    engine = Engine.load(MODELS["sd15"], tiny_weights, CPU32)
    fresh = weights_of(Engine.load(MODELS["sd15"], tiny_weights, CPU32))
    choices = ["swap-kohya", "swap-diffusers", "swap-plain"]
    sources = {name: parse_lora_source(url(name), "lora_weights") for name in choices}
    rng = random.Random(1234)
    applied, checked = 0, 0
    for i in range(1000):
        picked = rng.sample(choices, rng.choice((0, 1, 1, 2)))
        wanted = [loras.StyleLora("lora_weights", sources[n], rng.choice((-1.0, 0.3, 1.0, 2.7))) for n in picked]
        applied += engine.loras.apply(wanted) != ()
        if i % 250 == 249:  # also in between, not only at the end
            engine.loras.apply(())
            checked += 1
            assert same_weights(fresh, weights_of(engine)) == [], f"after swap {i}"
    engine.loras.apply(())
    assert applied > 500 and checked == 4
    assert same_weights(fresh, weights_of(engine)) == []


def test_removing_a_lora_restores_every_weight_bit_for_bit(engine, url):
    e = engine("sd15")
    before = weights_of(e)
    generate(e, lora_weights=url("sd15-kohya"), lora_scale=2.7, extra_lora=url("sd15-diffusers"), extra_lora_scale=-1)
    assert same_weights(before, weights_of(e))
    generate(e)
    assert same_weights(before, weights_of(e)) == []


def test_the_same_loras_and_scales_as_the_last_prediction_cost_nothing(engine, url, monkeypatch):
    e = engine("sd15")
    generate(e, lora_weights=url("sd15-kohya"), lora_scale=0.5)
    calls = []
    monkeypatch.setattr(e.loras.pipe, "load_lora_weights", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(e.loras.disk, "fetch", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(e.loras, "restore", lambda: calls.append("restore"))
    (again,) = generate(e, lora_weights=url("sd15-kohya"), lora_scale=0.5)
    assert calls == [] and [a.scale for a in again.loras] == [0.5]


def test_another_scale_of_the_same_lora_is_the_recipe_at_that_scale(engine, url, lora_file, tiny_weights):
    e = engine("sd15")
    generate(e, lora_weights=url("sd15-kohya"), lora_scale=2.0)
    (styled,) = generate(e, lora_weights=url("sd15-kohya"), lora_scale=0.5)
    recipe = card_pipeline("sd15", tiny_weights, fuse=False, styles=[(lora_file("sd15-kohya"), 0.5)])
    (reference,) = run_card(recipe, "sd15", [1234], width=64, height=64)
    assert max_difference(styled.image, reference) <= 1


# -- 3. the caches -----------------------------------------------------------------------------------------------


def test_a_lora_is_downloaded_once_and_switching_back_reads_no_file(tmp_path, tiny_weights, lora_file):
    with LoraServer() as server:
        a = server.add("/a.safetensors", lora_file("sd15-kohya").read_bytes())
        b = server.add("/b.safetensors", lora_file("sd15-diffusers-plain").read_bytes())
        manager = fresh_loras(tmp_path, tiny_weights)
        manager.apply([style(a)])
        after_a = weights_of_manager(manager)
        manager.apply([style(b)])
        for f in (tmp_path / FOLDER).glob("*.safetensors"):  # from here on only memory can serve them
            f.unlink()
        manager.apply([style(a)])
        assert server.gets("/a.safetensors") == 1 and server.gets("/b.safetensors") == 1
        assert same_weights(after_a, weights_of_manager(manager)) == []  # the cached state dict was not altered


def test_a_new_container_finds_the_file_in_the_disk_cache(tmp_path, tiny_weights, lora_file):
    with LoraServer() as server:
        a = server.add("/a.safetensors", lora_file("sd15-kohya").read_bytes())
        fresh_loras(tmp_path, tiny_weights).apply([style(a)])
        applied = fresh_loras(tmp_path, tiny_weights).apply([style(a, 0.5)])
        assert server.gets("/a.safetensors") == 1
        assert applied[0].name == "a" and applied[0].hash == addnet_hash(lora_file("sd15-kohya"))[:12]


def test_the_disk_cache_evicts_the_least_recently_used_files_beyond_its_bound(tmp_path, tiny_weights, lora_file):
    names = ["sd15-kohya", "sd15-diffusers", "sd15-diffusers-plain", "sd15-unet-only"]
    sizes = {n: lora_file(n).stat().st_size for n in names}
    bound = sizes["sd15-kohya"] + sizes["sd15-diffusers"] + sizes["sd15-diffusers-plain"] + 1
    with LoraServer() as server:
        urls = {n: server.add(f"/{n}.safetensors", lora_file(n).read_bytes()) for n in names}
        manager = fresh_loras(tmp_path, tiny_weights, cache_bytes=bound, memory_bytes=1)  # no memory cache
        for n in ["sd15-kohya", "sd15-diffusers", "sd15-diffusers-plain", "sd15-kohya"]:  # kohya used again last
            manager.apply([style(urls[n])])
            manager.apply(())
        manager.apply([style(urls["sd15-unet-only"])])  # one must go: the least recently used
        cached = {json.loads(p.read_text())["name"] for p in (tmp_path / FOLDER).glob("*.json")}
        assert cached == {"sd15-kohya", "sd15-diffusers-plain", "sd15-unet-only"}
        assert sum(p.stat().st_size for p in (tmp_path / FOLDER).glob("*.safetensors")) <= bound
        manager.apply([style(urls["sd15-kohya"])])
        assert server.gets("/sd15-kohya.safetensors") == 1 and server.gets("/sd15-diffusers.safetensors") == 1


def test_the_memory_cache_keeps_the_most_recent_state_dicts_within_its_bound():
    cache = StateDicts(bound=250)

    def entry(nbytes: int) -> Loaded:
        return Loaded({"w": torch.zeros(1)}, Header({}, {}), "x", "", nbytes)

    for key in "abc":
        cache.put(key, entry(100))
    assert list(cache.entries) == ["b", "c"]
    cache.get("b")
    cache.put("d", entry(100))
    assert list(cache.entries) == ["b", "d"]
    cache.put("e", entry(300))  # larger than the bound: not kept, nothing evicted for it
    assert list(cache.entries) == ["b", "d"]


def test_an_interrupted_download_is_never_used_and_the_next_one_starts_afresh(tmp_path, tiny_weights, lora_file):
    data = lora_file("sd15-kohya").read_bytes()
    with LoraServer() as server:
        cut = server.add("/cut.safetensors", data, drop_after=len(data) // 2)
        manager = fresh_loras(tmp_path, tiny_weights)
        with pytest.raises(LoraError, match="interrupted after .* nothing was kept: try again"):
            manager.apply([style(cut)])
        assert list((tmp_path / FOLDER).iterdir()) == []  # no partial file, no record
        server.add("/cut.safetensors", data)
        manager.apply([style(cut)])
        assert server.gets("/cut.safetensors") == 2


# -- 4. bad LoRAs: refused before loading, the model untouched ---------------------------------------------------


@pytest.fixture
def spied(engine, monkeypatch):
    """engine(key) whose pipeline records every load_lora_weights call, with its weights before the test."""

    def get(key: str):
        e = engine(key)
        e.loras.apply(())
        calls = []
        load = e.loras.pipe.load_lora_weights
        monkeypatch.setattr(e.loras.pipe, "load_lora_weights", lambda *a, **k: (calls.append(a), load(*a, **k))[1])
        return e, calls, weights_of(e)

    return get


def bad_files(tmp_path: Path, lora_file) -> dict[str, tuple[Path, str]]:
    """(file, what the message must say) of each kind of bad file."""
    page = tmp_path / "page.safetensors"
    page.write_bytes(b"<!DOCTYPE html><html><body>Please log in</body></html>")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(lora_file("sdxl-kohya").read_bytes()[:-1000])
    empty = tmp_path / "no-layers.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, empty)
    return {
        "pickle": (write_pickle(tmp_path / "style.ckpt"), "is a pickled PyTorch file"),
        "legacy pickle": (write_pickle(tmp_path / "legacy.pt", legacy=True), "is a pickled PyTorch file"),
        "web page": (page, "sent a web page, not a LoRA file"),
        "truncated": (truncated, "is a damaged safetensors file"),
        "no layers": (empty, "holds no LoRA layer flashsd can apply"),
        "SD1.5 LoRA": (write_real_shaped(tmp_path / "sd15-real.safetensors", "sd15"), "is a LoRA for SD1.5; this model is Flash SDXL"),
        "SD3 LoRA": (write_real_shaped(tmp_path / "sd3-real.safetensors", "sd3"), "is a LoRA for SD3; this model is Flash SDXL"),
        "not fitting": (lora_file("sd15-diffusers-plain"), "does not fit Flash SDXL"),
    }  # fmt: skip


def test_bad_lora_files_are_refused_before_loading_and_the_model_is_untouched(spied, tmp_path, lora_file, unpickling):
    e, calls, before = spied("sdxl")
    unpickled = unpickling
    with LoraServer() as server:
        for kind, (path, message) in bad_files(tmp_path, lora_file).items():
            source = server.add(f"/{kind.replace(' ', '-')}", path.read_bytes())  # no extension: CivitAI-like
            with pytest.raises(LoraError) as caught:
                generate(e, lora_weights=source)
            assert message in str(caught.value) and str(caught.value).startswith("lora_weights: "), (kind, caught.value)
    assert calls == [] and unpickled == []
    assert same_weights(before, weights_of(e)) == []


def test_an_sdxl_lora_on_sd15_is_refused_naming_both_families(spied, tmp_path):
    e, calls, before = spied("sd15")
    sdxl = write_real_shaped(tmp_path / "sdxl-real.safetensors", "sdxl")
    with LoraServer() as server:
        with pytest.raises(LoraError, match="is a LoRA for SDXL; this model is Flash SD, which takes SD1.5 LoRAs"):
            generate(e, extra_lora=server.add("/sdxl", sdxl.read_bytes()))
    assert calls == [] and same_weights(before, weights_of(e)) == []


def test_a_failure_on_the_second_lora_leaves_the_first_predictions_loras_in_place(engine, url, tmp_path, lora_file):
    e = engine("sd15")
    (first,) = generate(e, lora_weights=url("sd15-kohya"))
    with LoraServer() as server:
        bad = server.add("/bad", write_pickle(tmp_path / "bad.ckpt").read_bytes())
        with pytest.raises(LoraError, match="extra_lora: .* pickled"):
            generate(e, lora_weights=url("sd15-diffusers"), extra_lora=bad)
    (again,) = generate(e, lora_weights=url("sd15-kohya"))
    assert max_difference(first.image, again.image) == 0


@pytest.mark.parametrize(
    "route, size, fault, message",
    [("/missing", 1000, dict(status=404), "answered HTTP 404 (not found)"),
     ("/private", 1000, dict(status=401), "answered HTTP 401 (not authorized)"),
     ("/busy", 1000, dict(status=503), "answered HTTP 503"),
     ("/huge", 1000, dict(announce=10**12), "is 1.00TB, more than the 2.00MB a LoRA file may have here (FLASHSD_LORA_MAX_GB)"),
     ("/huge-stream", 3_000_000, dict(chunked=True), "more than the 2.00MB a LoRA file may have here"),
     ("/stall", 1000, dict(stall=True), "answered nothing for 1 s"),
     ("/cut", 100_000, dict(drop_after=1000), "interrupted after 1.00kB of 100kB")],
)  # fmt: skip
def test_download_failures_say_what_to_do_and_leave_no_file(
    tmp_path, tiny_weights, caplog, route, size, fault, message
):
    data = b"\0" * size
    with LoraServer() as server:
        source = server.add(route, data, **fault)
        manager = fresh_loras(tmp_path, tiny_weights, max_file_bytes=2_000_000, timeout_s=1.0)
        with caplog.at_level(logging.DEBUG), pytest.raises(LoraError) as caught:
            manager.apply([style(source + "?token=secret-key-123")])
    assert message in str(caught.value), caught.value
    assert "HTTP Request: GET" in caplog.text  # httpx2's request line is there, without the key
    assert "secret-key-123" not in str(caught.value) + caplog.text
    assert [p.name for p in (tmp_path / FOLDER).iterdir()] == []


def test_an_unreachable_host_is_said_in_seconds(tmp_path, tiny_weights):
    from testkit.fake_hub import closed_port

    manager = fresh_loras(tmp_path, tiny_weights)
    with pytest.raises(LoraError, match="could not connect to 127.0.0.1"):
        manager.apply([style(f"http://127.0.0.1:{closed_port()}/style.safetensors")])


class Cancelled(BaseException):
    """Stands for coglet's CancelationException (a BaseException, raised between Python bytecodes)."""


@pytest.mark.parametrize("when", ["load", "fuse"])
def test_a_cancel_while_loading_or_fusing_restores_the_model_and_propagates(engine, url, monkeypatch, when):
    from peft.tuners.lora import layer as lora_layer

    e = engine("sdxl")
    (with_a,) = generate(e, lora_weights=url("sdxl-kohya"))
    e.loras.apply(())
    clean = weights_of(e)
    generate(e, lora_weights=url("sdxl-kohya"))
    if when == "load":
        load = e.loras.pipe.load_lora_weights

        def cancelled_after_loading(*args, **kwargs):
            load(*args, **kwargs)  # the adapter layers are in place
            raise Cancelled()

        monkeypatch.setattr(e.loras.pipe, "load_lora_weights", cancelled_after_loading)
    else:
        merge, merged = lora_layer.Linear.merge, []

        def cancelled_mid_fuse(self, safe_merge=False, adapter_names=None):  # diffusers reads this signature
            merge(self, safe_merge=safe_merge, adapter_names=adapter_names)
            merged.append(self)
            if len(merged) == 5:  # some weights fused, others not
                raise Cancelled()

        monkeypatch.setattr(lora_layer.Linear, "merge", cancelled_mid_fuse)
    with pytest.raises(Cancelled):
        generate(e, lora_weights=url("sdxl-diffusers"))
    monkeypatch.undo()
    assert e.loras.applied == () and same_weights(clean, weights_of(e)) == []  # the Flash model alone
    (again,) = generate(e, lora_weights=url("sdxl-kohya"))
    assert max_difference(with_a.image, again.image) == 0


def test_a_cancelled_prediction_stops_its_download_or_its_load_and_the_model_is_restored(engine, url, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from flashsd.errors import Stopped

    e = engine("sd15")
    clean = weights_of(e)
    with LoraServer() as server:
        slow = server.add("/slow.safetensors", b"\0" * 500_000, delay_per_chunk=0.05)
        cancelled = {"at": None}

        def stop_once_downloading() -> bool:  # the batcher's stop(): true once the prediction is cancelled
            partials = list((e.loras.disk.folder).glob(".partial-*"))
            if partials and partials[0].stat().st_size > 0:
                cancelled["at"] = partials[0]
            return cancelled["at"] is not None

        request = build_request(e.model, prompt=PROMPT, lora_weights=slow, **SMALL)
        with pytest.raises(Stopped):
            e.generate(request, stop=stop_once_downloading)
        assert cancelled["at"] is not None and not cancelled["at"].exists()  # the partial file is gone
        assert server.gets("/slow.safetensors") == 1
        # Cancelled once the layers are loaded: they come off, nothing stays fused.
        loaded = {"calls": 0}
        load = e.loras.pipe.load_lora_weights

        def counting(*args, **kwargs):
            loaded["calls"] += 1
            return load(*args, **kwargs)

        e.loras.pipe.load_lora_weights = counting
        try:
            request = build_request(e.model, prompt=PROMPT, lora_weights=url("sd15-kohya"), **SMALL)
            with pytest.raises(Stopped):
                e.generate(request, stop=lambda: loaded["calls"] > 0)
        finally:
            del e.loras.pipe.load_lora_weights
    assert loaded["calls"] == 1 and e.loras.applied == ()
    assert not any(isinstance(m, BaseTunerLayer) for c in e.loras.components().values() for m in c.modules())
    assert same_weights(clean, weights_of(e)) == []


def test_a_cancel_while_restoring_is_never_taken_for_a_fused_state(engine, url, monkeypatch):
    e = engine("sd15")
    (with_a,) = generate(e, lora_weights=url("sd15-kohya"))
    e.loras.apply(())
    clean = weights_of(e)
    generate(e, lora_weights=url("sd15-kohya"))
    copy, calls = torch.Tensor.copy_, []

    def cancelled_on_the_third_copy(self, *args, **kwargs):  # the restore copies the originals back one by one
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled()
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", cancelled_on_the_third_copy)
    with pytest.raises(Cancelled):
        e.loras.apply(())
    monkeypatch.undo()
    assert e.loras.applied == () and same_weights(clean, weights_of(e)) == []
    (again,) = generate(e, lora_weights=url("sd15-kohya"))  # fused again, not taken as "already fused"
    assert max_difference(with_a.image, again.image) == 0


def test_a_loader_error_becomes_a_message_and_the_model_is_restored(engine, url, monkeypatch):
    e = engine("sd15")
    clean = weights_of(e)

    def broken(*args, **kwargs):
        raise ValueError("Invalid LoRA checkpoint.\nmore lines")

    monkeypatch.setattr(e.loras.pipe, "load_lora_weights", broken)
    with pytest.raises(
        LoraError, match=r"lora_weights: diffusers could not load .*\(ValueError: Invalid LoRA checkpoint.\)"
    ):
        generate(e, lora_weights=url("sd15-kohya"))
    assert same_weights(clean, weights_of(e)) == []


def test_out_of_memory_while_fusing_says_so_and_the_model_is_restored(engine, url, monkeypatch):
    e = engine("sd15")
    clean = weights_of(e)
    load = e.loras.pipe.load_lora_weights

    def out_of_memory(*args, **kwargs):
        load(*args, **kwargs)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(e.loras.pipe, "load_lora_weights", out_of_memory)
    with pytest.raises(LoraError, match="Out of memory while fusing the style LoRA"):
        generate(e, lora_weights=url("sd15-kohya"))
    assert same_weights(clean, weights_of(e)) == []


# -- 5. the sources ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("https://civitai.com/api/download/models/12345?type=Model&token=abc", dict(url=True, shown="https://civitai.com/api/download/models/12345")),
     ("  http://127.0.0.1:8000/a/style.safetensors  ", dict(url=True, shown="http://127.0.0.1:8000/a/style.safetensors")),
     ("owner/name", dict(repo="owner/name", filename=None)),
     ("owner/name/sub/style.safetensors", dict(repo="owner/name", filename="sub/style.safetensors")),
     ("https://huggingface.co/owner/name/resolve/main/style.safetensors", dict(repo="owner/name", filename="style.safetensors", revision="main")),
     ("https://huggingface.co/owner/name/blob/abc123/style.safetensors?download=true", dict(repo="owner/name", filename="style.safetensors", revision="abc123"))],
)  # fmt: skip
def test_lora_sources_name_a_url_or_a_hugging_face_repo(text, expected):
    source = parse_lora_source(text, "lora_weights")
    if expected.pop("url", False):
        assert source.url == text.strip() and source.repo is None
    for name, value in expected.items():
        assert getattr(source, name) == value, name
    assert "token" not in source.shown


@pytest.mark.parametrize(
    "text, message",
    [("ftp://host/style.safetensors", "is not an http(s) URL"), ("file:///etc/passwd", "is not an http(s) URL"),
     ("data:application/octet-stream;base64,AAAA", "is neither an http(s) URL nor a Hugging Face repo"),
     ("just-a-name", "is neither an http(s) URL nor a Hugging Face repo"),
     ("../../etc/passwd", "is neither"), ("owner/name/../x.safetensors", "does not name a file inside the repo"),
     ("https://example.com/style.ckpt", "is a pickled PyTorch file"), ("owner/name/model.bin", "is a pickled PyTorch file"),
     ("owner/name/readme.md", "names a file that is not .safetensors"), ("x" * 3000, "is 3000 characters long")],
)  # fmt: skip
def test_a_source_that_names_nothing_fetchable_is_refused_naming_the_input(text, message):
    with pytest.raises(InputError, match="^extra_lora") as caught:
        build_request(MODELS["sdxl"], prompt=PROMPT, extra_lora=text)
    assert message in str(caught.value)


def test_pixart_refuses_a_lora_naming_the_models_that_take_one():
    with pytest.raises(InputError) as caught:
        build_request(MODELS["pixart"], prompt=PROMPT, lora_weights="owner/name")
    for model in ("Flash SDXL (sdxl)", "Flash SD3 (sd3)", "Flash SD (sd15)"):
        assert model in str(caught.value)
    assert build_request(MODELS["pixart"], prompt=PROMPT, lora_weights="  ").loras == ()  # empty: no LoRA


@pytest.mark.parametrize("scale", [-1.001, 3.001, float("nan"), "1", True])
def test_lora_scales_outside_minus_one_to_three_are_refused(scale):
    with pytest.raises(InputError, match="lora_scale"):
        build_request(MODELS["sdxl"], prompt=PROMPT, lora_weights="owner/name", lora_scale=scale)


@pytest.mark.usefixtures("hf_env")
def test_a_hugging_face_repo_lora_is_fetched_with_the_token_which_is_never_said(
    tmp_path, tiny_weights, lora_file, monkeypatch, caplog
):
    token = "hf_" + "q" * 34
    kohya, other = lora_file("sd15-kohya").read_bytes(), lora_file("sd15-diffusers-plain").read_bytes()
    with FakeHub() as hub:
        hub.add_repo("someone/watercolor", "a" * 40, {"watercolor.safetensors": kohya, "README.md": b"hi"}, token=token)
        hub.add_repo("someone/two-styles", "b" * 40, {"a.safetensors": kohya, "b.safetensors": other})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", token)
        manager = fresh_loras(tmp_path, tiny_weights)
        with caplog.at_level(logging.INFO, logger="flashsd"):
            (applied,) = manager.apply([style("someone/watercolor")])
            manager.apply([style("someone/two-styles/b.safetensors")])
            with pytest.raises(LoraError, match="holds 2 .safetensors files .*name one as someone/two-styles/<file>"):
                manager.apply([style("someone/two-styles")])
            with pytest.raises(LoraError, match="repo someone/missing was not found"):
                manager.apply([style("someone/missing")])
            monkeypatch.setenv("HF_TOKEN", "hf_wrong" + "x" * 30)
            with pytest.raises(LoraError) as refused:
                manager.apply([style("someone/watercolor/watercolor.safetensors")])
        assert any(r.authorization == f"Bearer {token}" for r in hub.requests)
    assert applied.name == "watercolor" and applied.hash == addnet_hash(lora_file("sd15-kohya"))[:12]
    assert "gated" in str(refused.value) and "HF_TOKEN" in str(refused.value)
    assert token not in caplog.text and "x" * 30 not in str(refused.value)


# -- 6. what the outputs say ---------------------------------------------------------------------------------------


def test_the_metadata_names_the_loras_as_a1111_writes_them(engine, url, lora_file, tmp_path):
    e = engine("sd15")
    # One file carries kohya's own hash in its metadata (A1111 prefers it); the other gets the hash of its tensors.
    with_hash = tmp_path / "with-hash.safetensors"
    with safe_open(lora_file("sd15-kohya"), framework="pt") as f:
        metadata = dict(f.metadata()) | {"sshs_model_hash": "0123456789abcdef" * 4}
    save_file(load_file(lora_file("sd15-kohya")), with_hash, metadata=metadata)
    with LoraServer() as server:
        source = server.add("/api/download/models/77", with_hash.read_bytes(), filename="Water,Color: v2.safetensors")
        request = build_request(e.model, prompt=PROMPT, lora_weights=source, lora_scale=0.75,
                                extra_lora=url("sd15-diffusers-plain"), extra_lora_scale=1.25, output_format="png", **SMALL)  # fmt: skip
        (path,) = write_outputs(e.generate(request), request, e.model, tmp_path)
    text = Image.open(path).info["parameters"]
    first, settings = text.split("\n")
    plain_hash = addnet_hash(lora_file("sd15-diffusers-plain"))[:12]
    assert first == f"{PROMPT} <lora:Water_Color_v2:0.75> <lora:sd15-diffusers-plain:1.25>"
    assert settings.endswith(f', Lora hashes: "Water_Color_v2: 0123456789ab, sd15-diffusers-plain: {plain_hash}"')


def test_the_logs_give_download_load_and_fuse_times_and_cache_hits(engine, tmp_path, lora_file, caplog):
    e = engine("sd15")
    with LoraServer() as server:
        source = server.add("/logged.safetensors", lora_file("sd15-unet-only").read_bytes())
        with caplog.at_level(logging.INFO, logger="flashsd"):
            generate(e, lora_weights=source)
            generate(e)
            generate(e, lora_weights=source)
            e.loras.memory.entries.clear()
            generate(e)
            generate(e, lora_weights=source)
            generate(e, lora_weights=source)
    text = caplog.text
    assert text.count("LoRA logged: downloaded") == 1 and f"from {server.url}/logged.safetensors" in text
    assert "LoRA logged: state dict in memory (cache hit)" in text
    assert "LoRA logged: file cached on disk (cache hit)" in text
    assert text.count("fused at scale 1 in") == 3 and "layers loaded in" in text
    assert "weights restored in" in text and "already fused (as in the last prediction), nothing to load" in text


def test_a_safetensors_file_whose_header_length_starts_like_a_pickle_is_read_as_safetensors(tmp_path, lora_file):
    """A safetensors file starts with its header's length (u64, little endian): one of 0x0280 bytes begins
    0x80 0x02, a pickle's protocol-2 opcode."""
    tensors = load_file(lora_file("sd15-unet-only"))
    path = tmp_path / "padded.safetensors"

    def header_length(padding: int) -> int:
        save_file(tensors, path, metadata={"format": "pt", "pad": "x" * padding})
        return int.from_bytes(path.read_bytes()[:8], "little")

    unpadded = header_length(0)
    padding = 0x0280 + ((unpadded - 0x0280) // 0x10000 + 1) * 0x10000 - unpadded  # lands the length on ...0280
    while header_length(padding) & 0xFFFF != 0x0280:  # the serializer pads the header to 8 bytes: nudge
        padding -= 1
    assert path.read_bytes()[:2] == b"\x80\x02"
    header = read_header(path, "lora_weights", "padded.safetensors")
    assert header.layers and header.metadata["pad"] == "x" * padding


def test_after_a_style_lora_is_dropped_diffusers_records_the_flash_lora_alone(engine, url):
    e = engine("sd15")
    e.loras.apply(())
    fused_before = set(e.pipe.fused_loras)
    generate(e, lora_weights=url("sd15-kohya"))
    assert set(e.pipe.fused_loras) > fused_before  # diffusers counts the style LoRA while it is fused
    e.loras.apply(())
    assert set(e.pipe.fused_loras) == fused_before and e.pipe.num_fused_loras == 1
