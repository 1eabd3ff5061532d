"""Fetching style LoRAs (flashsd.loras.fetch, .cache): a trainer's tar as a source, what messages and logs may say
of a URL, and hub failures said through flashsd.hub_errors for the input that named the repo. No model is needed
until a LoRA is fused: the failures here happen before, so most tests run on a cache or a manager without a pipeline.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from flashsd.errors import redact
from flashsd.loras import LoraError, StyleLoras, parse_lora_source
from flashsd.loras.cache import FOLDER, DiskCache
from flashsd.models import MODELS
from flashsd.settings import LoraSettings
from testkit.fake_hub import FakeHub, closed_port
from testkit.lora_files import addnet_hash
from testkit.lora_server import LoraServer
from testkit.style_loras import fresh_loras, same_weights, style, weights_of_manager

SETTINGS = LoraSettings(cache_bytes=10**9, max_file_bytes=2_000_000, memory_bytes=10**9, timeout_s=2.0)


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def trainer_tar(lora: bytes, folder: str = "") -> bytes:
    """A trainer's output as replicate/cog-sdxl's train.py writes trained_model.tar (REFERENCE.md §10): the LoRA as
    lora.safetensors, the pivotal-tuning embeddings as embeddings.pti and the token map as special_params.json, at
    the tar's top; replicate/flux-fine-tuner's holds output/flux_train_replicate/lora.safetensors (`folder`)."""
    return tar_of(
        member(f"{folder}lora.safetensors", lora),
        member(f"{folder}embeddings.pti", b"\0" * 64),
        member(f"{folder}special_params.json", json.dumps({"TOK": "<s0><s1>"}).encode()),
    )


def fetch(url: str, folder: Path, input_name: str = "lora_weights"):
    return DiskCache(folder / FOLDER, SETTINGS).fetch(parse_lora_source(url, input_name), input_name)


# -- a trainer's tar ---------------------------------------------------------------------------------------------


def test_a_flashsd_trainings_record_is_kept_with_the_lora_a_bad_one_left_out_saying_why(tmp_path, lora_file, caplog):
    """flashsd's trainings write training.json beside lora.safetensors (flashsd/training/export.py): what serving
    needs of it comes back with the cached file, from the cache too; a cog-sdxl tar has none; one that is no JSON
    object, or not a regular file, is left out with a warning and the LoRA still serves."""
    lora = lora_file("sd15-diffusers").read_bytes()
    record = {"format": "flashsd-lora-training/1", "trigger_word": "sks", "example_prompt": "a photo of sks",
              "base_model": {"key": "sd15", "lora_family": "SD1.5"}, "steps": 10, "data": {"skipped": []}}  # fmt: skip
    tars = {
        "/good.tar": tar_of(member("lora.safetensors", lora), member("training.json", json.dumps(record).encode())),
        "/cog-sdxl.tar": trainer_tar(lora),
        "/not-json.tar": tar_of(member("lora.safetensors", lora), member("training.json", b"{\xff")),
        "/a-list.tar": tar_of(member("lora.safetensors", lora), member("training.json", b"[1]")),
        "/a-link.tar": tar_of(member("lora.safetensors", lora), link("training.json", "/etc/passwd")),
    }
    with LoraServer() as server, caplog.at_level(logging.WARNING, logger="flashsd"):
        got = {path: fetch(server.add(path, data), tmp_path) for path, data in tars.items()}
        again = fetch(f"{server.url}/good.tar", tmp_path)
    kept = {k: v for k, v in record.items() if k not in ("data", "steps")}  # what serving reads
    assert got["/good.tar"].training == again.training == kept
    assert {path: cached.training for path, cached in got.items() if path != "/good.tar"} == dict.fromkeys(
        ["/cog-sdxl.tar", "/not-json.tar", "/a-list.tar", "/a-link.tar"]
    )
    assert all(cached.path.read_bytes() == lora for cached in got.values())
    warnings = [r.getMessage() for r in caplog.records]
    assert any("not-json.tar: its training.json is left out (not JSON" in w for w in warnings)
    assert any("a-list.tar: its training.json is left out (not a JSON object)" in w for w in warnings)
    assert any("a-link.tar: its training.json is left out (not a regular file" in w for w in warnings)


@pytest.mark.parametrize("folder", ["", "output/flux_train_replicate/"])
def test_a_trainers_tar_is_cached_as_its_lora_safetensors(tmp_path, lora_file, folder):
    lora = lora_file("sd15-diffusers").read_bytes()
    with LoraServer() as server:
        url = server.add("/xezq/abc/trained_model.tar", trainer_tar(lora, folder))
        cached = fetch(url, tmp_path)
        assert fetch(url, tmp_path).downloaded is False and server.gets("/xezq/abc/trained_model.tar") == 1
    assert cached.path.read_bytes() == lora and cached.size == len(lora)  # the member alone, byte for byte
    assert cached.name == "trained_model" and cached.hash == addnet_hash(lora_file("sd15-diffusers"))[:12]
    assert sorted(p.name for p in (tmp_path / FOLDER).iterdir()) == sorted(
        [cached.path.name, f"{cached.path.stem}.json"]
    )


def test_a_lora_from_a_tar_fuses_as_the_same_file_given_bare(tmp_path, tiny_weights, lora_file):
    lora = lora_file("sd15-diffusers").read_bytes()
    with LoraServer() as server:
        bare = server.add("/style.safetensors", lora)
        packed = server.add("/trained_model.tar", trainer_tar(lora))
        manager = fresh_loras(tmp_path, tiny_weights)
        clean = weights_of_manager(manager)
        (applied,) = manager.apply([style(packed, 0.8)])
        from_tar = weights_of_manager(manager)
        manager.apply([style(bare, 0.8)])
        assert same_weights(from_tar, clean) and same_weights(from_tar, weights_of_manager(manager)) == []
    assert applied.name == "trained_model"


@pytest.mark.parametrize(
    "members, message",
    [((member("embeddings.pti", b"\0" * 64), member("special_params.json", b"{}")),
      "is a tar holding embeddings.pti, special_params.json: give a trainer's output tar with one lora.safetensors"),
     ((member("a/lora.safetensors", b"x"), member("b/lora.safetensors", b"y")), "with one lora.safetensors"),
     ((member("../lora.safetensors", b"x"),), "whose lora.safetensors is unsafe"),
     ((link("lora.safetensors", "/etc/passwd"),), "whose lora.safetensors is unsafe"),
     ((member("real.bin", b"x"), link("lora.safetensors", "real.bin")), "whose lora.safetensors is not a regular file (a link, a folder)"),
     ((member("real.bin", b"x"), link("lora.safetensors", "real.bin", tarfile.LNKTYPE)), "is not a regular file")],
    ids=["no lora.safetensors", "two", "traversal", "absolute symlink", "symlink", "hard link"],
)  # fmt: skip
def test_a_tar_without_one_safe_lora_safetensors_is_refused_naming_the_input(tmp_path, members, message):
    with LoraServer() as server:
        url = server.add("/trained_model.tar", tar_of(*members))
        with pytest.raises(LoraError) as caught:
            fetch(url, tmp_path / "cache", "extra_lora")
    assert str(caught.value).startswith(f"extra_lora: {server.url}/trained_model.tar is a tar ")
    assert message in str(caught.value), caught.value
    assert list((tmp_path / "cache" / FOLDER).iterdir()) == [] and list(tmp_path.rglob("*.safetensors")) == []


def sparse_tar(name: str, stored: bytes, real_size: int) -> bytes:
    """A tar of one old-GNU sparse member (GNU tar --sparse, typeflag 'S'): `stored` is all the data it holds, its
    header announces `real_size` bytes, the rest holes that a reader expands as zeros. The map sits at offset 386 of
    the header (4 x offset, length: 12 octal digits each), the real size at 483, as tarfile's `_proc_sparse` reads
    them; the checksum at 148 counts its own field as spaces."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(stored), tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = b"%011o\0%011o\0" % (0, len(stored))
    header[483:495] = b"%011o\0" % real_size
    header[148:155] = b"%06o\0" % (sum(header[:148]) + 8 * ord(" ") + sum(header[156:]))
    return bytes(header) + stored.ljust(512, b"\0") + b"\0" * 1024


