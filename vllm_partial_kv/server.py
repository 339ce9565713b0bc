"""A vLLM OpenAI server in a subprocess, for the demo, the serving benchmark and the load tests:
started in its own process group, waited for on `/health`, read on `/metrics`, stopped the way
vLLM shuts down gracefully (SIGINT), killed only if that hangs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


class ServerError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def metric_sum(text: str, name: str) -> float:
    """A Prometheus metric from `/metrics` text, summed over its label sets."""
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith(name + "{") or ln.startswith(name + " "))


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Server:
    """`with Server(cmd, log_path) as s:` runs `cmd` (which must serve on `s.port`: build it with
    `free_port()` first) until the block ends."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 240.0) -> None:
        self.cmd, self.port, self.log_path = cmd, port, Path(log_path)
        self.env, self.ready_timeout_s = env, ready_timeout_s
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.ready_after_s = 0.0

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)
        start = time.monotonic()
        while time.monotonic() - start < self.ready_timeout_s:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with status {self.proc.returncode}\n{tail(self.log_path)}")
            if self.healthy():
                self.ready_after_s = time.monotonic() - start
                return
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"server not ready after {self.ready_timeout_s:.0f} s\n{tail(self.log_path)}")

    def healthy(self) -> bool:
        try:
            fetch(f"{self.base_url}/health", timeout=5)
            return True
        except OSError:
            return False

    def metrics(self) -> str:
        return fetch(f"{self.base_url}/metrics")

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children (the engine core)."""
        import psutil  # a vLLM dependency; not needed to plot a saved benchmark run

        root = psutil.Process(self.proc.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGINT (vLLM's graceful shutdown); the whole group is killed if it hangs."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return -signal.SIGKILL
        return proc.returncode
