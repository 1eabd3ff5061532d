"""The two LoRA caches: files on disk (`<weights root>/.loras/`, least recently used evicted beyond
FLASHSD_LORA_CACHE_GB) and state dicts in memory (FLASHSD_LORA_MEMORY_GB), so switching back costs no disk read."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..settings import LoraSettings
from .fetch import Stop, copy_file, download_hub, download_url, lora_from_tar
from .header import Header, a1111_hash, display_name, read_header
from .sources import LoraError, LoraSource

log = logging.getLogger("flashsd")

FOLDER = ".loras"  # under the weights root
STALE_PARTIAL_S = 3600  # partial downloads older than this were left by a killed process


@dataclass
class CachedFile:
    path: Path
    name: str
    hash: str
    size: int
    downloaded: bool  # fetched now (else a cache hit)
    seconds: float = 0.0
    training: dict | None = None  # what a flashsd training's tar recorded (fetch.RECORD_FIELDS), if it was one


class DiskCache:
    """LoRA files under `folder`, keyed by source, least recently used evicted beyond `settings.cache_bytes`:
    `<key>.safetensors` and `<key>.json` (name, A1111 hash, size), `key` the first 16 hex digits of the source's
    sha256. A download goes to a partial file, is checked, and only then renamed into place, so a partial file is
    never used. A pinned key (the container's own trained LoRA) is never evicted."""

    def __init__(self, folder: Path, settings: LoraSettings):
        self.folder = folder
        self.settings = settings
        self.pinned: set[str] = set()
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
        name, training = str(meta.get("name") or "lora"), meta.get("training")
        return CachedFile(path, name, str(meta.get("hash") or ""), size, False, training=training)

    def fetch(self, source: LoraSource, input_name: str, keep: Sequence[str] = (), stop: Stop = None) -> CachedFile:
        """The cached file of `source`, downloaded first if need be (a trainer's tar unpacked to its LoRA), then
        checked to be a safetensors file."""
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
            download = copy_file if source.path else download_url if source.url else download_hub
            make_room = lambda n: self.make_room(n, input_name, source.shown, keep)  # noqa: E731
            raw_name, fetched = download(source, partial, input_name, self.settings, make_room, stop)
            seconds = time.perf_counter() - started
            training = lora_from_tar(partial, input_name, source.shown, self.settings)
            size = partial.stat().st_size
            header = read_header(partial, input_name, source.shown)  # a non-safetensors file is never kept
            name = display_name(raw_name)
            path, record = self.files(source.key)
            meta = {"source": source.shown, "name": name, "bytes": size, "hash": a1111_hash(partial, header.metadata)}
            if training is not None:
                meta["training"] = training
            _write_json(record, meta)
            os.replace(partial, path)  # the file is complete and checked: only now is it the cached copy
        finally:
            partial.unlink(missing_ok=True)
            shutil.rmtree(partial.with_name(partial.name + ".hub"), ignore_errors=True)
        log.info(
            "LoRA %s: %s %s in %.1f s (%s/s) from %s", name, "copied" if source.path else "downloaded",
            tqdm.format_sizeof(fetched, "B"), seconds, tqdm.format_sizeof(fetched / max(seconds, 1e-3), "B"), source.shown,
        )  # fmt: skip
        self.evict(keep=keep)
        return CachedFile(path, name, meta["hash"], size, True, seconds, training)

    def make_room(self, incoming: int, input_name: str, shown: str, keep: Sequence[str] = ()) -> None:
        """Evict what keeps `incoming` more bytes from fitting the cache bound, then check the disk has them."""
        self.evict(keep=keep, extra=incoming)
        free = shutil.disk_usage(self.folder).free
        if incoming > free:
            raise LoraError(
                f"{input_name}: not enough disk space for {shown} ({tqdm.format_sizeof(incoming, 'B')}, "
                f"{tqdm.format_sizeof(free, 'B')} free under {self.folder}): lower FLASHSD_LORA_CACHE_GB or free "
                "some space."
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
            if key in keep or key in self.pinned:
                continue
            for f in self.files(key):
                f.unlink(missing_ok=True)
            total -= size
            evicted.append(key)
        if evicted:
            log.info("LoRA cache: evicted %d least recently used file(s) to stay within %s", len(evicted),
                     tqdm.format_sizeof(self.settings.cache_bytes, "B"))  # fmt: skip
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
