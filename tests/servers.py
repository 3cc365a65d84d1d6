"""Running the real app behind a real HTTP server on loopback, for tests that need a network client."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(url: str, timeout: float = 180.0, ready_path: str = "/ready",
                     process: subprocess.Popen | None = None, log: Callable[[], str] | None = None) -> None:
    """Poll ``url + ready_path`` until it answers 200; fail at once if ``process`` exits, with ``log()`` told."""
    tail = (lambda: f":\n{log()}") if log is not None else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{url} exited with {process.returncode} before it was ready{tail()}")
        try:
            if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become ready in {timeout:g} s{tail()}")


@contextmanager
def serve(app: FastAPI, **config) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields its URL once ready."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
