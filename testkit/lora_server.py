"""A tiny HTTP file server on 127.0.0.1 for LoRA downloads, with the faults a real host shows.

    with LoraServer() as server:
        url = server.add("/style.safetensors", data)                      # 200 with Content-Length
        url = server.add("/api/download/models/1", data, filename="x.safetensors")  # CivitAI-like: no extension,
                                                                           # the name in Content-Disposition
        url = server.add("/private", status=401)                           # an error status
        url = server.add("/slow", data, delay_per_chunk=0.05)              # slow body
        url = server.add("/cut", data, drop_after=len(data) // 2)          # connection closed mid-body
        url = server.add("/stall", data, stall=True)                       # headers, then nothing
        url = server.add("/huge", data, announce=10**12)                   # a Content-Length it never sends
        url = server.add("/chunked", data, chunked=True)                   # no Content-Length at all

Every GET is recorded (`gets(path)`), so a test can tell a cache hit from a download.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Route:
    data: bytes = b""
    status: int = 200
    filename: str | None = None  # sent as Content-Disposition: attachment; filename="..."
    delay_per_chunk: float = 0.0
    drop_after: int | None = None  # close the connection after this many body bytes
    stall: bool = False  # send the headers, then nothing until the server stops
    announce: int | None = None  # Content-Length to announce instead of the real one
    chunked: bool = False  # Transfer-Encoding: chunked, no Content-Length
    content_type: str = "application/octet-stream"


class LoraServer:
    chunk_size = 16 * 1024

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self._gets: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def add(self, path: str, data: bytes = b"", **fault) -> str:
        """Serve `data` (or a fault) at `path`; returns its URL."""
        self.routes[path] = Route(data, **fault)
        return f"{self.url}{path}"

    def gets(self, path: str) -> int:
        with self._lock:
            return self._gets[path]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LoraServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True, name="lora-server").start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_owner: LoraServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        owner = self.server_owner
        path = urlsplit(self.path).path
        with owner._lock:
            owner._gets[path] += 1
        route = owner.routes.get(path)
        if route is None or route.status != 200:
            status = 404 if route is None else route.status
            body = b'{"error": "no"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", route.content_type)
        if route.filename:
            self.send_header("Content-Disposition", f'attachment; filename="{route.filename}"')
        if route.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(route.announce if route.announce is not None else len(route.data)))
        self.end_headers()
        if route.stall:
            owner._stop.wait(600)
            self.close_connection = True
            return
        limit = len(route.data) if route.drop_after is None else min(route.drop_after, len(route.data))
        sent = 0
        try:
            while sent < limit:
                chunk = route.data[sent : min(limit, sent + owner.chunk_size)]
                if route.chunked:
                    self.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                else:
                    self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
                if route.delay_per_chunk and owner._stop.wait(route.delay_per_chunk):
                    break
            if route.chunked and route.drop_after is None:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away (cancelled, or gave up)
            pass
        self.close_connection = True
        if route.drop_after is not None:
            time.sleep(0.01)
