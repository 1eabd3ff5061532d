"""What a failed exchange with the Hugging Face hub means, said so that a person can act on it.

Every failure of huggingface_hub (HTTP status, gated repo, wrong pin, no network, Xet, disk) becomes one
`WeightsError` paragraph naming the repo, the file and the fix; the token never appears in any of them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import WeightsError
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


def translate(exc: BaseException, repo: HubRepo, f: str, ctx: HubContext, dest: Path | None) -> WeightsError | None:
    """One actionable WeightsError for a failure of huggingface_hub, or None for what is a bug here."""
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

    def find(kind):
        return next((e for e in chain if isinstance(e, kind)), None)

    rev, where = repo.revision, f"{repo.id} (revision {repo.revision[:7]}, file {f})"
    msg: str
    status = status_of(find(HfHubHTTPError))
    if find(GatedRepoError) or (repo.gated and status in (401, 403)):
        msg = _gated_message(repo, ctx, status)
    elif e := find(RevisionNotFoundError):
        msg = (
            f"Revision {rev} of {repo.id} does not exist on {ctx.endpoint} (HTTP {status_of(e)} for {f}). The pin in "
            f"flashsd/models.py is wrong or the commit was removed; see {repo.url}/commits/main."
        )
    elif e := find(RemoteEntryNotFoundError):
        msg = (
            f"{repo.id} at revision {rev} has no file {f} (HTTP {status_of(e)} from {ctx.endpoint}). The file list in "
            f"flashsd/models.py does not match the repo; see {repo.url}/tree/{rev}."
        )
    elif e := find(RepositoryNotFoundError):
        msg = (
            f"Repository {repo.id} was not found on {ctx.endpoint} (HTTP {status_of(e)} while asking for {f} at "
            f"revision {rev}). Check the repo id in flashsd/models.py; if the repo is private, set HF_TOKEN to a "
            "token that can read it."
        )
    elif find(HfHubHTTPError):
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
    elif find(OfflineModeIsEnabled):
        reason = "HF_HUB_OFFLINE is set"
        return HubUnreachable(_unreachable_message(repo, f, ctx, reason), endpoint=ctx.endpoint, reason=reason)
    elif e := find(httpx2.TransportError):
        if isinstance(e, httpx2.TimeoutException):
            reason = f"no answer within {ctx.timeout:g} s ({type(e).__name__})"
        else:
            reason = redact(f"{type(e).__name__}: {e}".strip().rstrip(":"), ctx.token)[:300]
        return HubUnreachable(_unreachable_message(repo, f, ctx, reason), endpoint=ctx.endpoint, reason=reason)
    elif e := find(FileMetadataError):
        msg = f"{ctx.endpoint} does not answer like a Hugging Face hub for {where}: {e}"
    elif e := find(XetDownloadError):
        msg = (
            f"The Xet transfer of {where} failed ({e}). Run again; if it keeps failing or stalls, set "
            "HF_HUB_DISABLE_XET=1 to download over plain HTTP."
        )
    elif (e := find(OSError)) and "Consistency check failed" in str(e):
        return Retryable(redact(f"transfer ended short: {str(e).splitlines()[0]}", ctx.token))
    elif (e := find(OSError)) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = (
            f"The disk filled up while writing {where} into {dest or ctx.root}: free some space, or point "
            "FLASHSD_WEIGHTS (or --root) at a larger disk."
        )
    elif (e := find(OSError)) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        msg = cannot_write(dest or Path(e.filename or "."), e)
    else:
        return None
    return WeightsError(redact(msg, ctx.token))


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


def redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text
