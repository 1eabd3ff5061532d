"""Keeping one prediction's failure from becoming the container's.

A Cog worker that dies is not restarted, so every fault a prediction can meet must end that prediction
and leave the worker as it was:

- `PredictionGuard` (what predict() wraps the engine call in): an out-of-memory error becomes `OutOfMemory`,
  a message that says what to lower, after the frames that held the tensors are cleared and the allocator's
  cache is emptied; after any failure or cancellation, components moved or cast during the call are put
  back and the scheduler's per-call state is reset, so the next prediction runs exactly as before.
- `truncated_prompt_warnings`: the text encoders read a fixed number of tokens (CLIP 77, PixArt's T5 120).
  What they cut off is said in the logs (which Cog returns with the prediction), never dropped silently.
- `use_private_tempdir` / `sweep_input_copies`: coglet copies file inputs (URLs, data URIs) to temporary files
  and deletes them after the prediction, but not when another input of the same request then fails to
  download (predict() never runs). The worker keeps its temporary files in a folder of its own, and each
  prediction first deletes what earlier requests left there.
- `weights_problems` / `diagnose_weights`: when loading fails, the damaged, missing or pickle-only file is
  named with the command that fetches it again, instead of a loader's traceback.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import inspect
import json
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from .errors import InputError, WeightsError
from .models import FlashModel
from .weights import listed_files, pickles_instead, repo_dir

if TYPE_CHECKING:
    from .engine import Engine
    from .request import GenerationRequest

log = logging.getLogger("flashsd")

# -- out of memory -----------------------------------------------------------------------------------------------


class OutOfMemory(InputError):
    """The request needs more memory than the device has free: the message says what to lower."""


_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError, MemoryError}
)
# RuntimeErrors that are allocation failures under another name (cuBLAS/cuDNN workspaces, the CPU allocator).
_OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "failed to allocate memory",
)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, _OOM_ERRORS):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MARKERS)


def out_of_memory_message(request: "GenerationRequest", device: torch.device) -> str:
    memory = "GPU memory" if device.type == "cuda" else "memory"
    megapixels = request.width * request.height / 1e6
    lower = []
    if request.num_outputs > 1:
        lower.append(f"num_outputs (it is {request.num_outputs}; the images are generated together)")
    lower.append(
        f"the size (it is {request.width}x{request.height}, {megapixels:.1f} megapixels: pick a smaller "
        "aspect_ratio, or smaller width and height with aspect_ratio 'custom')"
    )
    if request.guidance_scale > 1:
        lower.append(f"guidance_scale to 1 or less (it is {request.guidance_scale:g}; above 1 each image is computed twice)")
    return (
        f"Out of {memory} generating {request.num_outputs} image(s) at {request.width}x{request.height}: lower "
        f"{'; or '.join(lower)}, then try again. The memory was freed; the next prediction runs normally."
    )


def free_memory() -> None:
    """Collect what the failed call left unreferenced and give the allocator's cached blocks back."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        with contextlib.suppress(Exception):  # a broken CUDA context must not hide the real error
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()


# -- state restored after a failure ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModuleState:
    module: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    training: bool


def _modules(engine: "Engine") -> dict[str, torch.nn.Module]:
    found = {
        name: component for name, component in engine.pipe.components.items() if isinstance(component, torch.nn.Module)
    }
    if engine.safety_checker is not None:
        found["safety_checker"] = engine.safety_checker.model
    return found


def _uniform_state(module: torch.nn.Module) -> tuple[torch.device, torch.dtype] | None:
    """(device, dtype) of the module's floating-point parameters when they all agree, else None."""
    states = {(p.device, p.dtype) for p in module.parameters() if p.is_floating_point()}
    return states.pop() if len(states) == 1 else None


def snapshot(engine: "Engine") -> dict[str, _ModuleState]:
    shot = {}
    for name, module in _modules(engine).items():
        first = next((p for p in module.parameters() if p.is_floating_point()), None)
        if first is not None:
            shot[name] = _ModuleState(module, first.device, first.dtype, module.training)
    return shot


