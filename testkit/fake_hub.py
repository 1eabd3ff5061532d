"""A tiny stand-in for the Hugging Face hub's download endpoints, on 127.0.0.1.

It answers what huggingface_hub 2.4's `hf_hub_download` asks for (see `file_download.py` there):

- `HEAD /{repo_id}/resolve/{revision}/{filename}` with `X-Repo-Commit` and an `ETag` (the git blob sha1 of a
  regular file). For an LFS file it answers like the real hub: `302` to a CDN on another origin, carrying
  `X-Linked-Etag` (the sha256) and `X-Linked-Size`; huggingface_hub keeps that metadata, does not follow the
  redirect for the HEAD, and drops the token when it fetches from the CDN.
- `GET` of the same URL (regular files) or of the CDN URL (LFS files), honouring `Range: bytes=N-` with `206`.
- Hub errors as the real hub labels them (`X-Error-Code`): `GatedRepo` (401 without a token, 403 with the wrong
  one), `RepoNotFound`, `RevisionNotFound`, `EntryNotFound`.
- `GET /api/models/{repo_id}` (and `/revision/{revision}`), what `HfApi.model_info` asks: `id`, `sha` and
  `siblings` (`rfilename`, with `?blobs=true` also `size` and `lfs`), as the real hub answers; like the real hub it
  answers a gated repo's metadata without a token. The branch `main` is the revision added last.

Faults for tests: drop the connection halfway through a file's first body, serve a file's first body corrupted
(same length), serve bodies slowly. Every request is recorded (`requests`, `count()`, `file_gets()`); anything else
(huggingface_hub also asks `/api/agent-harnesses`, once a day, for its user agent) gets a plain 404.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".model", ".bin", ".ckpt", ".pt", ".pth")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    authorization: str | None
    range: str | None


@dataclass
class _Repo:
    revisions: dict[str, dict[str, bytes]]  # revision -> {filename: content}
    token: str | None = None  # set for a gated repo
    main: str | None = None  # the revision the branch `main` points at (the last one added)


@dataclass
class FakeHub:
    """Use as a context manager: `with FakeHub() as hub: hub.add_repo(...); ... hub.url ...`."""

    chunk_size: int = 16 * 1024
    delay_per_chunk: float = 0.0  # seconds slept after each body chunk (slow downloads)
    repos: dict[str, _Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    drop_once: set[tuple[str, str]] = field(default_factory=set)  # (repo_id, filename)
    corrupt_once: set[tuple[str, str]] = field(default_factory=set)
    body_bytes_sent: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[str, tuple[str, str, bytes]] = {}  # sha256 -> (repo_id, filename, content)
        self._servers: list[ThreadingHTTPServer] = []

    # -- content -------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, revision: str, files: dict[str, bytes], *, token: str | None = None) -> None:
        """Serve `files` as repo `repo_id` at `revision` (a 40-hex commit); `token` makes the repo gated."""
        repo = self.repos.setdefault(repo_id, _Repo(revisions={}))
        repo.revisions[revision] = dict(files)
        repo.main = revision
        if token is not None:
            repo.token = token
        for name, data in files.items():
            if name.endswith(LFS_SUFFIXES):
                self._blobs[hashlib.sha256(data).hexdigest()] = (repo_id, name, data)

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def count(self, method: str | None = None, contains: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method) and (contains is None or contains in r.path)
            )

    def file_gets(self, contains: str | None = None) -> int:
        """GETs of file contents (resolve or CDN URLs): the transfers, not metadata or API calls."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if r.method == "GET"
                and ("/resolve/" in r.path or r.path.startswith("/cdn/"))
                and (contains is None or contains in r.path)
            )

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.body_bytes_sent = 0

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take(self, faults: set[tuple[str, str]], key: tuple[str, str]) -> bool:
        with self._lock:
            if key in faults:
                faults.discard(key)
                return True
            return False

    # -- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> FakeHub:
        self._hub = self._serve("hub")
        self._cdn = self._serve("cdn")
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def _serve(self, name: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(_Handler):
            fake = hub
            server_name = name

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), name=f"fake-{name}", daemon=True).start()
        self._servers.append(server)
        return server


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    server_name: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._handle(body=False)

    def do_GET(self) -> None:
        self._handle(body=True)

    # -- routing -------------------------------------------------------------------------------------------

    def _handle(self, body: bool) -> None:
        path = urlsplit(self.path).path
        self.fake._record(
            Request(self.server_name, self.command, path, self.headers.get("Authorization"), self.headers.get("Range"))
        )
        if self.server_name == "cdn":
            blob = self.fake._blobs.get(path.rsplit("/", 1)[-1]) if path.startswith("/cdn/") else None
            if blob is None:
                return self._error(404, None, "Not found", body)
            repo_id, filename, data = blob
            return self._send_file(repo_id, filename, data, body, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"'})

        parts = path.lstrip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) in (4, 6):
            return self._model_info(parts, body)
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, None, "Not found", body)
        repo_id = f"{parts[0]}/{parts[1]}"
        revision = unquote(parts[3])
        if revision == "main" and repo_id in self.fake.repos:
            revision = self.fake.repos[repo_id].main or revision
        filename = unquote("/".join(parts[4:]))

        repo = self.fake.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", body)
        if repo.token is not None:
            auth = self.headers.get("Authorization")
            if auth is None:
                msg = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                return self._error(401, "GatedRepo", msg, body)
            if auth != f"Bearer {repo.token}":
                msg = f"Access to model {repo_id} is restricted and you are not in the authorized list."
                return self._error(403, "GatedRepo", msg, body)
        files = repo.revisions.get(revision)
        if files is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        data = files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found", body, {"X-Repo-Commit": revision})

        headers = {"X-Repo-Commit": revision}
        if filename.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            headers |= {
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{git_blob_sha1(sha256.encode())}"',  # the pointer file's etag, as on the real hub
                "Location": f"{self.fake.cdn_url}/cdn/{sha256}?X-Amz-Signature=fake",
                "Content-Length": "0",
            }
            self.send_response(302)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        headers["ETag"] = f'"{git_blob_sha1(data)}"'
        return self._send_file(repo_id, filename, data, body, headers)

    def _model_info(self, parts: list[str], body: bool) -> None:
        repo_id = f"{parts[2]}/{parts[3]}"
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", body)
        revision = unquote(parts[5]) if len(parts) == 6 else repo.main
        if revision == "main":
            revision = repo.main
        files = repo.revisions.get(revision or "")
        if files is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        blobs = "blobs=true" in (urlsplit(self.path).query or "").lower()
        siblings = []
        for name, data in sorted(files.items()):
            sibling: dict = {"rfilename": name}
            if blobs:
                sibling |= {"size": len(data), "blobId": git_blob_sha1(data)}
                if name.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(sibling)
        info = {"id": repo_id, "modelId": repo_id, "sha": revision, "private": False,
                "gated": "auto" if repo.token else False, "siblings": siblings}  # fmt: skip
        payload = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload) if body else 0))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    # -- responses -----------------------------------------------------------------------------------------

    def _error(self, status: int, code: str | None, message: str, body: bool, extra: dict | None = None) -> None:
        payload = f'{{"error": "{message}"}}'.encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload) if body else 0))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _send_file(self, repo_id: str, filename: str, data: bytes, body: bool, headers: dict[str, str]) -> None:
        start = 0
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes=") :].partition("-")
            start = int(first or 0)
            end = int(last) if last else len(data) - 1
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
            payload = data[start : end + 1]
        else:
            payload = data

        drop = corrupt = False
        if body:
            key = (repo_id, filename)
            drop = self.fake._take(self.fake.drop_once, key)
            corrupt = not drop and self.fake._take(self.fake.corrupt_once, key)
        if corrupt:
            mid = len(payload) // 2
            payload = payload[:mid] + bytes(b ^ 0xFF for b in payload[mid : mid + 64]) + payload[mid + 64 :]

        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not body:
            return
        limit = len(payload) // 2 if drop else len(payload)
        sent = 0
        while sent < limit:
            chunk = payload[sent : min(limit, sent + self.fake.chunk_size)]
            try:
                self.wfile.write(chunk)
                self.wfile.flush()
            except OSError:  # the client went away (e.g. it was interrupted)
                self.close_connection = True
                return
            sent += len(chunk)
            with self.fake._lock:
                self.fake.body_bytes_sent += len(chunk)
            if self.fake.delay_per_chunk:
                time.sleep(self.fake.delay_per_chunk)
        if drop:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
