"""The download: exactly the pinned files of a model into the weights layout (flashsd.weights), verified.

Transfers are `huggingface_hub.hf_hub_download(local_dir=...)`, one call per listed file (not
`snapshot_download`: it matches names with fnmatch, silently skips listed files the repo lacks, and returns an
incomplete `local_dir` as-is when the hub is unreachable). What huggingface_hub 2.4 does not do, this module adds:

- a plan before any transfer: a HEAD per file not yet known to be good, so a gated repo, a wrong pin or a
  missing file fails in seconds, before gigabytes of other files arrive, with a message naming the fix;
- verification of what arrived: size and sha256 (LFS files) or git blob sha1 (others) against what the hub
  announced (`X-Linked-Size`/`X-Linked-Etag`/`ETag`); huggingface_hub checks only the size, so a corrupted
  body of the right length would be kept. A bad file is fetched again (at most `ATTEMPTS` times);
- its own record of verified files (`.cache/flashsd/verified.json` in each repo folder: commit, etag, size and
  modification time of each file), so "already verified" never depends on huggingface_hub's private
  bookkeeping; files on disk without a record (copied in by hand) are hashed, not re-fetched;
- short timeouts and no retry on the first contact, so a machine without network fails in seconds;
- errors translated into one `WeightsError` paragraph; the token never appears in anything this module says.

A second run makes no request at all: every file the record says was fetched and verified at the pinned
commit, and that was not modified since, is taken as is (`verify=True` re-hashes everything against the hub).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from .errors import WeightsError, redact
from .hub_errors import HubContext, HubUnreachable, Retryable, cannot_write, status_of, translate
from .models import FlashModel, HubRepo
from .weights import listed_files, missing_files, missing_message, repo_dir

if TYPE_CHECKING:
    from huggingface_hub import HfFileMetadata

HEAD_TIMEOUT_S = 10.0  # per metadata request; HF_HUB_ETAG_TIMEOUT overrides
CONNECT_TIMEOUT_S = 5.0
ATTEMPTS = 3  # transfers of one file before a corrupted arrival is an error
STALE_PARTIAL_S = 3600  # partial files older than this were left by a killed run
RECORD = Path(".cache") / "flashsd" / "verified.json"  # in each repo folder

Log = Callable[[str], None]


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
        raise WeightsError(missing_message(model, root, missing, f"the hub is unreachable ({e.reason})")) from e
    still = missing_files(model, root)
    if still:  # download() verified everything it fetched, so this is a bug or a concurrent deletion
        raise WeightsError(missing_message(model, root, still, "they are still missing after the download"))


# -- download ----------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    repo: HubRepo
    dest: Path
    report: RepoReport
    todo: list[str]  # files to transfer, in list order
    metas: dict[str, HfFileMetadata]


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
    ctx = HubContext.current(root, float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HEAD_TIMEOUT_S), token)
    report = DownloadReport(model=model.key, root=root)

    plans = []
    for repo in model.repos:
        try:
            plans.append(_plan(repo, lists[repo.id], root, ctx, log, verify))
        except OSError as e:  # huggingface_hub's bookkeeping under <root>/.../.cache could not be written
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise WeightsError(cannot_write(repo_dir(root, repo), e)) from e
    report.repos = [p.report for p in plans]
    _check_disk_space(root, sum(p.metas[f].size or 0 for p in plans for f in p.todo))

    for plan in plans:
        if plan.todo:
            _fetch_repo(plan, ctx, log)

    total = sum(len(lists[r.id]) for r in model.repos)
    if report.nothing_fetched:
        log(f"{model.title}: all {total} files present in {root}; nothing fetched")
    else:
        fetched = f"fetched {len(report.fetched)} ({tqdm.format_sizeof(report.bytes_fetched, 'B')})"
        log(f"{model.title}: all {total} files present in {root}; {fetched}")
    return report


def _plan(repo: HubRepo, files: tuple[str, ...], root: Path, ctx: HubContext, log: Log, verify: bool) -> _Plan:
    dest = repo_dir(root, repo)
    rev = repo.revision[:7]
    report = RepoReport(repo=repo.id, revision=repo.revision, path=dest, files=len(files))
    record = VerifiedRecord(dest)

    # Known good: fetched (and verified) at this very commit, and not modified since. (A branch name may have
    # moved: only a full commit hash is trusted without asking the hub.)
    pinned = len(repo.revision) == 40
    unknown = [f for f in files if verify or not (pinned and record.commit(f) == repo.revision)]
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
        if not verify and record.etag(f) == meta.etag and _size_problem(path, meta) is None:
            problem = None  # same content, newer pin
        else:
            problem = _content_problem(path, meta)
        if problem is None:
            record.verified(f, meta)
        else:
            log(f"{repo.id}: {f} on disk does not match the hub ({problem}); fetching it again")
            report.repaired.append(f)
            todo.append(f)

    if not todo:
        log(f"{repo.id}: all {len(files)} files present at rev {rev} (checked against the hub); nothing to fetch")
    else:
        size = sum(metas[f].size or 0 for f in todo)
        log(
            f"{repo.id}: fetching {len(todo)} of {len(files)} files at rev {rev} ({tqdm.format_sizeof(size, 'B')}) "
            f"into {dest}"
        )
    return _Plan(repo, dest, report, todo, metas)


class VerifiedRecord:
    """flashsd's own record of the files of one repo folder that were checked against the hub: the commit and
    etag they were verified at, and their size and modification time then. An entry counts only while the file
    still has that size and time, so a file changed on disk since is asked about again."""

    def __init__(self, dest: Path):
        self.dest, self.path = dest, dest / RECORD
        try:
            self.entries: dict[str, dict] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def _current(self, f: str) -> dict:
        entry = self.entries.get(f) or {}
        try:
            st = (self.dest / f).stat()
        except OSError:
            return {}
        return entry if (entry.get("size"), entry.get("mtime_ns")) == (st.st_size, st.st_mtime_ns) else {}

    def commit(self, f: str) -> str | None:
        return self._current(f).get("commit")

    def etag(self, f: str) -> str | None:
        return self._current(f).get("etag")

    def verified(self, f: str, meta: HfFileMetadata) -> None:
        """Record that `f` now has what the hub announces in `meta` (written at once: a killed run keeps it)."""
        st = (self.dest / f).stat()
        self.entries[f] = {
            "commit": meta.commit_hash,
            "etag": meta.etag,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        os.replace(partial, self.path)


def _fetch_repo(plan: _Plan, ctx: HubContext, log: Log) -> None:
    repo, dest, report = plan.repo, plan.dest, plan.report
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(cannot_write(dest, e)) from e
    _remove_stale_partials(dest, log)
    started = time.monotonic()
    for i, f in enumerate(plan.todo, 1):
        meta = plan.metas[f]
        log(f"  [{i}/{len(plan.todo)}] {repo.id}/{f} ({tqdm.format_sizeof(meta.size or 0, 'B')})")
        _fetch_file(repo, f, dest, meta, ctx, log, report)
        report.fetched.append(f)
        report.bytes_fetched += (dest / f).stat().st_size
    report.seconds = time.monotonic() - started
    rate = report.bytes_fetched / max(report.seconds, 1e-3)
    log(
        f"{repo.id}: fetched {len(report.fetched)} files ({tqdm.format_sizeof(report.bytes_fetched, 'B')}) "
        f"in {report.seconds:.1f} s ({tqdm.format_sizeof(rate, 'B')}/s)"
    )


def _fetch_file(
    repo: HubRepo, f: str, dest: Path, meta: HfFileMetadata, ctx: HubContext, log: Log, report: RepoReport
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
            err = translate(e, repo, f, ctx, dest)
            if err is None:
                raise
            if not isinstance(err, Retryable):
                raise err from e
            problem = str(err)
        else:
            problem = _content_problem(dest / f, meta) or ""
            if not problem:
                VerifiedRecord(dest).verified(f, meta)
                return
        if f not in report.repaired:
            report.repaired.append(f)
        if attempt < ATTEMPTS:
            log(f"  {repo.id}/{f} arrived corrupted ({problem}); fetching it again ({attempt + 1}/{ATTEMPTS})")
    _discard(dest, f)
    raise WeightsError(
        redact(
            f"{repo.id}/{f} at revision {repo.revision[:7]} arrived corrupted {ATTEMPTS} times from {ctx.endpoint} "
            f"(last: {problem}). Something between this machine and the hub alters downloads (a proxy, a full or "
            "failing disk): check it and run again; if transfers go through Xet, HF_HUB_DISABLE_XET=1 uses plain "
            "HTTP instead.",
            ctx.token,
        )
    )


def _head(repo: HubRepo, f: str, ctx: HubContext) -> HfFileMetadata:
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
            if isinstance(e, HfHubHTTPError) and status_of(e) in (429, 500, 502, 503, 504) and attempt < 2:
                time.sleep(1 + attempt)
                continue
            err = translate(e, repo, f, ctx, None)
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


def _size_problem(path: Path, meta: HfFileMetadata) -> str | None:
    size = path.stat().st_size
    if meta.size is not None and size != meta.size:
        return f"{size} bytes, the hub says {meta.size}"
    return None


def _content_problem(path: Path, meta: HfFileMetadata) -> str | None:
    """None when `path` has the size and hash the hub announced, else what differs."""
    if not path.is_file():
        return "file missing after the transfer"
    problem, size = _size_problem(path, meta), path.stat().st_size
    if problem:
        return problem
    etag = (meta.etag or "").lower()
    if not re.fullmatch("[0-9a-f]{64}|[0-9a-f]{40}", etag):
        return None  # an etag that is no content hash: the size is all we can check
    # LFS files: the sha256 of the content; other files: git's blob id, the sha1 of `blob <size>\0` and the content.
    kind, digest = ("sha256", "sha256") if len(etag) == 64 else ("git sha1", lambda: hashlib.sha1(b"blob %d\0" % size))
    with open(path, "rb") as f:
        got = hashlib.file_digest(f, digest).hexdigest()
    if got != etag:
        return f"{kind} {got[:12]}..., the hub says {etag[:12]}..."
    return None


# -- housekeeping ------------------------------------------------------------------------------------------------


def _discard(dest: Path, f: str) -> None:
    """Remove a file, so the next transfer starts clean (huggingface_hub fetches a file that is not there)."""
    (dest / f).unlink(missing_ok=True)


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
        log(f"{dest}: removed {tqdm.format_sizeof(freed, 'B')} of partial files left by an interrupted run")


def _check_disk_space(root: Path, needed: int) -> None:
    if needed <= 0:
        return
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise WeightsError(
            f"Not enough disk space for the weights: {tqdm.format_sizeof(needed, 'B')} to fetch into {root}, "
            f"{tqdm.format_sizeof(free, 'B')} free. Free some space, or point FLASHSD_WEIGHTS (or --root) at a larger "
            "disk."
        )
