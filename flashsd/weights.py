"""Where each pinned Hugging Face repo lives under the weights root, what is missing, and the download.

Layout: `<root>/<org>/<repo>/` is a snapshot of the hub repo `<org>/<repo>` at its pinned revision, in the
repo's own layout, holding only the files `flashsd.models` lists (plus huggingface_hub's bookkeeping in
`.cache/huggingface/`). The root is `FLASHSD_WEIGHTS`, else `weights/` in the project root.

Transfers are `huggingface_hub.hf_hub_download(local_dir=...)`, one call per listed file (not
`snapshot_download`: it matches names with fnmatch, silently skips listed files the repo lacks, and returns an
incomplete `local_dir` as-is when the hub is unreachable). What huggingface_hub 2.4 does not do, this module adds:

- a plan before any transfer: a HEAD per file not yet known to be good, so a gated repo, a wrong pin or a
  missing file fails in seconds, before gigabytes of other files arrive, with a message naming the fix;
- verification of what arrived: size and sha256 (LFS files) or git blob sha1 (others) against what the hub
  announced (`X-Linked-Size`/`X-Linked-Etag`/`ETag`); huggingface_hub checks only the size, so a corrupted
  body of the right length would be kept. A bad file is fetched again (at most `ATTEMPTS` times);
- files already on disk without huggingface_hub's metadata (copied in by hand) are hashed, not re-fetched;
- short timeouts and no retry on the first contact, so a machine without network fails in seconds;
- errors translated into one `WeightsError` paragraph; the token never appears in anything this module says.

A second run makes no request at all: every file whose metadata says it was fetched and verified at the pinned
commit, and that was not modified since, is taken as is (`verify=True` re-hashes everything against the hub).
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterator
from urllib.parse import urlsplit

from .errors import WeightsError
from .models import FlashModel, HubRepo

if TYPE_CHECKING:
    from huggingface_hub import HfFileMetadata

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENDPOINT = "https://huggingface.co"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
HEAD_TIMEOUT_S = 10.0  # per metadata request; HF_HUB_ETAG_TIMEOUT overrides
CONNECT_TIMEOUT_S = 5.0
ATTEMPTS = 3  # transfers of one file before a corrupted arrival is an error
STALE_PARTIAL_S = 3600  # partial files older than this were left by a killed run
_CHUNK = 8 * 1024 * 1024

Log = Callable[[str], None]


class HubUnreachable(WeightsError):
    """The hub could not be reached at all (no network, DNS, proxy, firewall, HF_HUB_OFFLINE)."""

    def __init__(self, message: str, *, endpoint: str, reason: str):
        super().__init__(message)
        self.endpoint = endpoint
        self.reason = reason


@dataclass
class RepoReport:
    repo: str
    revision: str
    path: Path
    files: int  # files listed for this repo
    fetched: list[str] = field(default_factory=list)  # transferred in this run
    repaired: list[str] = field(default_factory=list)  # found broken (on disk or on arrival) and fetched again
    bytes_fetched: int = 0
    seconds: float = 0.0


@dataclass
class DownloadReport:
    model: str
    root: Path
    repos: list[RepoReport] = field(default_factory=list)

    @property
    def fetched(self) -> list[str]:
        return [f"{r.repo}/{f}" for r in self.repos for f in r.fetched]

    @property
    def bytes_fetched(self) -> int:
        return sum(r.bytes_fetched for r in self.repos)

    @property
    def nothing_fetched(self) -> bool:
        return not self.fetched


# -- where things are (no network, no huggingface_hub import) ---------------------------------------------------


def default_root() -> Path:
    """`FLASHSD_WEIGHTS` if set, else `weights/` in the project root (beside predict.py)."""
    env = os.environ.get("FLASHSD_WEIGHTS")
    return Path(env).expanduser().resolve() if env else PROJECT_ROOT / "weights"


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


# -- ensure (what setup() calls) ---------------------------------------------------------------------------------


def ensure_weights(model: FlashModel, root: Path | str, *, log: Log = print) -> None:
    """Return at once when every file is there (no network); otherwise download what is missing."""
    root = Path(root)
    missing = missing_files(model, root)
    if not missing:
        return
    log(f"{model.title}: {len(missing)} weight file(s) missing under {root}; downloading them")
    try:
        download(model, root, log=log)
    except HubUnreachable as e:
        raise WeightsError(_missing_message(model, root, missing, f"the hub is unreachable ({e.reason})")) from e
    still = missing_files(model, root)
    if still:  # download() verified everything it fetched, so this is a bug or a concurrent deletion
        raise WeightsError(_missing_message(model, root, still, "they are still missing after the download"))


def _missing_message(model: FlashModel, root: Path, missing: list[Path], why: str) -> str:
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


# -- download ----------------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    root: Path
    endpoint: str
    token: str | None
    token_source: str | None
    timeout: float


@dataclass
class _Plan:
    repo: HubRepo
    dest: Path
    report: RepoReport
    todo: list[str]  # files to transfer, in list order
    metas: dict[str, "HfFileMetadata"]


def download(
    model: FlashModel, root: Path | str, *, token: str | None = None, log: Log = print, verify: bool = False
) -> DownloadReport:
    """Fetch exactly the listed files of every repo of `model` at the pinned revisions into `root`.

    Idempotent (files fetched and verified before are not even asked about), and what arrives is checked
    against the size and hash the hub announces. `token` defaults to huggingface_hub's own resolution
    (`HF_TOKEN`, then the saved login). `verify=True` re-checks every file on disk against the hub.
    Raises `WeightsError` (`HubUnreachable` when the hub cannot be reached) with a message a person can act on.
    """
    root = Path(root)
    lists = {repo.id: listed_files(repo) for repo in model.repos}  # refuse pickles before anything else
    # Faster Xet transfers, as Cog's own diffusers example does; read by hf_xet when its session starts.
    os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")
    from huggingface_hub import constants, get_token

    token = token or get_token() or None
    ctx = _Ctx(
        root=root,
        endpoint=(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT or DEFAULT_ENDPOINT).rstrip("/"),
        token=token,
        token_source=None if token is None else _token_source(token),
        timeout=float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HEAD_TIMEOUT_S),
    )
    report = DownloadReport(model=model.key, root=root)

    plans = []
    for repo in model.repos:
        try:
            plans.append(_plan(repo, lists[repo.id], root, ctx, log, verify))
        except OSError as e:  # huggingface_hub's bookkeeping under <root>/.../.cache could not be written
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise WeightsError(_cannot_write(repo_dir(root, repo), e)) from e
    report.repos = [p.report for p in plans]
    _check_disk_space(root, sum(p.metas[f].size or 0 for p in plans for f in p.todo))

    for plan in plans:
        if plan.todo:
            _fetch_repo(plan, ctx, log)

    total = sum(len(lists[r.id]) for r in model.repos)
    if report.nothing_fetched:
        log(f"{model.title}: all {total} files present in {root}; nothing fetched")
    else:
        fetched = f"fetched {len(report.fetched)} ({_human(report.bytes_fetched)})"
        log(f"{model.title}: all {total} files present in {root}; {fetched}")
    return report


def _plan(repo: HubRepo, files: tuple[str, ...], root: Path, ctx: _Ctx, log: Log, verify: bool) -> _Plan:
    from huggingface_hub._local_folder import read_download_metadata, write_download_metadata

    dest = repo_dir(root, repo)
    rev = repo.revision[:7]
    report = RepoReport(repo=repo.id, revision=repo.revision, path=dest, files=len(files))

    # Known good: fetched (and verified) at this very commit, and not modified since.
    unknown = [f for f in files if verify or not _known_good(dest, f, repo)]
    if not unknown:
        log(f"{repo.id}: all {len(files)} files present at rev {rev}; nothing to fetch")
        return _Plan(repo, dest, report, [], {})

    metas = {f: _head(repo, f, ctx) for f in unknown}
    todo: list[str] = []
    for f in unknown:
        path, meta = dest / f, metas[f]
        if not path.is_file():
            todo.append(f)
            continue
        md = read_download_metadata(dest, f)
        if not verify and md is not None and md.etag == meta.etag and _size_problem(path, meta) is None:
            problem = None  # same content, newer pin
        else:
            problem = _content_problem(path, meta)
        if problem is None:
            write_download_metadata(dest, f, commit_hash=meta.commit_hash, etag=meta.etag)
        else:
            log(f"{repo.id}: {f} on disk does not match the hub ({problem}); fetching it again")
            report.repaired.append(f)
            todo.append(f)

    if not todo:
        log(f"{repo.id}: all {len(files)} files present at rev {rev} (checked against the hub); nothing to fetch")
    else:
        size = sum(metas[f].size or 0 for f in todo)
        log(f"{repo.id}: fetching {len(todo)} of {len(files)} files at rev {rev} ({_human(size)}) into {dest}")
    return _Plan(repo, dest, report, todo, metas)


def _known_good(dest: Path, f: str, repo: HubRepo) -> bool:
    """Fetched and verified at the pinned commit (huggingface_hub's metadata), and not modified since."""
    from huggingface_hub._local_folder import read_download_metadata

    if len(repo.revision) != 40 or not (dest / f).is_file():
        return False  # a branch name may have moved: ask the hub
    md = read_download_metadata(dest, f)  # None when the file changed after the metadata was written
    return md is not None and md.commit_hash == repo.revision


def _fetch_repo(plan: _Plan, ctx: _Ctx, log: Log) -> None:
    repo, dest, report = plan.repo, plan.dest, plan.report
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(_cannot_write(dest, e)) from e
    _remove_stale_partials(dest, log)
    started = time.monotonic()
    for i, f in enumerate(plan.todo, 1):
        meta = plan.metas[f]
        log(f"  [{i}/{len(plan.todo)}] {repo.id}/{f} ({_human(meta.size or 0)})")
        _fetch_file(repo, f, dest, meta, ctx, log, report)
        report.fetched.append(f)
        report.bytes_fetched += (dest / f).stat().st_size
    report.seconds = time.monotonic() - started
    rate = report.bytes_fetched / max(report.seconds, 1e-3)
    log(
        f"{repo.id}: fetched {len(report.fetched)} files ({_human(report.bytes_fetched)}) "
        f"in {report.seconds:.1f} s ({_human(rate)}/s)"
    )


def _fetch_file(
    repo: HubRepo, f: str, dest: Path, meta: "HfFileMetadata", ctx: _Ctx, log: Log, report: RepoReport
) -> None:
    from huggingface_hub import hf_hub_download

    problem = ""
    for attempt in range(1, ATTEMPTS + 1):
        _discard(dest, f)
        try:
            hf_hub_download(
                repo.id,
                f,
                revision=repo.revision,
                local_dir=dest,
                token=ctx.token or False,
                endpoint=ctx.endpoint,
                etag_timeout=ctx.timeout,
                # A retry must not copy the same bytes again from huggingface_hub's own cache.
                force_download=attempt > 1,
            )
        except Exception as e:
            err = _translate(e, repo, f, ctx, dest)
            if err is None:
                raise
            if not isinstance(err, _Retryable):
                raise err from e
            problem = str(err)
        else:
            problem = _content_problem(dest / f, meta) or ""
            if not problem:
                return
        if f not in report.repaired:
            report.repaired.append(f)
        if attempt < ATTEMPTS:
            log(f"  {repo.id}/{f} arrived corrupted ({problem}); fetching it again ({attempt + 1}/{ATTEMPTS})")
    _discard(dest, f)
    raise WeightsError(
        _redact(
            f"{repo.id}/{f} at revision {repo.revision[:7]} arrived corrupted {ATTEMPTS} times from {ctx.endpoint} "
            f"(last: {problem}). Something between this machine and the hub alters downloads (a proxy, a full or "
            "failing disk): check it and run again; if transfers go through Xet, HF_HUB_DISABLE_XET=1 uses plain "
            "HTTP instead.",
            ctx.token,
        )
    )


class _Retryable(WeightsError):
    """A transfer that ended short or mangled: worth another attempt."""


def _head(repo: HubRepo, f: str, ctx: _Ctx) -> "HfFileMetadata":
    """What the hub announces for one file: size, etag (sha256 for LFS files), commit. Fails fast."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    url = hf_hub_url(repo.id, f, revision=repo.revision, endpoint=ctx.endpoint)
    # A blackholed network shows as a connect timeout: give up on that sooner than on a slow answer.
    timeout = httpx2.Timeout(ctx.timeout, connect=min(ctx.timeout, CONNECT_TIMEOUT_S))
    for attempt in range(3):
        try:
            meta = get_hf_file_metadata(url, token=ctx.token or False, timeout=timeout, endpoint=ctx.endpoint)
        except Exception as e:
            # Hub busy or down: a short, bounded retry. No retry on a network failure: the first contact
            # decides, in seconds.
            if isinstance(e, HfHubHTTPError) and _status(e) in (429, 500, 502, 503, 504) and attempt < 2:
                time.sleep(1 + attempt)
                continue
            err = _translate(e, repo, f, ctx, None)
            if err is None:
                raise
            raise err from e
        if meta.commit_hash is None or meta.etag is None:
            raise WeightsError(
                f"{ctx.endpoint} answered for {repo.id}/{f} without the X-Repo-Commit/ETag headers of a Hugging "
                "Face hub: HF_ENDPOINT (or a proxy in the way) does not point at a hub. Unset HF_ENDPOINT or fix it."
            )
        return meta
    raise AssertionError("unreachable")


# -- checks ------------------------------------------------------------------------------------------------------


def _size_problem(path: Path, meta: "HfFileMetadata") -> str | None:
    size = path.stat().st_size
    if meta.size is not None and size != meta.size:
        return f"{size} bytes, the hub says {meta.size}"
    return None


def _content_problem(path: Path, meta: "HfFileMetadata") -> str | None:
    """None when `path` has the size and hash the hub announced, else what differs."""
    if not path.is_file():
        return "file missing after the transfer"
    problem = _size_problem(path, meta)
    if problem:
        return problem
    etag = (meta.etag or "").lower()
    if len(etag) == 64 and _is_hex(etag):
        got, kind = _sha256(path), "sha256"
    elif len(etag) == 40 and _is_hex(etag):
        got, kind = _git_blob_sha1(path), "git sha1"
    else:
        return None  # an etag that is no content hash: the size is all we can check
    if got != etag:
        return f"{kind} {got[:12]}..., the hub says {etag[:12]}..."
    return None


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    _feed(h, path)
    return h.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    _feed(h, path)
    return h.hexdigest()


def _feed(h: "hashlib._Hash", path: Path) -> None:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])


# -- housekeeping ------------------------------------------------------------------------------------------------


def _discard(dest: Path, f: str) -> None:
    """Remove a file and huggingface_hub's metadata for it, so the next transfer starts clean."""
    (dest / f).unlink(missing_ok=True)
    (dest / ".cache" / "huggingface" / "download" / f"{f}.metadata").unlink(missing_ok=True)


def _remove_stale_partials(dest: Path, log: Log) -> None:
    """huggingface_hub 2.4 never resumes a partial file across runs and deletes it on a clean exit; a killed
    run (SIGKILL, OOM) leaves it behind under a random name. Remove the ones nobody has written to for an hour."""
    folder = dest / ".cache" / "huggingface" / "download"
    now, freed = time.time(), 0
    for p in folder.rglob("*.incomplete") if folder.is_dir() else ():
        try:
            st = p.stat()
            if now - st.st_mtime > STALE_PARTIAL_S:
                p.unlink()
                freed += st.st_size
        except OSError:
            pass
    if freed:
        log(f"{dest}: removed {_human(freed)} of partial files left by an interrupted run")


def _check_disk_space(root: Path, needed: int) -> None:
    if needed <= 0:
        return
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise WeightsError(
            f"Not enough disk space for the weights: {_human(needed)} to fetch into {root}, {_human(free)} free. "
            "Free some space, or point FLASHSD_WEIGHTS (or --root) at a larger disk."
        )


# -- messages ----------------------------------------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _translate(exc: BaseException, repo: HubRepo, f: str, ctx: _Ctx, dest: Path | None) -> WeightsError | None:
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
    )

    try:
        from huggingface_hub.errors import XetDownloadError
    except ImportError:  # pragma: no cover - older huggingface_hub
        XetDownloadError = ()  # type: ignore[assignment]

    chain = list(_chain(exc))

    def find(kind):
        return next((e for e in chain if isinstance(e, kind)), None)

    rev, where = repo.revision, f"{repo.id} (revision {repo.revision[:7]}, file {f})"
    msg: str
    status = _status(find(HfHubHTTPError))
    if find(GatedRepoError) or (repo.gated and status in (401, 403)):
        msg = _gated_message(repo, ctx, status)
    elif e := find(RevisionNotFoundError):
        msg = (
            f"Revision {rev} of {repo.id} does not exist on {ctx.endpoint} (HTTP {_status(e)} for {f}). The pin in "
            f"flashsd/models.py is wrong or the commit was removed; see {repo.url}/commits/main."
        )
    elif e := find(RemoteEntryNotFoundError):
        msg = (
            f"{repo.id} at revision {rev} has no file {f} (HTTP {_status(e)} from {ctx.endpoint}). The file list in "
            f"flashsd/models.py does not match the repo; see {repo.url}/tree/{rev}."
        )
    elif e := find(RepositoryNotFoundError):
        msg = (
            f"Repository {repo.id} was not found on {ctx.endpoint} (HTTP {_status(e)} while asking for {f} at "
            f"revision {rev}). Check the repo id in flashsd/models.py; if the repo is private, set HF_TOKEN to a "
            "token that can read it."
        )
    elif find(HfHubHTTPError):
        if status in (401, 403):
            msg = (
                f"The hub at {ctx.endpoint} refused {where} (HTTP {status}). "
                + (
                    "The token in use was rejected: set HF_TOKEN to a valid read token."
                    if ctx.token
                    else "Set HF_TOKEN to a token that can read it."
                )
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
            reason = _redact(f"{type(e).__name__}: {e}".strip().rstrip(":"), ctx.token)[:300]
        return HubUnreachable(_unreachable_message(repo, f, ctx, reason), endpoint=ctx.endpoint, reason=reason)
    elif e := find(FileMetadataError):
        msg = f"{ctx.endpoint} does not answer like a Hugging Face hub for {where}: {e}"
    elif e := find(XetDownloadError):
        msg = (
            f"The Xet transfer of {where} failed ({e}). Run again; if it keeps failing or stalls, set "
            "HF_HUB_DISABLE_XET=1 to download over plain HTTP."
        )
    elif (e := find(OSError)) and "Consistency check failed" in str(e):
        return _Retryable(_redact(f"transfer ended short: {str(e).splitlines()[0]}", ctx.token))
    elif (e := find(OSError)) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = (
            f"The disk filled up while writing {where} into {dest or ctx.root}: free some space, or point "
            "FLASHSD_WEIGHTS (or --root) at a larger disk."
        )
    elif (e := find(OSError)) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        msg = _cannot_write(dest or Path(e.filename or "."), e)
    else:
        return None
    return WeightsError(_redact(msg, ctx.token))


def _status(e: BaseException | None) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _gated_message(repo: HubRepo, ctx: _Ctx, status: int | None) -> str:
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


def _unreachable_message(repo: HubRepo, f: str, ctx: _Ctx, reason: str) -> str:
    host = urlsplit(ctx.endpoint).netloc or ctx.endpoint
    return (
        f"Could not reach the Hugging Face hub at {ctx.endpoint} to fetch {repo.id} (revision "
        f"{repo.revision[:7]}, file {f}): {reason}. Give this machine network access to {host} (check proxy "
        "settings), or set HF_ENDPOINT to a reachable hub mirror, or copy the weights into "
        f"{repo_dir(ctx.root, repo)}/ from a machine that has them. If transfers start but stall, run again "
        "with HF_HUB_DISABLE_XET=1."
    )


def _cannot_write(path: Path, e: OSError) -> str:
    return (
        f"Cannot write the weights under {path} ({e.strerror or e}). Point FLASHSD_WEIGHTS (or --root) at a "
        "writable folder, or fix the folder's permissions."
    )


def _token_source(token: str) -> str:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip() == token:
            return var
    return "your saved login (hf auth login)"


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