def restore(engine: "Engine", shot: dict[str, _ModuleState]) -> list[str]:
    """Put back what a failed or cancelled call changed; returns what was restored (for the log)."""
    restored = []
    for name, state in shot.items():
        module = state.module
        if module.training != state.training:
            module.train(state.training)
            restored.append(f"{name} back in {'training' if state.training else 'eval'} mode")
        current = _uniform_state(module)
        if current is not None and current != (state.device, state.dtype):
            # e.g. a VAE upcast to float32 for decoding (diffusers' upcast_vae) when the decode failed
            module.to(device=state.device, dtype=state.dtype)
            restored.append(f"{name} back to {str(state.dtype).removeprefix('torch.')} on {state.device}")
    schedulers = {id(s): s for s in [engine.pipe.scheduler, *(p.scheduler for p in engine._mode_pipelines.values())]}
    for scheduler in schedulers.values():
        for attribute in ("_step_index", "_begin_index"):
            if getattr(scheduler, attribute, None) is not None:
                setattr(scheduler, attribute, None)
    return restored


class PredictionGuard:
    """`with PredictionGuard(engine, request): engine.generate(request)`.

    On entry: logs what the text encoders will cut off the prompts. On an exception (cancellation included):
    restores the engine's state; an out-of-memory error is replaced by `OutOfMemory` once memory is freed.
    """

    def __init__(self, engine: "Engine", request: "GenerationRequest"):
        self.engine = engine
        self.request = request

    def __enter__(self) -> "PredictionGuard":
        for warning in truncated_prompt_warnings(self.engine, self.request):
            log.warning("%s", warning)
        self._shot = snapshot(self.engine)
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            return False
        out_of_memory = is_out_of_memory(error)
        if out_of_memory:
            last = traceback.extract_tb(tb)[-1] if tb is not None else None
            where = f" in {last.name} ({Path(last.filename).name}:{last.lineno})" if last else ""
            cause = f"{type(error).__name__}{where}: {_first_line(error)}"
            # The frames of the failed call hold its activations (and closures such as torch's hook wrapper keep
            # them even from cleared frames): clear the frames and drop the traceback before freeing memory.
            traceback.clear_frames(tb)
            error.__traceback__ = None
            del tb
            free_memory()
        try:
            restored = restore(self.engine, self._shot)
        except BaseException as restore_error:  # noqa: BLE001 - said loudly, then the original error goes on
            log.error("Could not restore the pipeline after a failed prediction: %r", restore_error)
            restored = []
        if restored:
            log.warning("Restored after the failed prediction: %s", ", ".join(restored))
        if not out_of_memory:
            return False  # the original exception (or cancellation) propagates unchanged
        log.warning("%s; memory freed, the worker carries on", cause)
        raise OutOfMemory(out_of_memory_message(self.request, self.engine.runtime.device)) from None


# -- prompts longer than the text encoders read -------------------------------------------------------------------

SHOWN_CHARACTERS = 200  # of the cut-off text, in the log line


def _token_limit(pipe, tokenizer) -> tuple[int, str]:
    """How many tokens the pipeline lets this tokenizer produce, and a name for the encoder."""
    if type(tokenizer).__name__.startswith("T5"):
        parameter = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
        limit = parameter.default if parameter is not None and isinstance(parameter.default, int) else tokenizer.model_max_length
        return limit, "T5"
    return tokenizer.model_max_length, "CLIP"


def truncated_prompt_warnings(engine: "Engine", request: "GenerationRequest") -> list[str]:
    """One line per prompt and limit, saying how long the prompt is, what is read and what is cut off."""
    pipe = engine.pipe
    texts = [("prompt", request.prompt)]
    if request.guidance_scale > 1 and request.negative_prompt:
        texts.append(("negative_prompt", request.negative_prompt))
    warnings, seen = [], set()
    for attribute in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, attribute, None)
        if tokenizer is None:
            continue
        limit, encoder = _token_limit(pipe, tokenizer)
        room = limit - tokenizer.num_special_tokens_to_add()
        for name, text in texts:
            ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
            if len(ids) <= room or (name, encoder, room) in seen:
                continue
            seen.add((name, encoder, room))
            cut = tokenizer.decode(ids[room:], skip_special_tokens=True).strip()
            if len(cut) > SHOWN_CHARACTERS:  # its start and its end, where the last words of a long prompt are
                cut = f"{cut[: SHOWN_CHARACTERS * 2 // 3]} … {cut[-SHOWN_CHARACTERS // 3:]}' ({len(cut)} characters)"
            else:
                cut = f"{cut}'"
            shown = "'" + cut
            warnings.append(
                f"{name} is {len(ids)} tokens long but {engine.model.title}'s {encoder} text encoder reads only the "
                f"first {room} ({limit} with its special tokens): the rest is ignored: {shown}"
            )
    return warnings


# -- input copies coglet leaves behind ----------------------------------------------------------------------------

