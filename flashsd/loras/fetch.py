"""Fetching a LoRA file: over HTTP (httpx2, streamed, bounded, stoppable between chunks) or from a Hugging Face repo
(huggingface_hub, HF_TOKEN honoured and never said), and a trainer's tar turned into its `lora.safetensors`. Every
failure is a LoraError naming the input and saying what to do; no URL's query or user info is ever logged or said."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Callable
from email.message import Message
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from tqdm import tqdm

from ..errors import Stopped, redact
from ..hub_errors import HubContext, input_message
from ..settings import LoraSettings
from ..weights import PICKLE_SUFFIXES
from .sources import LoraError, LoraSource, pickle_message

log = logging.getLogger("flashsd")

Stop = Callable[[], bool] | None  # true once no prediction waits for the result (a cancel): then Stopped
MakeRoom = Callable[[int], None]  # called with a file's size once it is known, before its body is read
# What a trainer's tar holds (replicate/cog-sdxl's trained_model.tar at its top, replicate/flux-fine-tuner's under
# output/flux_train_replicate/; beside it a JSON record and embeddings, never read).
TAR_MEMBER = "lora.safetensors"
MAX_TAR_MEMBERS = 1000
# flashsd's own trainings put their record beside the LoRA (flashsd/training/export.py, RECORD_FILE); of it the cache
# keeps what serving needs: the base model (to refuse a LoRA of another family at setup) and the trigger word.
RECORD_MEMBER = "training.json"
RECORD_FIELDS = ("format", "base_model", "trigger_word", "example_prompt")
MAX_RECORD_BYTES = 16 * 2**20  # far above a record listing 5,000 skipped files


def check_stop(stop: Stop) -> None:
    if stop is not None and stop():
        raise Stopped()


class _Redacted(logging.Filter):
    """httpx2 logs every request's full URL at INFO ('HTTP Request: GET <url> ...'), which the worker's logs show:
    its query (a CivitAI key, a signed redirect) and user info are left out of those lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(str(a)) if "://" in str(a) else a for a in record.args)
        return True


def hide_url_secrets_in_logs() -> None:
    """Install the filter on httpx2's logger (once)."""
    logger = logging.getLogger("httpx2")
    if not any(isinstance(f, _Redacted) for f in logger.filters):
        logger.addFilter(_Redacted())


def too_large(input_name: str, shown: str, nbytes: int, settings: LoraSettings) -> LoraError:
    return LoraError(
        f"{input_name}: {shown} is {tqdm.format_sizeof(nbytes, 'B')}, more than the "
        f"{tqdm.format_sizeof(settings.max_file_bytes, 'B')} a LoRA file may have here (FLASHSD_LORA_MAX_GB): use a "
        "smaller LoRA (a lower rank, or saved in fp16)."
    )


# -- over HTTP ---------------------------------------------------------------------------------------------------


def download_url(
    source: LoraSource, partial: Path, input_name: str, settings: LoraSettings, make_room: MakeRoom, stop: Stop
) -> tuple[str, int]:
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
                    raise too_large(input_name, shown, total, settings)
                make_room(total or 0)
                name = _filename_from(response, PurePosixPath(unquote(urlsplit(str(response.url)).path)).name)
                announced = f" ({tqdm.format_sizeof(total, 'B')})" if total else ""
                log.info("LoRA %s: downloading %s%s", input_name, shown, announced)
                with open(partial, "wb") as f:
                    for chunk in response.iter_bytes():  # as they arrive: an interruption counts what came
                        check_stop(stop)
                        received += len(chunk)
                        if received > settings.max_file_bytes:
                            raise too_large(input_name, shown, received, settings)
                        f.write(chunk)
    except httpx2.TimeoutException as e:
        what = "answered nothing" if received == 0 else f"stopped sending after {tqdm.format_sizeof(received, 'B')}"
        raise LoraError(
            f"{input_name}: {host} {what} for {settings.timeout_s:g} s while downloading {shown} "
            f"({type(e).__name__}); nothing was kept: try again later, or host the file elsewhere."
        ) from None
    except (httpx2.RemoteProtocolError, httpx2.ReadError) as e:
        of = f" of {tqdm.format_sizeof(total, 'B')}" if total else ""
        raise LoraError(
            f"{input_name}: the download of {shown} was interrupted after {tqdm.format_sizeof(received, 'B')}{of} "
            f"({type(e).__name__}); nothing was kept: try again."
        ) from None
    except httpx2.TransportError as e:
        reason = redact(str(e).strip() or type(e).__name__)[:200]
        raise LoraError(
            f"{input_name}: could not connect to {host} to download {shown} ({type(e).__name__}: {reason}): check "
            "the URL, and that the host is reachable from the container."
        ) from None
    except httpx2.HTTPError as e:  # an invalid URL, too many redirects, ...
        raise LoraError(f"{input_name}: could not download {shown} ({type(e).__name__}).") from None
    if total is not None and received != total:
        raise LoraError(
            f"{input_name}: the download of {shown} ended after {tqdm.format_sizeof(received, 'B')} of "
            f"{tqdm.format_sizeof(total, 'B')}; nothing was kept: try again."
        )
    return name or source.key, received