def test_a_tar_member_larger_than_the_bound_is_refused_before_a_byte_of_it_is_read(tmp_path):
    """A 2.5 kB tar whose sparse lora.safetensors expands to 10 MB, beyond the 2 MB bound: never written out."""
    with LoraServer() as server:
        url = server.add("/trained_model.tar", sparse_tar("lora.safetensors", b"x" * 100, 10**7))
        with pytest.raises(LoraError, match=r"\(lora.safetensors\) is 10.0MB, more than the 2.00MB a LoRA file may"):
            fetch(url, tmp_path)
    assert list((tmp_path / FOLDER).iterdir()) == []


# -- what messages and logs say of a URL -------------------------------------------------------------------------


def test_redact_leaves_out_user_info_query_fragment_and_the_token():
    text = "GET https://me:pw1@host.example:8080/a/b.safetensors?token=k1#f2 failed; retry http://x.example/y?X-Sig=k3 as hf_abc"
    assert redact(text, "hf_abc") == (
        "GET https://host.example:8080/a/b.safetensors failed; retry http://x.example/y as <token>"
    )
    shown = parse_lora_source("https://me:pw1@civitai.com/api/download/models/7 v2?token=k1", "lora_weights").shown
    assert shown == "https://civitai.com/api/download/models/7%20v2"  # a space does not end what is left out


