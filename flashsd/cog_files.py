"""The Cog worker's temporary files: coglet's copies of file inputs, and the prediction's output files.

coglet copies file inputs (URLs, data URIs) to temporary files and deletes them after the prediction, but not
when another input of the same request then fails to download (predict() never runs). The worker keeps its
temporary files in a folder of its own (`use_private_tempdir`), and each prediction first deletes what earlier
requests left there (`sweep_input_copies`). Outputs go to a fresh folder per prediction (`OutputFolders`), removed
when the next prediction starts (Cog has sent them by then) or at once if writing them failed.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("flashsd")

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


def sweep_input_copies(keep: Iterable[object] = (), older_than_s: float = 0.0) -> int:
    """Delete the files lying directly in the worker's private temporary folder except `keep` (the current
    prediction's inputs) and those younger than `older_than_s` (with concurrent predictions, another request's
    inputs may be arriving: only copies older than any live request are swept). coglet deletes a request's input
    copies after its prediction, but not when one input fails to download after others were copied: predict()
    never runs and the copies would stay for the container's lifetime. Folders (the outputs being delivered) are
    left alone; outside a private folder nothing is swept."""
    folder = Path(tempfile.gettempdir())
    if not folder.name.startswith(PRIVATE_TEMP_PREFIX):
        return 0
    kept = {os.path.realpath(os.fspath(p)) for p in keep if isinstance(p, (str, os.PathLike))}
    cutoff = time.time() - older_than_s
    removed = 0
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and os.path.realpath(entry.path) not in kept:
            with contextlib.suppress(FileNotFoundError):
                if older_than_s and entry.stat(follow_symlinks=False).st_mtime > cutoff:
                    continue
                os.unlink(entry.path)
                removed += 1
    if removed:
        log.info("Removed %d input file(s) left by earlier rejected requests", removed)
    return removed


class OutputFolders:
    """One fresh folder per prediction. Cog has sent a prediction's files once it returns, but with `keep`
    predictions in flight the newest `keep` folders may still be in use: older ones are removed as new ones come."""

    def __init__(self, keep: int = 1, prefix: str = "flashsd-"):
        self.keep, self.prefix = keep, prefix
        self.folders: collections.deque[Path] = collections.deque()

    def fresh(self) -> Path:
        while len(self.folders) >= self.keep:
            shutil.rmtree(self.folders.popleft(), ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix=self.prefix))
        self.folders.append(folder)
        return folder

    def discard(self, folder: Path) -> None:
        """Remove a folder whose files were never delivered (writing them failed or was cancelled)."""
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(ValueError):
            self.folders.remove(folder)