def _filename_from(response, fallback: str) -> str:
    disposition = response.headers.get("content-disposition")
    if disposition:
        message = Message()
        message["content-disposition"] = disposition
        name = message.get_filename()  # RFC 6266 / 2231 (filename*=UTF-8''...) alike
        if name:
            return name
    return fallback


def _http_message(input_name: str, shown: str, status: int) -> str:
    if status in (401, 403):
        why = (
            " (not authorized): the file needs a login or an API key. For CivitAI add ?token=<your API key> to the "
            "URL; for a Hugging Face file give it as owner/name/file.safetensors and set HF_TOKEN."
        )
    elif status in (404, 410):
        why = " (not found): check the URL."
    else:
        why = ": the server is busy or down; try again later." if status == 429 or status >= 500 else ": check the URL."
    return f"{input_name}: {shown} answered HTTP {status}{why}"


# -- from a Hugging Face repo ------------------------------------------------------------------------------------


def download_hub(
    source: LoraSource, partial: Path, input_name: str, settings: LoraSettings, make_room: MakeRoom, stop: Stop
) -> tuple[str, int]:
    """Fetch a LoRA file from a Hugging Face repo with huggingface_hub into `partial`; (file name, size)."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

    hub = HubContext.current(partial.parent, settings.timeout_s)
    repo, filename, revision = source.repo, source.filename, source.revision
    staging = partial.with_name(partial.name + ".hub")
    try:
        if filename is None:  # the repo's single LoRA file
            info = HfApi(endpoint=hub.endpoint).model_info(
                repo, token=hub.token, files_metadata=True, timeout=settings.timeout_s
            )
            filename = _single_lora_file(repo, [s.rfilename for s in info.siblings or ()], input_name)
            revision = info.sha or revision
        url = hf_hub_url(repo, filename, revision=revision, endpoint=hub.endpoint)
        meta = get_hf_file_metadata(url, token=hub.token, timeout=settings.timeout_s)
        if meta.size is not None and meta.size > settings.max_file_bytes:
            raise too_large(input_name, source.shown, meta.size, settings)
        make_room(meta.size or 0)
        check_stop(stop)  # (huggingface_hub's transfer itself cannot be stopped mid-way)
        log.info("LoRA %s: downloading %s from %s%s", input_name, filename, repo,
                 f" ({tqdm.format_sizeof(meta.size, 'B')})" if meta.size else "")  # fmt: skip
        fetched = hf_hub_download(
            repo, filename, revision=revision, local_dir=staging, token=hub.token, endpoint=hub.endpoint,
            etag_timeout=settings.timeout_s,
        )  # fmt: skip
        os.replace(fetched, partial)
    except (LoraError, Stopped):
        raise
    except Exception as e:
        message = input_message(e, input_name, repo, filename, hub)
        if message is None:
            raise
        raise LoraError(message) from None
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


# -- a local file (the container's own weights only) --------------------------------------------------------------


def copy_file(
    source: LoraSource, partial: Path, input_name: str, settings: LoraSettings, make_room: MakeRoom, stop: Stop
) -> tuple[str, int]:
    """Copy the local file `source.path` into `partial`, under the same bound as a download; (file name, size)."""
    path = Path(source.path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise IsADirectoryError(path)
        if size > settings.max_file_bytes:
            raise too_large(input_name, source.shown, size, settings)
        make_room(size)
        check_stop(stop)
        shutil.copyfile(path, partial)
    except OSError as e:
        raise LoraError(f"{input_name}: cannot read {source.shown} ({e.strerror or type(e).__name__}).") from None
    return path.name, partial.stat().st_size


# -- a trainer's tar ---------------------------------------------------------------------------------------------


def lora_from_tar(path: Path, input_name: str, shown: str, settings: LoraSettings) -> dict | None:
    """When the file at `path` is a tar (a trainer's output), replace it with the tar's `lora.safetensors` (any other
    file is left as it is). That one member is read, never extracted by its own name: no other member, path or link
    reaches the disk. Returns the RECORD_FIELDS of a flashsd training's `training.json` beside it, if it has one."""
    try:
        archive = tarfile.open(path, "r:")  # uncompressed, as trainers write it: no decompression bomb to scan
    except tarfile.ReadError:
        return None
    unpacked = path.with_name(path.name + ".member")
    try:
        with archive:
            members = list(itertools.islice(archive, MAX_TAR_MEMBERS + 1))  # a hostile tar's millions stay unread
            found = [m for m in members if PurePosixPath(m.name).name == TAR_MEMBER]
            if len(found) != 1 or len(members) > MAX_TAR_MEMBERS:
                held = ", ".join(m.name for m in members[:5]) + (" and more" if len(members) > 5 else "")
                raise LoraError(
                    f"{input_name}: {shown} is a tar holding {held or 'nothing'}: give a trainer's output tar with "
                    f"one {TAR_MEMBER} (diffusers' LoRA format) among at most {MAX_TAR_MEMBERS} files, or the URL of "
                    "the .safetensors file itself."
                )
            member = found[0]
            try:  # tarfile's own extraction filter: no path out of the folder, no link out of it, no device
                tarfile.data_filter(member, str(path.parent))
            except tarfile.FilterError as e:
                raise LoraError(f"{input_name}: {shown} is a tar whose {TAR_MEMBER} is unsafe ({e}).") from None
            if not member.isreg():
                raise LoraError(
                    f"{input_name}: {shown} is a tar whose {member.name} is not a regular file (a link, a folder): "
                    f"give a tar holding the {TAR_MEMBER} file itself."
                )
            if member.size > settings.max_file_bytes:
                raise too_large(input_name, f"{shown} ({member.name})", member.size, settings)
            with archive.extractfile(member) as data, open(unpacked, "wb") as f:
                shutil.copyfileobj(data, f)
            beside = PurePosixPath(member.name).with_name(RECORD_MEMBER)
            record = _training_record([m for m in members if PurePosixPath(m.name) == beside], shown, archive)
        os.replace(unpacked, path)
        return record
    except tarfile.TarError as e:
        raise LoraError(f"{input_name}: {shown} is a damaged tar ({e}): fetch it again, or use another copy.") from None
    finally:
        unpacked.unlink(missing_ok=True)


def _training_record(found: list[tarfile.TarInfo], shown: str, archive: tarfile.TarFile) -> dict | None:
    """The RECORD_FIELDS of the tar's training.json; None without one. One that cannot be read is logged and left
    out: the LoRA itself still serves (checked by its layers)."""
    if len(found) != 1:
        return None
    member, problem = found[0], None
    if not member.isreg() or member.size > MAX_RECORD_BYTES:
        problem = f"not a regular file of at most {tqdm.format_sizeof(MAX_RECORD_BYTES, 'B')}"
    else:
        with archive.extractfile(member) as data:
            try:
                record = json.loads(data.read())
            except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
                problem = f"not JSON: {e}"
        if problem is None and not isinstance(record, dict):
            problem = "not a JSON object"
    if problem is not None:
        log.warning("%s: its %s is left out (%s)", shown, member.name, problem)
        return None
    return {name: record[name] for name in RECORD_FIELDS if name in record}
