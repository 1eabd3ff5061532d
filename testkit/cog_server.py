"""The real Cog HTTP server (coglet), started on loopback from the project root, for contract tests."""

from __future__ import annotations

import ast
import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def declared_concurrency() -> int:
    """The max of predict()'s @concurrent decorator, read as `cog build` reads it: from the text."""
    tree = ast.parse((PROJECT_ROOT / "predict.py").read_text())
    method = next(n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef) and n.name == "predict")
    decorator = next(d for d in method.decorator_list if getattr(d.func, "id", None) == "concurrent")
    return next(k.value.value for k in decorator.keywords if k.arg == "max")


def decode_data_url(url: str) -> Image.Image:
    """An output as Cog returns it without an upload URL: a base64 data URL of the image file."""
    header, _, payload = url.partition(",")
    assert header.startswith("data:image/"), header
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def tiny_png(size: tuple[int, int] = (64, 64), color=(200, 30, 30), mode: str = "RGB") -> str:
    """A plain PNG as a data URL: an image input as a client sends it."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def tiny_server(weights: Path, model: str, folder: Path, **env: str) -> CogServer:
    """The server of `model` on a tiny weights root, its log in `folder`, with any other settings `env` (use as a
    context manager)."""
    return CogServer({"FLASHSD_WEIGHTS": str(weights), "FLASHSD_MODEL": model, **env}, folder / "server.log")


class CogServer:
    """`python -m cog.server.http` as the container runs it, with its logs kept in a file. `train=True`: the server
    in train mode (`--x-mode train`, cog.yaml's `train:` in COG_TRAIN_TYPE_STUB), as Replicate runs trainings."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path = PROJECT_ROOT, train: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cwd = cwd
        # coglet spawns its worker as `python`: this interpreter's folder must come first on PATH.
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            "COG_TRAIN_TYPE_STUB": "train.py:train",
            "PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.mode = ["--x-mode", "train"] if train else []
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> CogServer:
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *self.mode],
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cog server exited with {self.process.returncode}:\n{self.logs()}")
            status = self.health()
            if status in ("READY", "SETUP_FAILED"):
                return self
            time.sleep(0.25)
        raise TimeoutError(f"cog server not ready after {timeout} s:\n{self.logs()}")

    def health(self) -> str | None:
        try:
            return requests.get(f"{self.url}/health-check", timeout=5).json().get("status")
        except (requests.ConnectionError, requests.Timeout, ValueError):
            return None

    def wait_ready(self, timeout: float = 10) -> str | None:
        """The health status once READY, or the last one seen after `timeout` s: coglet frees its slot a
        moment after it answers a prediction, so right after a response it may still say BUSY."""
        deadline = time.monotonic() + timeout
        while (status := self.health()) != "READY" and time.monotonic() < deadline:
            time.sleep(0.02)
        return status

    def health_check(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=5).json()

    def post(self, inputs: dict, timeout: float = 300, **kwargs) -> requests.Response:
        """One POST /predictions, whatever the server's state (a busy server answers 409)."""
        return requests.post(f"{self.url}/predictions", json={"input": inputs}, timeout=timeout, **kwargs)

    def post_at_once(self, inputs_list: list[dict], timeout: float = 300) -> list[requests.Response]:
        """POST every input of `inputs_list` at the same moment, each from a thread of its own; the responses in
        order."""
        responses: list = [None] * len(inputs_list)
        start = threading.Barrier(len(inputs_list))

        def post(i: int, inputs: dict) -> None:
            start.wait()
            responses[i] = self.post(inputs, timeout=timeout)

        threads = [threading.Thread(target=post, args=(i, inputs)) for i, inputs in enumerate(inputs_list)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return responses

    def predict(self, inputs: dict, timeout: float = 300, busy_wait: float = 10, **kwargs) -> requests.Response:
        """POST /predictions once the slot is free: coglet frees it a moment after answering the previous
        prediction, so a 409 ("at capacity") is retried for up to `busy_wait` s."""
        deadline = time.monotonic() + busy_wait
        while (response := self.post(inputs, timeout, **kwargs)).status_code == 409 and time.monotonic() < deadline:
            time.sleep(0.02)
        return response

    def train(self, inputs: dict, timeout: float = 300, **kwargs) -> requests.Response:
        """One POST /trainings (train mode)."""
        return requests.post(f"{self.url}/trainings", json={"input": inputs}, timeout=timeout, **kwargs)

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> CogServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- the server's working directory and its worker process -------------------------------------------------------


def server_root(folder: Path) -> Path:
    """A working directory for the server: the project's code (symlinked) and an OpenAPI schema generated now
    from predict.py (coglet validates inputs only when `.cog/openapi_schema.json` is there), so a test never
    depends on a stale or half-written schema in the shared checkout."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("predict.py", "flashsd", "cog.yaml", "testkit"):
        link = folder / name
        if not link.exists():
            link.symlink_to(PROJECT_ROOT / name)
    schema = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "openapi-schema"), "--stdout"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    (folder / ".cog").mkdir(exist_ok=True)
    (folder / ".cog" / "openapi_schema.json").write_text(schema)
    return folder


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def worker_pid(server: CogServer) -> int:
    """The Python worker coglet spawned (its only child process)."""
    pids = children(server.process.pid)
    if len(pids) != 1:
        raise RuntimeError(f"expected one worker process under coglet, found {pids}")
    return pids[0]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def wait_ready(server: CogServer, timeout: float = 30) -> tuple[str | None, float]:
    """CogServer.wait_ready, timed: (last status, seconds)."""
    started = time.monotonic()
    return server.wait_ready(timeout), time.monotonic() - started
