"""Style LoRAs at run time: any LoRA trained for the base model, applied on top of the merged Flash adapter.

Flash Diffusion's "training-free LoRA acceleration" (Jasper's README: the Flash LoRA and a style LoRA loaded as two
adapters, combined unfused with `set_adapters(["flash", "style"], [1.0, scale])`). flashsd gives the same images
but runs the forward pass fused, so a prediction with a LoRA costs what one without costs:

- **Sources.** `lora_weights` / `extra_lora`: an http(s) URL of a safetensors file (CivitAI download links carry
  no extension), a Hugging Face repo `owner/name` (its single .safetensors file) or `owner/name/file.safetensors`
  (huggingface_hub, `HF_TOKEN` honoured and never said). A URL's query (where CivitAI keys go) is never logged.
- **Disk cache.** `<weights root>/.loras/<key>.safetensors` and `<key>.json` (name, A1111 hash, size), `key` the
  first 16 hex digits of the source's sha256. A download goes to a partial file, is checked, and only then renamed
  into place, so a partial file is never used. Least recently used files are evicted beyond FLASHSD_LORA_CACHE_GB.
- **Checks before loading.** At most FLASHSD_LORA_MAX_GB per file (refused from Content-Length or the hub's size
  before a byte is fetched, and while streaming); only safetensors (a pickle gets a message saying so); the header's
  layers are parsed by flashsd.adapter's key parser and checked against the very modules they target, so a LoRA of
  another family is refused naming both families, before anything is loaded.
- **Memory cache.** Recently used state dicts stay in memory (FLASHSD_LORA_MEMORY_GB), so switching back costs no
  disk read.
- **Fusing with exact restore.** diffusers loads the LoRA (`load_lora_weights`: diffusers, peft and kohya formats,
  text-encoder layers included), then, before anything is fused, flashsd keeps a copy of exactly the weights the
  LoRA's layers wrap; `fuse_lora` and `unload_lora_weights` leave no adapter layer. Changing or dropping the LoRA
  copies those originals back bit for bit: never `unfuse_lora`, whose subtraction drifts (cog-flux PR #24). The
  same LoRAs and scales as the previous prediction cost nothing. Any failure or cancellation while loading or fusing
  removes the adapter layers and restores the originals, so the next prediction runs on the untouched model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import torch

from . import adapter
from .errors import InputError, Stopped, redact
from .hub_errors import status_of
from .models import MODELS, FlashModel
from .recovery import free_memory, is_out_of_memory
from .request import LoraSource, StyleLora, pickle_message
from .settings import LoraSettings
from .weights import PICKLE_SUFFIXES

if TYPE_CHECKING:
    from .adapter import LoraLayer

log = logging.getLogger("flashsd")

FOLDER = ".loras"  # under the weights root
GB = 1e9
ADAPTER_NAMES = ("style", "extra")  # diffusers adapter names of the first and second LoRA
STALE_PARTIAL_S = 3600  # partial downloads older than this were left by a killed process
# The text-embedding width each family's UNet cross-attends to (`cross_attention_dim` in their UNet configs:
# SD1.5's CLIP ViT-L 768, SD2's OpenCLIP ViT-H 1024, SDXL's two encoders concatenated 768 + 1280).
_CROSS_ATTENTION_FAMILY = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}
# kohya's `ss_base_model_version` metadata (sd-scripts library/train_util.py), by prefix.
_BASE_VERSIONS = (("sdxl", "SDXL"), ("sd_v1", "SD1.5"), ("sd_v2", "SD2"), ("sd3", "SD3"), ("flux", "Flux"))
# diffusers' own LoRA metadata key (LORA_ADAPTER_METADATA_KEY in diffusers/loaders/lora_base.py): rank and alpha
# per layer, read only when diffusers loads the file itself.
DIFFUSERS_METADATA = "lora_adapter_metadata"

Stop = Callable[[], bool] | None  # true once no prediction waits for the result (a cancel): then Stopped


def _check_stop(stop: Stop) -> None:
    if stop is not None and stop():
        raise Stopped()


class LoraError(InputError):
    """A style LoRA that cannot be used as given: the message names the input and says what to do."""


class _WithoutQueries(logging.Filter):
    """httpx2 logs every request's full URL at INFO ('HTTP Request: GET <url> ...'), which the worker's logs show: a
    URL's query (a CivitAI key, a signed redirect) is left out of those lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_without_query(str(a)) if "://" in str(a) else a for a in record.args)
        return True


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    if not (parts.query or parts.fragment or parts.password):
        return url
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
    return parts._replace(netloc=netloc, query="…" if parts.query else "", fragment="").geturl()