@pytest.mark.parametrize("route, fault", [("/ok.safetensors", {}), ("/private", dict(status=401))])
def test_a_urls_user_info_and_query_are_in_no_message_log_or_cache_record(tmp_path, lora_file, caplog, route, fault):
    manager = StyleLoras(MODELS["sd15"], None, tmp_path, SETTINGS)  # failures and downloads never touch a pipeline
    with LoraServer() as server, caplog.at_level(logging.DEBUG):
        url = server.add(route, lora_file("sd15-kohya").read_bytes(), **fault).replace("://", "://me:pw-secret@")
        lora = style(url + "?token=key-secret#frag-secret")
        if fault:
            with pytest.raises(
                LoraError, match=r"^lora_weights: http://127\.0\.0\.1:\d+/private answered HTTP 401"
            ) as e:
                manager.apply([lora])
            said = caplog.text + str(e.value)
        else:
            manager.disk.fetch(lora.source, lora.input)
            said = caplog.text + "".join(p.read_text() for p in (tmp_path / FOLDER).glob("*.json"))
            assert f"from {server.url}{route}" in caplog.text
    assert "HTTP Request: GET" in caplog.text  # httpx2's request line is there
    assert not [s for s in ("pw-secret", "key-secret", "frag-secret") if s in said]


# -- hub failures, through flashsd.hub_errors --------------------------------------------------------------------


@pytest.fixture
def hub_repo(hf_env, lora_file, monkeypatch):
    with FakeHub() as hub:
        hub.add_repo("someone/watercolor", "a" * 40, {"watercolor.safetensors": lora_file("sd15-kohya").read_bytes()})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


@pytest.mark.parametrize(
    "source, message",
    [("someone/watercolor/nope.safetensors", "the Hugging Face repo someone/watercolor has no file nope.safetensors: "
      "check the name."),
     (f"https://huggingface.co/someone/watercolor/resolve/{'b' * 40}/watercolor.safetensors",
      "the Hugging Face repo someone/watercolor has no such revision: check the URL."),
     ("someone/no-such-repo", "the Hugging Face repo someone/no-such-repo was not found (HTTP 404 from http://127.0.0.1:")],
    ids=["file", "revision", "repo"],
)  # fmt: skip
def test_a_hub_failure_names_the_input_and_what_to_fix(tmp_path, hub_repo, source, message):
    manager = StyleLoras(MODELS["sd15"], None, tmp_path, SETTINGS)
    with pytest.raises(LoraError) as caught:
        manager.apply([style(source, input="extra_lora")])
    assert str(caught.value).startswith(f"extra_lora: {message}"), caught.value


def test_an_unreachable_hub_is_said_without_the_endpoints_user_info(tmp_path, hf_env, monkeypatch):
    port = closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://me:pw-secret@127.0.0.1:{port}")
    manager = StyleLoras(MODELS["sd15"], None, tmp_path, SETTINGS)
    with pytest.raises(LoraError) as caught:
        manager.apply([style("someone/watercolor")])
    assert str(caught.value) == (
        f"lora_weights: could not reach the Hugging Face hub at http://127.0.0.1:{port} for someone/watercolor "
        "(ConnectError)."
    )