PRIVATE_TEMP_PREFIX = "flashsd-worker-"


def in_cog_worker() -> bool:
    """True in the worker process coglet spawns (`python -c "import coglet; coglet.server._run_worker()"`)."""
    return sys.argv[:1] == ["-c"] and "coglet" in sys.modules


def use_private_tempdir(force: bool = False) -> Path | None:
    """In a Cog worker: point its temporary files (coglet's copies of file inputs, written by its Rust and its
    Python side alike, and flashsd's outputs) at a folder of the worker's own inside TMPDIR, removed at exit,
    so that `sweep_input_copies` can clean it without touching anyone else's files. Elsewhere (tests, the
    command line) nothing changes unless `force`."""
    if not (force or in_cog_worker()):
        return None
    current = Path(tempfile.gettempdir())
    if current.name.startswith(PRIVATE_TEMP_PREFIX):
        return current
    folder = Path(tempfile.mkdtemp(prefix=PRIVATE_TEMP_PREFIX))
    os.environ["TMPDIR"] = str(folder)  # what coglet's Rust side reads
    tempfile.tempdir = str(folder)  # what Python's tempfile had cached
    atexit.register(shutil.rmtree, folder, True)
    return folder


def sweep_input_copies(keep: Iterable[object] = ()) -> int:
    """Delete the files lying directly in the worker's private temporary folder except `keep` (the current
    prediction's inputs). coglet deletes a request's input copies after its prediction, but not when one input
    fails to download after others were copied: predict() never runs and the copies would stay for the
    container's lifetime. Folders (the outputs being delivered) are left alone; outside a private folder
    nothing is swept."""
    folder = Path(tempfile.gettempdir())
    if not folder.name.startswith(PRIVATE_TEMP_PREFIX):
        return 0
    kept = {os.path.realpath(os.fspath(p)) for p in keep if isinstance(p, (str, os.PathLike))}
    removed = 0
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and os.path.realpath(entry.path) not in kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    if removed:
        log.info("Removed %d input file(s) left by earlier rejected requests", removed)
    return removed