def hide_url_queries_in_logs() -> None:
    """Install the filter on httpx2's logger (once)."""
    logger = logging.getLogger("httpx2")
    if not any(isinstance(f, _WithoutQueries) for f in logger.filters):
        logger.addFilter(_WithoutQueries())


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA fused into the model, as the images' metadata names it (A1111's `<lora:name:scale>`, `Lora hashes`)."""

    name: str
    scale: float
    hash: str  # A1111's short hash (a1111_hash)


# -- names and hashes --------------------------------------------------------------------------------------------


def display_name(raw: str) -> str:
    """A LoRA's name as A1111's `<lora:name:scale>` can carry it: the file name without extension, letters,
    digits and `._-` kept, other characters `_` (A1111 itself strips `:` and `,` from the names in `Lora hashes`)."""
    stem = PurePosixPath(raw.replace("\\", "/")).name
    stem = stem[: -len(".safetensors")] if stem.lower().endswith(".safetensors") else stem
    name = re.sub(r"[^\w.-]+", "_", stem, flags=re.ASCII).strip("._-")
    return name[:80] or "lora"


def a1111_hash(path: Path, metadata: Mapping[str, str]) -> str:
    """The short hash Automatic1111 writes in `Lora hashes` for this file: the first 12 hex digits of the kohya
    `sshs_model_hash` metadata, else of the sha256 of the file after its header (A1111's
    extensions-builtin/Lora/network.py, NetworkOnDisk: `set_hash(metadata.get('sshs_model_hash') or
    hashes.sha256_from_cache(..., use_addnet_hash=is_safetensors))`, `shorthash = hash[0:12]`; the hash is
    modules/hashes.py's addnet_hash_safetensors: sha256 of everything after the 8-byte length and the header)."""
    given = str(metadata.get("sshs_model_hash") or "").strip().lower()
    if re.fullmatch(r"[0-9a-f]{12,64}", given):
        return given[:12]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


# -- reading a file's header -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """What a LoRA file's safetensors header says, read without loading a tensor."""

    layers: dict[tuple[str, str], LoraLayer]
    metadata: dict[str, str]


def read_header(path: Path, input_name: str, shown: str) -> Header:
    """The layers and metadata of a safetensors LoRA file; LoraError for anything else (a pickle, a web page, a
    damaged or truncated file)."""
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    # safetensors: an 8-byte little-endian header length, then the JSON header. Anything else is said for what it is:
    # a pickle (protocol 2-5 opcode 0x80 0x02..0x05) or torch.save's zip container ("PK\x03\x04"), a web page.
    length = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not (2 <= length <= size - 8 and head[8:9] == b"{"):
        if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04":
            raise LoraError(pickle_message(input_name, shown))
        if head.lstrip()[:1] == b"<":
            raise LoraError(
                f"{input_name}: {shown} sent a web page, not a LoRA file: the link may need a login or an API key "
                "(CivitAI: add ?token=<your API key> to the URL), or it points at a page rather than at the file."
            )
        raise LoraError(
            f"{input_name}: {shown} is not a safetensors file ({_human(size)} starting {head[:8]!r}): give the "
            "address of a .safetensors LoRA file."
        )
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(
            f"{input_name}: {shown} is a damaged safetensors file ({str(e).strip()[:200]}): fetch it again, or use "
            "another copy."
        ) from e
    return Header(adapter.lora_layers(shapes), metadata)


def lora_family(header: Header) -> str | None:
    """The base model family a LoRA was trained for, from its layers (or kohya's metadata); None if unsure."""
    modules = [layer.module for (component, _), layer in header.layers.items() if component == "denoiser"]
    text = " ".join(modules)
    if any(s in text for s in ("single_transformer_blocks", "double_blocks", "single_blocks")):
        return "Flux"
    # Top-level transformer blocks are a DiT's: SD3's MMDiT attends jointly (`attn`, with `add_k_proj` for the text),
    # PixArt's blocks have self- and cross-attention (`attn1`, `attn2`), as diffusers' SD3Transformer2DModel and
    # PixArtTransformer2DModel name them; kohya's SD3 names are the MMDiT's `joint_blocks`.
    dit = [m for m in modules if m.startswith("transformer_blocks.")]
    if "joint_blocks" in text or "context_embedder" in text or any(".attn." in m for m in dit):
        return "SD3"
    if "adaln_single" in text or "caption_projection" in text or any(".attn2." in m for m in dit):
        return "PixArt"
    for (component, module), layer in header.layers.items():
        if component == "denoiser" and re.search(r"attn2[._]to_k$", module) and layer.down and len(layer.down) == 2:
            family = _CROSS_ATTENTION_FAMILY.get(layer.down[1])
            if family:
                return family
    version = str(header.metadata.get("ss_base_model_version", "")).lower()
    for prefix, family in _BASE_VERSIONS:
        if version.startswith(prefix):
            return family
    if any(component == "text_encoder_2" for component, _ in header.layers):
        return "SDXL"
    return None


# -- the disk cache ----------------------------------------------------------------------------------------------


@dataclass
class CachedFile:
    path: Path
    name: str
    hash: str
    size: int
    downloaded: bool  # fetched now (else a cache hit)
    seconds: float = 0.0


class DiskCache:
    """LoRA files under `folder`, keyed by source, least recently used evicted beyond `settings.cache_bytes`."""

    def __init__(self, folder: Path, settings: LoraSettings):
        self.folder = folder
        self.settings = settings
        self._remove_stale_partials()

    def files(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.safetensors", self.folder / f"{key}.json"

    def lookup(self, source: LoraSource) -> CachedFile | None:
        path, record = self.files(source.key)
        try:
            meta = json.loads(record.read_text())
            size = path.stat().st_size
        except (OSError, ValueError):
            return None
        if meta.get("bytes") != size:
            return None
        os.utime(record)  # most recently used
        return CachedFile(path, str(meta.get("name") or "lora"), str(meta.get("hash") or ""), size, False)

    def fetch(self, source: LoraSource, input_name: str, keep: Sequence[str] = (), stop: Stop = None) -> CachedFile:
        """The cached file of `source`, downloaded first if need be (then checked to be a safetensors file)."""
        cached = self.lookup(source)
        if cached is not None:
            return cached
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LoraError(f"{input_name}: cannot write the LoRA cache {self.folder} ({e.strerror or e}).") from e
        partial = self.folder / f".partial-{source.key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        try:
            keep = (source.key, *keep)  # the LoRAs of this request are never evicted to make room
            download = _download_url if source.url is not None else _download_hub
            make_room = lambda n: self.make_room(n, input_name, source.shown, keep)  # noqa: E731
            raw_name, size = download(source, partial, input_name, self.settings, make_room, stop)
            seconds = time.perf_counter() - started
            header = read_header(partial, input_name, source.shown)  # a non-safetensors file is never kept
            name = display_name(raw_name)
            path, record = self.files(source.key)
            meta = {"source": source.shown, "name": name, "bytes": size, "hash": a1111_hash(partial, header.metadata)}
            _write_json(record, meta)
            os.replace(partial, path)  # the file is complete and checked: only now is it the cached copy
        finally:
            partial.unlink(missing_ok=True)
            shutil.rmtree(partial.with_name(partial.name + ".hub"), ignore_errors=True)
        log.info(
            "LoRA %s: downloaded %s in %.1f s (%s/s) from %s", name, _human(size), seconds,
            _human(size / max(seconds, 1e-3)), source.shown,
        )  # fmt: skip
        self.evict(keep=keep)
        return CachedFile(path, name, meta["hash"], size, True, seconds)

    def make_room(self, incoming: int, input_name: str, shown: str, keep: Sequence[str] = ()) -> None:
        """Evict what keeps `incoming` more bytes from fitting the cache bound, then check the disk has them."""
        self.evict(keep=keep, extra=incoming)
        free = shutil.disk_usage(self.folder).free
        if incoming > free:
            raise LoraError(
                f"{input_name}: not enough disk space for {shown} ({_human(incoming)}, {_human(free)} free under "
                f"{self.folder}): lower FLASHSD_LORA_CACHE_GB or free some space."
            )

    def evict(self, keep: Sequence[str] = (), extra: int = 0) -> list[str]:
        """Remove least recently used files until the cache holds at most its bound (less `extra` bytes)."""
        entries = []
        for record in self.folder.glob("*.json"):
            path = record.with_suffix(".safetensors")
            try:
                entries.append((record.stat().st_mtime, record.stem, path.stat().st_size if path.exists() else 0))
            except OSError:
                continue
        total = sum(size for _, _, size in entries) + extra
        evicted = []
        for _, key, size in sorted(entries):
            if total <= self.settings.cache_bytes:
                break
            if key in keep:
                continue
            for f in self.files(key):
                f.unlink(missing_ok=True)
            total -= size
            evicted.append(key)
        if evicted:
            log.info("LoRA cache: evicted %d least recently used file(s) to stay within %s", len(evicted),
                     _human(self.settings.cache_bytes))  # fmt: skip
        return evicted

    def _remove_stale_partials(self) -> None:
        now = time.time()
        for p in self.folder.glob(".partial-*") if self.folder.is_dir() else ():
            try:
                if now - p.stat().st_mtime > STALE_PARTIAL_S:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            except OSError:
                pass


def _write_json(path: Path, value: dict) -> None:
    partial = path.with_name(f".partial-{path.name}-{uuid.uuid4().hex[:8]}")
    partial.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(partial, path)


def _too_large(input_name: str, shown: str, size: int, settings: LoraSettings) -> LoraError:
    return LoraError(
        f"{input_name}: {shown} is {_human(size)}, more than the {_human(settings.max_file_bytes)} a LoRA file may "
        "have here (FLASHSD_LORA_MAX_GB): use a smaller LoRA (a lower rank, or saved in fp16)."
    )


def _filename_from(response, fallback: str) -> str:
    disposition = response.headers.get("content-disposition")
    if disposition:
        message = Message()
        message["content-disposition"] = disposition
        name = message.get_filename()  # RFC 6266 / 2231 (filename*=UTF-8''...) alike
        if name:
            return name
    return fallback


def _hide_query(text: str, url: str) -> str:
    """`text` with `url`'s query and fragment (where download keys go) left out."""
    parts = urlsplit(url)
    for secret in (parts.query, parts.fragment, parts.password):
        if secret:
            text = text.replace(secret, "…")
    return text


def _download_url(source: LoraSource, partial: Path, input_name: str, settings: LoraSettings, make_room, stop: Stop):
    """Stream `source.url` into `partial`; (file name, size). Any failure is a LoraError saying what to do.
    `make_room(n)` is called once the size is announced, before the body is read; `stop` between chunks."""
    import httpx2

    shown, host = source.shown, urlsplit(source.url).hostname
    timeout = httpx2.Timeout(settings.timeout_s, connect=min(10.0, settings.timeout_s))
    received, total = 0, None
    try:
        # identity: the bytes counted are the file's own, comparable with Content-Length.
        headers = {"User-Agent": "flashsd", "Accept-Encoding": "identity"}
        with httpx2.Client(follow_redirects=True, timeout=timeout, headers=headers) as client:
            with client.stream("GET", source.url) as response:
                status = response.status_code
                if status >= 400:
                    raise LoraError(_http_message(input_name, shown, status))
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > settings.max_file_bytes:
                    raise _too_large(input_name, shown, total, settings)
                make_room(total or 0)
                name = _filename_from(response, PurePosixPath(unquote(urlsplit(str(response.url)).path)).name)
                log.info("LoRA %s: downloading %s%s", input_name, shown, f" ({_human(total)})" if total else "")
                with open(partial, "wb") as f:
                    for chunk in response.iter_bytes():  # as they arrive: an interruption counts what came
                        _check_stop(stop)
                        received += len(chunk)
                        if received > settings.max_file_bytes:
                            raise _too_large(input_name, shown, received, settings)
                        f.write(chunk)
    except httpx2.TimeoutException as e:
        what = "answered nothing" if received == 0 else f"stopped sending after {_human(received)}"
        raise LoraError(
            f"{input_name}: {host} {what} for {settings.timeout_s:g} s while downloading {shown} "
            f"({type(e).__name__}); nothing was kept: try again later, or host the file elsewhere."
        ) from None
    except (httpx2.RemoteProtocolError, httpx2.ReadError) as e:
        of = f" of {_human(total)}" if total else ""
        raise LoraError(
            f"{input_name}: the download of {shown} was interrupted after {_human(received)}{of} "
            f"({type(e).__name__}); nothing was kept: try again."
        ) from None
    except httpx2.TransportError as e:
        reason = _hide_query(str(e).strip() or type(e).__name__, source.url)[:200]
        raise LoraError(
            f"{input_name}: could not connect to {host} to download {shown} ({type(e).__name__}: {reason}): check "
            "the URL, and that the host is reachable from the container."
        ) from None
    except httpx2.HTTPError as e:  # an invalid URL, too many redirects, ...
        raise LoraError(f"{input_name}: could not download {shown} ({type(e).__name__}).") from None
    if total is not None and received != total:
        raise LoraError(
            f"{input_name}: the download of {shown} ended after {_human(received)} of {_human(total)}; nothing was "
            "kept: try again."
        )
    return name or source.key, received


def _http_message(input_name: str, shown: str, status: int) -> str:
    if status in (401, 403):
        return (
            f"{input_name}: {shown} answered HTTP {status} (not authorized): the file needs a login or an API key. "
            "For CivitAI add ?token=<your API key> to the URL; for a Hugging Face file give it as "
            "owner/name/file.safetensors and set HF_TOKEN."
        )
    if status in (404, 410):
        return f"{input_name}: {shown} answered HTTP {status} (not found): check the URL."
    if status == 429 or status >= 500:
        return f"{input_name}: {shown} answered HTTP {status}: the server is busy or down; try again later."
    return f"{input_name}: {shown} answered HTTP {status}: check the URL."


def _download_hub(source: LoraSource, partial: Path, input_name: str, settings: LoraSettings, make_room, stop: Stop):
    """Fetch a LoRA file from a Hugging Face repo with huggingface_hub into `partial`; (file name, size)."""
    from huggingface_hub import HfApi, constants, get_hf_file_metadata, get_token, hf_hub_download, hf_hub_url

    token = get_token() or None
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    repo, filename, revision = source.repo, source.filename, source.revision
    staging = partial.with_name(partial.name + ".hub")
    try:
        if filename is None:  # the repo's single LoRA file
            info = HfApi(endpoint=endpoint).model_info(
                repo, token=token, files_metadata=True, timeout=settings.timeout_s
            )
            filename = _single_lora_file(repo, [s.rfilename for s in info.siblings or ()], input_name)
            revision = info.sha or revision
        url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
        meta = get_hf_file_metadata(url, token=token, timeout=settings.timeout_s)
        if meta.size is not None and meta.size > settings.max_file_bytes:
            raise _too_large(input_name, source.shown, meta.size, settings)
        make_room(meta.size or 0)
        _check_stop(stop)  # (huggingface_hub's transfer itself cannot be stopped mid-way)
        log.info("LoRA %s: downloading %s from %s%s", input_name, filename, repo,
                 f" ({_human(meta.size)})" if meta.size else "")  # fmt: skip
        fetched = hf_hub_download(
            repo, filename, revision=revision, local_dir=staging, token=token, endpoint=endpoint,
            etag_timeout=settings.timeout_s,
        )  # fmt: skip
        os.replace(fetched, partial)
    except (LoraError, Stopped):
        raise
    except Exception as e:
        error = _hub_message(e, input_name, repo, filename, endpoint, settings)
        if error is None:
            raise
        raise LoraError(redact(error, token)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stem = PurePosixPath(filename).stem
    # diffusers' default file name says nothing about the style: the repo's name does.
    name = repo.split("/")[1] if stem in ("pytorch_lora_weights", "lora", "model", "adapter_model") else stem
    return name, partial.stat().st_size


def _single_lora_file(repo: str, files: list[str], input_name: str) -> str:
    safetensors = [f for f in files if f.endswith(".safetensors")]
    if len(safetensors) == 1:
        return safetensors[0]
    default = [f for f in safetensors if PurePosixPath(f).name == "pytorch_lora_weights.safetensors"]
    if len(default) == 1:  # diffusers' own default name, as its loader picks it (_best_guess_weight_name)
        return default[0]
    if not safetensors:
        pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise LoraError(pickle_message(input_name, f"{repo}/{pickles[0]}"))
        raise LoraError(f"{input_name}: the Hugging Face repo {repo} holds no .safetensors file.")
    listed = ", ".join(safetensors[:5]) + (f" and {len(safetensors) - 5} more" if len(safetensors) > 5 else "")
    raise LoraError(
        f"{input_name}: the Hugging Face repo {repo} holds {len(safetensors)} .safetensors files ({listed}): name one "
        f"as {repo}/<file>."
    )


def _hub_message(e: BaseException, input_name: str, repo: str, filename, endpoint: str, settings: LoraSettings):
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )  # fmt: skip

    where = f"{repo}/{filename}" if filename else repo
    chain, seen = [], e
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__

    def find(kind):
        return next((x for x in chain if isinstance(x, kind)), None)

    if find(GatedRepoError):
        return (
            f"{input_name}: the Hugging Face repo {repo} is gated: accept its terms on https://huggingface.co/{repo} "
            "and set HF_TOKEN to a token of that account."
        )
    if x := find(RepositoryNotFoundError):
        return (
            f"{input_name}: the Hugging Face repo {repo} was not found (HTTP {status_of(x)} from {endpoint}): check "
            "its name; if it is private, set HF_TOKEN to a token that can read it."
        )
    if find(RevisionNotFoundError):
        return f"{input_name}: the Hugging Face repo {repo} has no such revision: check the URL."
    if find(EntryNotFoundError):
        return f"{input_name}: the Hugging Face repo {repo} has no file {filename}: check the name."
    if x := find(HfHubHTTPError):
        status = status_of(x)
        if status in (401, 403):
            return (
                f"{input_name}: {endpoint} refused {where} (HTTP {status}): set HF_TOKEN to a token that can read it."
            )
        return f"{input_name}: {endpoint} answered HTTP {status} for {where}: try again later."
    if find(OfflineModeIsEnabled):
        return f"{input_name}: {where} cannot be fetched from the Hugging Face hub: HF_HUB_OFFLINE is set here."
    if x := find(httpx2.TimeoutException):
        return (
            f"{input_name}: the Hugging Face hub at {endpoint} answered nothing for {settings.timeout_s:g} s "
            f"({type(x).__name__}) for {where}: try again later."
        )
    if x := find(httpx2.TransportError):
        return f"{input_name}: could not reach the Hugging Face hub at {endpoint} for {where} ({type(x).__name__})."
    if "Consistency check failed" in str(e):
        return f"{input_name}: the download of {where} was interrupted; nothing was kept: try again."
    return None


# -- state dicts in memory ---------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A LoRA ready for diffusers: its state dict (or its file, when diffusers must read the file's own metadata),
    its header, and what the images' metadata says of it."""

    weights: dict[str, torch.Tensor] | Path
    header: Header
    name: str
    hash: str
    nbytes: int


class StateDicts:
    """The most recently used LoRAs' state dicts, at most `bound` bytes of tensors in all."""

    def __init__(self, bound: int):
        self.bound = bound
        self.entries: OrderedDict[str, Loaded] = OrderedDict()

    def get(self, key: str) -> Loaded | None:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        return found

    def put(self, key: str, loaded: Loaded) -> None:
        if not isinstance(loaded.weights, dict) or loaded.nbytes > self.bound:
            return
        self.entries[key] = loaded
        self.entries.move_to_end(key)
        while sum(e.nbytes for e in self.entries.values()) > self.bound:
            self.entries.popitem(last=False)


# -- fusing and restoring ----------------------------------------------------------------------------------------


@dataclass
class _Original:
    parameter: torch.nn.Parameter
    value: torch.Tensor  # a copy, on the CPU


@dataclass
class StyleLoras:
    """The style LoRAs of one pipeline: what is fused now, and the original values of the weights it changed."""

    model: FlashModel
    pipe: object
    root: Path
    settings: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        self.disk = DiskCache(Path(self.root) / FOLDER, self.settings)
        hide_url_queries_in_logs()
        self.memory = StateDicts(self.settings.memory_bytes)
        # The Flash model's value of every weight a LoRA has wrapped so far, copied once (they never change), and the
        # ones that hold fused values now.
        self._originals: dict[int, _Original] = {}
        self._changed: set[int] = set()
        self._fused: tuple = ()  # (source key, scale) of each fused LoRA
        self.applied: tuple[AppliedLora, ...] = ()
        self.timings: dict[str, float] = {}  # seconds of each step of the last change (load, originals, fuse, unload)

    def components(self) -> dict[str, torch.nn.Module]:
        """The modules LoRA layers may target, by the component names of flashsd.adapter's parser."""
        found = {"denoiser": getattr(self.pipe, self.model.denoiser)}
        for name in ("text_encoder", "text_encoder_2"):
            module = self.pipe.components.get(name)
            if isinstance(module, torch.nn.Module):
                found[name] = module
        return found

    def apply(self, wanted: Sequence[StyleLora], stop: Stop = None) -> tuple[AppliedLora, ...]:
        """Make the pipeline's weights those of the Flash model plus exactly `wanted` (fused); returns what the images'
        metadata says of them. LoraError (nothing changed) for a LoRA that cannot be used. `stop()` true (the
        prediction was cancelled) ends a download between chunks, or the load before fusing, with Stopped,
        the model restored."""
        key = tuple((lora.source.key, lora.scale) for lora in wanted)
        if key == self._fused:
            if wanted:
                log.info("Style LoRA(s) %s: already fused (as in the last prediction), nothing to load",
                         ", ".join(f"{a.name} x{a.scale:g}" for a in self.applied))  # fmt: skip
            return self.applied
        self.timings = {}
        keep = [lora.source.key for lora in wanted]
        loaded = [self._prepare(lora, keep, stop) for lora in wanted]  # all checked before the model is touched
        current = wanted[0] if wanted else None
        try:
            self.restore()
            for slot, (lora, (ready, expected)) in enumerate(zip(wanted, loaded)):
                current = lora
                _check_stop(stop)
                self._fuse(ADAPTER_NAMES[slot], lora, ready, expected, stop)
        except BaseException as e:  # cancellation included: the model goes back to the Flash model alone
            self._clean_up()
            if is_out_of_memory(e):
                free_memory()
                raise LoraError(
                    f"Out of memory while fusing the style LoRA(s) into {self.model.title}: use a smaller LoRA, or "
                    "one LoRA rather than two. The model was restored; the next prediction runs normally."
                ) from None
            if isinstance(e, Exception) and not isinstance(e, (LoraError, Stopped)) and current is not None:
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise LoraError(
                    f"{current.input}: diffusers could not load {current.source.shown} into {self.model.title} "
                    f"({type(e).__name__}: {first}). The model was restored."
                ) from e
            raise
        self._fused = key
        self.applied = tuple(
            AppliedLora(ready.name, lora.scale, ready.hash) for lora, (ready, _) in zip(wanted, loaded)
        )
        return self.applied

    @property
    def originals_bytes(self) -> int:
        """Bytes of the original weights kept (on the CPU): at most those of the modules LoRAs can target."""
        return sum(o.value.numel() * o.value.element_size() for o in self._originals.values())

    def restore(self) -> int:
        """Put back the original value of every weight a fused LoRA changed (bit for bit); returns how many."""
        self._fused, self.applied = (), ()  # first: a restore cut short (cancelled) is never taken for a fused state
        # diffusers keeps its own record of what fuse_lora fused (`fused_loras`, `num_fused_loras`); with the weights
        # put back by copy rather than unfuse_lora, take the style adapters out of it so it says the Flash LoRA alone.
        if hasattr(self.pipe, "_merged_adapters"):
            self.pipe._merged_adapters = self.pipe._merged_adapters - set(ADAPTER_NAMES)
        if not self._changed:
            return 0
        started, count = time.perf_counter(), len(self._changed)
        with torch.no_grad():
            for key in list(self._changed):
                original = self._originals[key]
                original.parameter.copy_(original.value)
                self._changed.discard(key)  # one by one: a restore cut short is completed by the next one
        _synchronize()
        self.timings["restore"] = time.perf_counter() - started
        log.info("Style LoRA(s) removed: %d weights restored in %.3f s", count, time.perf_counter() - started)
        return count

    # -- steps

    def _prepare(self, lora: StyleLora, keep: Sequence[str], stop: Stop = None) -> tuple[Loaded, dict[str, set[str]]]:
        """Download (or find) a LoRA, check it fits, and have its state dict ready; the pipeline is not touched.
        Returns it with the modules of each component its layers target."""
        source = lora.source
        ready = self.memory.get(source.key)
        if ready is not None:
            log.info("LoRA %s: state dict in memory (cache hit)", ready.name)
        else:
            cached = self.disk.fetch(source, lora.input, keep=keep, stop=stop)
            if not cached.downloaded:
                log.info("LoRA %s: file cached on disk (cache hit), %s", cached.name, _human(cached.size))
            try:
                header = read_header(cached.path, lora.input, source.shown)
            except FileNotFoundError:  # evicted by another process since the lookup: fetch it again
                cached = self.disk.fetch(source, lora.input, keep=keep, stop=stop)
                header = read_header(cached.path, lora.input, source.shown)
            ready = Loaded(cached.path, header, cached.name, cached.hash, cached.size)
        expected = self.check(lora, ready)
        if isinstance(ready.weights, Path) and DIFFUSERS_METADATA not in ready.header.metadata:
            from safetensors.torch import load_file

            started = time.perf_counter()
            weights = load_file(ready.weights, device="cpu")
            nbytes = sum(t.numel() * t.element_size() for t in weights.values())
            log.info("LoRA %s: read from disk in %.2f s", ready.name, time.perf_counter() - started)
            ready = Loaded(weights, ready.header, ready.name, ready.hash, nbytes)
            self.memory.put(source.key, ready)
        return ready, expected

    def check(self, lora: StyleLora, ready: Loaded) -> dict[str, set[str]]:
        """Every layer of the file must land on a module of this model with the shape it was made for; returns the
        modules of each component that its layers target."""
        header, family = ready.header, self.model.lora_family
        components = self.components()
        layers = header.layers
        unknown = sorted({c for c, _ in layers} - set(components))
        if not layers:
            raise LoraError(
                f"{lora.input}: {ready.name} holds no LoRA layer flashsd can apply: none of its keys is of a LoRA "
                "scheme diffusers reads (kohya lora_down/lora_up, diffusers or peft lora_A/lora_B; LyCORIS LoHa/LoKr "
                "files are not supported)."
            )
        found = lora_family(header)
        try:
            if unknown:
                raise adapter.AdapterError(f"it has layers for {', '.join(unknown)}, which {self.model.title} lacks")
            expected = {
                component: set(adapter.check_fit(layers, module, source=ready.name, component=component).modules)
                if any(c == component for c, _ in layers) else set()
                for component, module in components.items()
            }  # fmt: skip
        except adapter.AdapterError as e:
            if found and found != family:
                raise LoraError(
                    f"{lora.input}: {ready.name} is a LoRA for {found}; this model is {self.model.title}, which takes "
                    f"{family} LoRAs. Use a LoRA trained for {family}."
                ) from None
            raise LoraError(
                f"{lora.input}: {ready.name} does not fit {self.model.title} ({e}). This model takes LoRAs trained "
                f"for {family}."
            ) from None
        return expected

    def _fuse(
        self, adapter_name: str, lora: StyleLora, ready: Loaded, expected: dict[str, set[str]], stop: Stop = None
    ) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        clock = time.perf_counter()
        self.pipe.load_lora_weights(ready.weights, adapter_name=adapter_name)
        timings = {"load": time.perf_counter() - clock}
        _check_stop(stop)  # cancelled while loading: the adapter layers come off, nothing was fused
        clock, copied = time.perf_counter(), len(self._originals)
        wrapped = 0
        # As flashsd.adapter does for the Flash adapter: what diffusers attached must be exactly what the check
        # found (diffusers skips layers it cannot place with a mere warning).
        for component, module in self.components().items():
            tuned = {name: m for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}
            if set(tuned) != expected[component]:
                missing, extra = sorted(expected[component] - set(tuned)), sorted(set(tuned) - expected[component])
                raise LoraError(
                    f"{lora.input}: diffusers attached {len(tuned)} of the {len(expected[component])} {component} layers of "
                    f"{ready.name} (missing {missing[:3]}, unexpected {extra[:3]}): this file's layout is not "
                    "supported. The model was restored."
                )
            for m in tuned.values():  # their originals (copied the first time only), before anything is fused
                for parameter in m.get_base_layer().parameters(recurse=False):
                    if id(parameter) not in self._originals:
                        self._originals[id(parameter)] = _Original(parameter, parameter.detach().to("cpu", copy=True))
                    self._changed.add(id(parameter))
            wrapped += len(tuned)
        timings["originals"], clock = time.perf_counter() - clock, time.perf_counter()
        self.pipe.fuse_lora(lora_scale=lora.scale, adapter_names=[adapter_name])
        _synchronize()
        timings["fuse"], clock = time.perf_counter() - clock, time.perf_counter()
        self.pipe.unload_lora_weights()
        timings["unload"] = time.perf_counter() - clock
        for name, seconds in timings.items():  # this prediction's, for the benchmark
            self.timings[name] = self.timings.get(name, 0.0) + seconds
        log.info(
            "LoRA %s: %d layers loaded in %.3f s (originals of %d weights copied in %.3f s), fused at scale %g in %.3f s",
            ready.name, wrapped, timings["load"], len(self._originals) - copied, timings["originals"], lora.scale,
            timings["fuse"] + timings["unload"],
        )  # fmt: skip

    def _clean_up(self) -> None:
        """After a failure or cancellation mid-way: no adapter layer left, every original weight back."""
        try:
            self.pipe.unload_lora_weights()
        finally:
            self.restore()
        log.warning("Style LoRA(s) not applied: the model was restored to %s alone", self.model.title)


def _synchronize() -> None:
    """Wait for queued GPU work, so that the times logged are the work's (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def able_models() -> str:
    """The models that take style LoRAs, for messages."""
    return ", ".join(f"{m.title} ({m.key}, {m.lora_family} LoRAs)" for m in MODELS.values() if m.lora_family)
