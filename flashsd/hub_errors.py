"""What a failed exchange with the Hugging Face hub means, said so that a person can act on it.

Every failure of huggingface_hub (HTTP status, gated repo, wrong pin, no network, Xet, disk) is classified once
(`classify`), then said as one `WeightsError` paragraph naming the repo, the file and the fix (`translate`, the
model's weights) or as a message naming the input a user filled in (`input_message`, a style LoRA's repo); the token
never appears in any of them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import WeightsError, redact
from .models import HubRepo
from .weights import repo_dir


@dataclass(frozen=True)
class HubContext:
    """How this run talks to the hub."""

    root: Path
    endpoint: str
    token: str | None
    token_source: str | None
    timeout: float

    @classmethod
    def current(cls, root: Path, timeout: float, token: str | None = None) -> HubContext:
        """The hub of HF_ENDPOINT (read now: huggingface_hub's constants read it once, at import), and the token as
        huggingface_hub finds it (HF_TOKEN, then the saved login) unless one is given."""
        from huggingface_hub import constants, get_token

        token = token or get_token() or None
        endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        return cls(root, endpoint, token, None if token is None else token_source(token), timeout)


class HubUnreachable(WeightsError):
    """The hub could not be reached at all (no network, DNS, proxy, firewall, HF_HUB_OFFLINE)."""

    def __init__(self, message: str, *, endpoint: str, reason: str):
        super().__init__(message)
        self.endpoint = endpoint
        self.reason = reason


class Retryable(WeightsError):
    """A transfer that ended short or mangled: worth another attempt."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def classify(exc: BaseException) -> tuple[str, BaseException] | None:
    """What went wrong in a call to huggingface_hub (a kind: "gated", "revision", "file", "repo", "http", "offline",
    "timeout", "transport", "not a hub", "xet", "short", "disk full", "unwritable") and the error of `exc`'s chain of
    causes that says so; None for what is a bug here."""
    import httpx2
    from huggingface_hub.errors import (
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        XetDownloadError,
    )

    chain = list(_chain(exc))
    for kind, error_class in (
        ("gated", GatedRepoError), ("revision", RevisionNotFoundError), ("file", RemoteEntryNotFoundError),
        ("repo", RepositoryNotFoundError), ("http", HfHubHTTPError), ("offline", OfflineModeIsEnabled),
        ("timeout", httpx2.TimeoutException), ("transport", httpx2.TransportError), ("not a hub", FileMetadataError),
        ("xet", XetDownloadError),
    ):  # fmt: skip
        if found := next((e for e in chain if isinstance(e, error_class)), None):
            return kind, found
    for e in chain:
        if isinstance(e, OSError) and "Consistency check failed" in str(e):
            return "short", e
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk full", e
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return "unwritable", e
    return None


def translate(exc: BaseException, repo: HubRepo, f: str, ctx: HubContext, dest: Path | None) -> WeightsError | None:
    """One actionable WeightsError for a failure of huggingface_hub, or None for what is a bug here."""
    found = classify(exc)
    if found is None:
        return None
    kind, e = found
    rev, where, status = repo.revision, f"{repo.id} (revision {repo.revision[:7]}, file {f})", status_of(e)
    msg: str
    if kind == "gated" or (repo.gated and status in (401, 403)):
        msg = _gated_message(repo, ctx, status)
    elif kind == "revision":
        msg = (
            f"Revision {rev} of {repo.id} does not exist on {ctx.endpoint} (HTTP {status} for {f}). The pin in "
            f"flashsd/models.py is wrong or the commit was removed; see {repo.url}/commits/main."
        )
    elif kind == "file":
        msg = (
            f"{repo.id} at revision {rev} has no file {f} (HTTP {status} from {ctx.endpoint}). The file list in "
            f"flashsd/models.py does not match the repo; see {repo.url}/tree/{rev}."
        )
    elif kind == "repo":
        msg = (
            f"Repository {repo.id} was not found on {ctx.endpoint} (HTTP {status} while asking for {f} at "
            f"revision {rev}). Check the repo id in flashsd/models.py; if the repo is private, set HF_TOKEN to a "
            "token that can read it."
        )
    elif kind == "http":
        if status in (401, 403):
            msg = f"The hub at {ctx.endpoint} refused {where} (HTTP {status}). " + (
                "The token in use was rejected: set HF_TOKEN to a valid read token."
                if ctx.token
                else "Set HF_TOKEN to a token that can read it."
            )
        elif status == 404:
            msg = (
                f"{ctx.endpoint} answered HTTP 404 for {where}, without the hub's error headers: either the repo, "
                "the revision or the file is missing, or HF_ENDPOINT (or a proxy) points at something that is "
                "not a Hugging Face hub."
            )
        else:
            msg = (
                f"The hub at {ctx.endpoint} answered HTTP {status} for {where}. This is usually temporary: run the "
                "download again in a few minutes."
            )
    elif kind in ("offline", "timeout", "transport"):
        if kind == "offline":
            reason = "HF_HUB_OFFLINE is set"
        elif kind == "timeout":
            reason = f"no answer within {ctx.timeout:g} s ({type(e).__name__})"
        else:
            reason = redact(f"{type(e).__name__}: {e}".strip().rstrip(":"), ctx.token)[:300]
        message = redact(_unreachable_message(repo, f, ctx, reason), ctx.token)
        return HubUnreachable(message, endpoint=ctx.endpoint, reason=reason)
    elif kind == "not a hub":
        msg = f"{ctx.endpoint} does not answer like a Hugging Face hub for {where}: {e}"
    elif kind == "xet":
        msg = (
            f"The Xet transfer of {where} failed ({e}). Run again; if it keeps failing or stalls, set "
            "HF_HUB_DISABLE_XET=1 to download over plain HTTP."
        )
    elif kind == "short":
        return Retryable(redact(f"transfer ended short: {str(e).splitlines()[0]}", ctx.token))
    elif kind == "disk full":
        msg = (
            f"The disk filled up while writing {where} into {dest or ctx.root}: free some space, or point "
            "FLASHSD_WEIGHTS (or --root) at a larger disk."
        )
    else:  # unwritable
        msg = cannot_write(dest or Path(e.filename or "."), e)
    return WeightsError(redact(msg, ctx.token))


def input_message(exc: BaseException, input_name: str, repo: str, filename: str | None, ctx: HubContext) -> str | None:
    """The message, naming `input_name`, for a failure of huggingface_hub while fetching a file a user named (a style
    LoRA: `filename` of `repo`, None for the repo's listing), or None for what is a bug here."""
    found = classify(exc)
    if found is None:
        return None
    kind, e = found
    status, where = status_of(e), f"{repo}/{filename}" if filename else repo
    said = {
        "gated": f"the Hugging Face repo {repo} is gated: accept its terms on https://huggingface.co/{repo} and set "
        "HF_TOKEN to a token of that account.",
        "revision": f"the Hugging Face repo {repo} has no such revision: check the URL.",
        "file": f"the Hugging Face repo {repo} has no file {filename}: check the name.",
        "repo": f"the Hugging Face repo {repo} was not found (HTTP {status} from {ctx.endpoint}): check its name; if "
        "it is private, set HF_TOKEN to a token that can read it.",
        "http": f"{ctx.endpoint} refused {where} (HTTP {status}): set HF_TOKEN to a token that can read it."
        if status in (401, 403)
        else f"{ctx.endpoint} answered HTTP {status} for {where}: try again later.",
        "offline": f"{where} cannot be fetched from the Hugging Face hub: HF_HUB_OFFLINE is set here.",
        "timeout": f"the Hugging Face hub at {ctx.endpoint} answered nothing for {ctx.timeout:g} s "
        f"({type(e).__name__}) for {where}: try again later.",
        "transport": f"could not reach the Hugging Face hub at {ctx.endpoint} for {where} ({type(e).__name__}).",
        "short": f"the download of {where} was interrupted; nothing was kept: try again.",
    }.get(kind)
    return None if said is None else redact(f"{input_name}: {said}", ctx.token)


def status_of(e: BaseException | None) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _gated_message(repo: HubRepo, ctx: HubContext, status: int | None) -> str:
    http = f"HTTP {status}" if status else "access refused"
    if ctx.token is None:
        said = f"{repo.id} is a gated repository and no Hugging Face token was found ({http})."
    else:
        said = (
            f"{repo.id} is a gated repository and the hub refused the Hugging Face token from {ctx.token_source} "
            f"({http}): either its account has not accepted the license, or the token is invalid."
        )
    return (
        f"{said} Accept the license on the model page {repo.url} while logged in, create a read token at "
        "https://huggingface.co/settings/tokens, then set HF_TOKEN=<your token> (or run `hf auth login`) and "
        "run scripts/download-weights again."
    )


def _unreachable_message(repo: HubRepo, f: str, ctx: HubContext, reason: str) -> str:
    host = urlsplit(ctx.endpoint).netloc or ctx.endpoint
    return (
        f"Could not reach the Hugging Face hub at {ctx.endpoint} to fetch {repo.id} (revision "
        f"{repo.revision[:7]}, file {f}): {reason}. Give this machine network access to {host} (check proxy "
        "settings), or set HF_ENDPOINT to a reachable hub mirror, or copy the weights into "
        f"{repo_dir(ctx.root, repo)}/ from a machine that has them. If transfers start but stall, run again "
        "with HF_HUB_DISABLE_XET=1."
    )


def cannot_write(path: Path, e: OSError) -> str:
    return (
        f"Cannot write the weights under {path} ({e.strerror or e}). Point FLASHSD_WEIGHTS (or --root) at a "
        "writable folder, or fix the folder's permissions."
    )


def token_source(token: str) -> str:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip() == token:
            return var
    return "your saved login (hf auth login)"
