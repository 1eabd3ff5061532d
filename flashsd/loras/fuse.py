"""Fusing style LoRAs into the model with exact restore.

diffusers loads the LoRA (`load_lora_weights`: diffusers, peft and kohya formats, text-encoder layers included), then,
before anything is fused, a copy is kept of exactly the weights the LoRA's layers wrap; `fuse_lora` and
`unload_lora_weights` leave no adapter layer. Changing or dropping the LoRA copies those originals back bit for bit:
never `unfuse_lora`, whose subtraction drifts (cog-flux PR #24). The same LoRAs and scales as the previous prediction
cost nothing. Any failure or cancellation while loading or fusing removes the adapter layers and restores the
originals, so the next prediction runs on the untouched model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import adapter
from ..errors import Stopped
from ..models import FlashModel
from ..recovery import free_memory, is_out_of_memory
from ..settings import LoraSettings
from .cache import FOLDER, DiskCache, Loaded, StateDicts
from .fetch import Stop, check_stop, hide_url_secrets_in_logs
from .header import DIFFUSERS_METADATA, lora_family, read_header
from .sources import LoraError, StyleLora

log = logging.getLogger("flashsd")

ADAPTER_NAMES = ("style", "extra")  # diffusers adapter names of the first and second LoRA


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA fused into the model, as the images' metadata names it (A1111's `<lora:name:scale>`, `Lora hashes`)."""

    name: str
    scale: float
    hash: str  # A1111's short hash (header.a1111_hash)


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
        hide_url_secrets_in_logs()
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
                check_stop(stop)
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
                log.info(
                    "LoRA %s: file cached on disk (cache hit), %s", cached.name, tqdm.format_sizeof(cached.size, "B")
                )
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
        check_stop(stop)  # cancelled while loading: the adapter layers come off, nothing was fused
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