# -- damaged weights ---------------------------------------------------------------------------------------------

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def safetensors_problem(path: Path) -> str | None:
    """None when `path` is a structurally complete safetensors file (header readable, every tensor's bytes
    present, nothing after them), else what is wrong. Reads only the header: milliseconds for any size."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, too short to be a safetensors file (truncated?)"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            if f.read(2)[:1] not in (b"{", b""):
                return "not a safetensors file (no JSON header; a pickle or another format?)"
            return f"the header announces {header_len} bytes but the file has {size} (truncated or not safetensors)"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"its header is not valid JSON ({e.__class__.__name__}): the file is damaged"
    if not isinstance(header, dict):
        return "its header is not a JSON object: the file is damaged"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            count = 1
            for dim in entry["shape"]:
                count *= dim
            expected = count * _DTYPE_BYTES.get(entry["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has a malformed header entry: the file is damaged"
        if stop - begin != expected and entry["dtype"] in _DTYPE_BYTES:
            return f"tensor {name!r} is described inconsistently: the file is damaged"
        end = max(end, stop)
    data = size - 8 - header_len
    if data < end:
        return f"truncated: {size} bytes, its header needs {8 + header_len + end}"
    if data > end:
        return f"{data - end} unexpected bytes after the last tensor: the file is damaged"
    return None


@dataclass(frozen=True)
class WeightProblem:
    path: Path
    problem: str


def diagnose_weights(model: FlashModel, root: Path | str) -> list[WeightProblem]:
    """Every listed file of `model` that is missing, pickle-only or structurally damaged (no network)."""
    root = Path(root)
    problems = []
    for repo in model.repos:
        folder = repo_dir(root, repo)
        for name in listed_files(repo):
            path = folder / name
            if not path.is_file():
                pickles = [p.name for p in pickles_instead(path)]
                if pickles:
                    what = (
                        f"missing; only the pickle file {', '.join(pickles)} is there, and flashsd never loads "
                        "pickle files (they can run arbitrary code)"
                    )
                else:
                    what = "missing"
                problems.append(WeightProblem(path, what))
                continue
            try:
                if name.endswith(".safetensors"):
                    problem = safetensors_problem(path)
                elif name.endswith(".json"):
                    json.loads(path.read_text(encoding="utf-8"))
                    problem = None
                else:
                    problem = None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                problem = f"unreadable ({e.__class__.__name__}: {e})"
            if problem:
                problems.append(WeightProblem(path, problem))
    return problems


def weights_message(model: FlashModel, root: Path | str, problems: list[WeightProblem], error: BaseException | None) -> str:
    root = Path(root)
    shown = "; ".join(f"{_relative(p.path, root)}: {p.problem}" for p in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    failed = f" ({type(error).__name__})" if error is not None else ""
    return (
        f"{model.title} could not be loaded from {root}{failed}: {shown}{more}. Fetch the pinned files again with "
        f"`scripts/download-weights --model {model.key} --verify` (in the container: `cog exec "
        f"scripts/download-weights --model {model.key} --verify`), which checks every file against the hub and "
        "replaces the damaged ones; set FLASHSD_WEIGHTS if the weights live in another folder."
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def weights_problems(model: FlashModel, root: Path | str) -> Iterator[None]:
    """Around Engine.load: a loader's error caused by a missing, pickle-only or damaged file, or raised while
    attaching the Flash adapter, becomes a WeightsError naming the file and the fix. Other errors propagate
    unchanged."""
    try:
        yield
    except WeightsError:
        raise
    except Exception as error:
        problems = diagnose_weights(model, root)
        log.error("Loading %s failed: %s: %s", model.title, type(error).__name__, str(error)[:500])
        if problems:
            raise WeightsError(weights_message(model, root, problems, error)) from error
        if any(frame.f_code.co_name == "_attach_adapter" for frame, _ in traceback.walk_tb(error.__traceback__)):
            adapter = repo_dir(root, model.adapter)
            raise WeightsError(
                f"The Flash adapter in {adapter} does not fit {model.base.id} ({type(error).__name__}: "
                f"{_first_line(error)}). Fetch the pinned files again with `scripts/download-weights --model "
                f"{model.key} --verify`."
            ) from error
        raise


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "…"


# -- adapters that do not fit ------------------------------------------------------------------------------------

# PEFT-format LoRA keys, as diffusers LoRA files and PEFT adapters store them: `<prefix><module>.lora_A.weight`.
_LORA_KEY = re.compile(r"^(?:unet\.|transformer\.|base_model\.model\.)(?P<module>.+)\.lora_(?P<half>[AB])(?:\.[^.]+)?\.weight$")


def adapter_mismatches(weights_file: Path, denoiser: torch.nn.Module) -> tuple[int, list[str]]:
    """Check each LoRA layer of an adapter file against the denoiser before anything is attached: the module
    it names must exist and have the shape the LoRA matrices were made for. Returns (layers checked, problems).
    Keys in other formats are not checked here (the attach count in engine._attach_adapter still is)."""
    from safetensors import safe_open

    modules = dict(denoiser.named_modules())
    checked: set[str] = set()
    problems: dict[str, str] = {}  # one per layer
    with safe_open(weights_file, framework="pt") as f:
        for key in f.keys():
            match = _LORA_KEY.match(key)
            if match is None:
                continue
            name, half = match["module"], match["half"]
            checked.add(name)
            if name in problems:
                continue
            module = modules.get(name)
            weight = getattr(module, "weight", None)
            if module is None or not isinstance(weight, torch.Tensor):
                problems[name] = f"{key}: the {type(denoiser).__name__} has no layer {name!r}"
                continue
            shape = tuple(f.get_slice(key).get_shape())
            target = tuple(weight.shape)
            if half == "A":  # (rank, in[, kh, kw]) against (out, in[, kh, kw])
                fits = len(shape) == len(target) and shape[1] == target[1] and shape[2:] == target[2:]
            else:  # (out, rank[, 1, 1])
                fits = len(shape) == len(target) and shape[0] == target[0]
            if not fits:
                problems[name] = f"{key}: shape {list(shape)} does not fit layer {name!r} of shape {list(target)}"
    return len(checked), list(problems.values())


def check_adapter(weights_file: Path, denoiser: torch.nn.Module, model: FlashModel) -> int:
    """WeightsError naming the adapter file when any of its layers does not fit the denoiser (a LoRA of another
    base model, renamed keys): attaching it would fail with a loader's traceback or, worse, load part of it."""
    checked, problems = adapter_mismatches(weights_file, denoiser)
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise WeightsError(
            f"The Flash adapter {weights_file} does not fit {model.base.id}: {len(problems)} of its {checked} layers "
            f"do not match the {model.denoiser} ({'; '.join(problems[:2])}{more}). It is not the "
            f"{model.adapter.id} adapter of this model: fetch the pinned files again with "
            f"`scripts/download-weights --model {model.key} --verify`."
        )
    return checked
