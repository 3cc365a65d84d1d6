"""Graceful shutdown of the real process: on SIGTERM, running requests finish and the process exits cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import TINY_ID
from tests.servers import free_port, wait_until_ready


def queue_depth(url: str) -> int:
    metrics = httpx.get(f"{url}/metrics").text
    return int(float(next(line.split()[1] for line in metrics.splitlines()
                          if line.startswith("service_queue_depth "))))


def test_sigterm_lets_running_requests_finish(tiny_base: Path, tiny_store: Path) -> None:
    port = free_port()
    # One row at a time, so the requests below run one after another: the drain lasts long enough to be observed
    # (a single request on the tiny model finishes within the time a check takes).
    env = {**os.environ, "SERVICE_BASE_MODEL": str(tiny_base), "SERVICE_ADAPTERS_DIR": str(tiny_store),
           "SERVICE_BASE_MODEL_ALIASES": f'["{TINY_ID}"]', "SERVICE_SHUTDOWN_TIMEOUT_S": "30",
           "SERVICE_MAX_BATCH_SIZE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                               env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url)
        results: list[httpx.Response] = []

        def long_request() -> None:
            body = {"adapter": "lora-gen", "prompt": "hello", "max_new_tokens": 240}
            results.append(httpx.post(f"{url}/v1/generate", json=body, timeout=60))

        threads = [threading.Thread(target=long_request) for _ in range(6)]
        for thread in threads:
            thread.start()
        # Signal only once all six are in: the first decoding and the rest queued (or already answered). A fixed
        # sleep raced a loaded machine, where some requests reached the server after the signal and got 503.
        deadline = time.monotonic() + 30
        while queue_depth(url) + len(results) < 5:
            assert time.monotonic() < deadline, "the six requests never all reached the server"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        # While it drains: not ready, and new work is refused with 503 rather than queued.
        assert httpx.get(f"{url}/ready").status_code == 503
        refused = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "max_new_tokens": 1})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        for thread in threads:
            thread.join(timeout=60)
        # Running and queued requests alike finish.
        assert len(results) == 6 and all(response.status_code == 200 for response in results)
        assert all(response.json()["generated_tokens"] > 1 for response in results)
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status is SIGTERM's (or 0)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
