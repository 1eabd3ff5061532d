"""A webhook receiver on 127.0.0.1: records the JSON bodies Cog POSTs for an async prediction or training.

with WebhookReceiver() as hooks:
    requests.post(f"{server.url}/trainings", json={"id": "t1", "input": ..., "webhook": hooks.url},
                  headers={"Prefer": "respond-async"})
    final = hooks.wait(lambda event: event["status"] in ("succeeded", "failed", "canceled"))
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookReceiver:
    def __init__(self):
        self.events: list[dict] = []
        self._changed = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/webhook"

    def wait(self, matches: Callable[[dict], bool], timeout: float = 120) -> dict:
        """The first event for which `matches` is true, waiting up to `timeout` s for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((e for e in self.events if matches(e)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching webhook event in {timeout} s; received {len(self.events)}")
                self._changed.wait(left)

    def __enter__(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(200)
                self.end_headers()
                with receiver._changed:
                    receiver.events.append(json.loads(body or b"{}"))
                    receiver._changed.notify_all()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
