"""Where each pinned Hugging Face repo lives under the weights root, what is missing, and what is damaged.

Layout: `<root>/<org>/<repo>/` is a snapshot of the hub repo `<org>/<repo>` at its pinned revision, in the
repo's own layout, holding only the files `flashsd.models` lists (plus bookkeeping under `.cache/`). The root is
`FLASHSD_WEIGHTS`, else `weights/` in the project root. Nothing here touches the network: `flashsd.download`
fetches.

When loading fails, `weights_problems` names the damaged, missing or pickle-only file with the command that
fetches it again, instead of a loader's traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import WeightsError
from .models import FlashModel, HubRepo

log = logging.getLogger("flashsd")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def repo_dir(root: Path | str, repo: HubRepo) -> Path:
    """`<root>/<org>/<repo>`: where the snapshot of `repo` lives."""
    org, sep, name = repo.id.partition("/")
    if not sep or not org or not name or "/" in name or {org, name} & {".", ".."}:
        raise WeightsError(f"Repo id {repo.id!r} in flashsd/models.py is not of the form 'org/name'.")
    return Path(root) / org / name


def listed_files(repo: HubRepo) -> tuple[str, ...]:
    """The files of `repo` flashsd uses; refuses pickle formats and names that would leave the repo folder."""
    for name in repo.files:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise WeightsError(
                f"flashsd/models.py lists {repo.id}/{name}, a pickle file ({PurePosixPath(name).suffix}): loading "
                "one can run arbitrary code, so flashsd never downloads or loads them. List the .safetensors "
                "version of that file instead."
            )
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or "\\" in name or ".." in parts or parts[0] == ".cache":
            raise WeightsError(f"flashsd/models.py lists {repo.id}/{name!r}: not a plain path inside the repo.")
    return repo.files


def missing_files(model: FlashModel, root: Path | str) -> list[Path]:
    """The listed files of `model` that are not under `root` (existence checks only)."""
    return [
        repo_dir(root, repo) / name
        for repo in model.repos
        for name in listed_files(repo)
        if not (repo_dir(root, repo) / name).is_file()
    ]


def missing_message(model: FlashModel, root: Path, missing: list[Path], why: str) -> str:
    shown = ", ".join(str(p.relative_to(root)) for p in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    dirs = [repo_dir(root, r) for r in model.repos]
    folders = [str(d) for d in dirs if any(p.is_relative_to(d) for p in missing)]
    return (
        f"The weights of {model.title} are not all in {root}: {len(missing)} file(s) missing ({shown}{more}), "
        f"and {why}. Fetch them on a machine with network access with `scripts/download-weights --model "
        f"{model.key}` (in the container: `cog exec scripts/download-weights --model {model.key}`), or copy "
        f"{', '.join(folders)} into place from a machine that has them; set FLASHSD_WEIGHTS if the weights "
        "live in another folder." + _pickle_note(missing, root)
    )


def pickles_instead(path: Path) -> list[Path]:
    """Pickle files in a missing file's folder (`unet/diffusion_pytorch_model.bin` where
    `unet/diffusion_pytorch_model.fp16.safetensors` should be): what a folder copied from a pickle-era repo holds."""
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES))


def _pickle_note(missing: list[Path], root: Path) -> str:
    found = [str(p.relative_to(root)) for m in missing for p in pickles_instead(m)]
    if not found:
        return ""
    return (
        f" Only pickle files are there instead ({', '.join(found[:3])}): flashsd never loads pickle files, since "
        "loading one can run arbitrary code; it needs the .safetensors files named above."
    )


# -- damaged weights ---------------------------------------------------------------------------------------------

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
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


def weights_message(
    model: FlashModel, root: Path | str, problems: list[WeightProblem], error: BaseException | None
) -> str:
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
    """Around Engine.load: a loader's error caused by a missing, pickle-only or damaged file becomes a
    WeightsError naming the file and the fix (flashsd.adapter names an unfit adapter itself). Other errors
    propagate unchanged."""
    try:
        yield
    except Exception as error:
        problems = diagnose_weights(model, root)  # a damaged file explains any error, an unfit adapter's too
        if not problems:
            raise
        log.error("Loading %s failed: %s: %s", model.title, type(error).__name__, str(error)[:500])
        raise WeightsError(weights_message(model, root, problems, error)) from error
