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


def test_sigterm_lets_running_requests_finish(tiny_base: Path, tiny_store: Path) -> None:
    port = free_port()
    env = {**os.environ, "SERVICE_BASE_MODEL": str(tiny_base), "SERVICE_ADAPTERS_DIR": str(tiny_store),
           "SERVICE_BASE_MODEL_ALIASES": f'["{TINY_ID}"]', "SERVICE_SHUTDOWN_TIMEOUT_S": "30"}
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                               env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url)
        result: dict = {}

        def long_request() -> None:
            body = {"adapter": "lora-gen", "prompt": "hello", "max_new_tokens": 200}
            result["response"] = httpx.post(f"{url}/v1/generate", json=body, timeout=60)

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(0.3)  # it is decoding
        process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        # While it drains: not ready, and new work is refused with 503 rather than queued.
        assert httpx.get(f"{url}/ready").status_code == 503
        refused = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "max_new_tokens": 1})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        thread.join(timeout=60)
        assert result["response"].status_code == 200
        assert result["response"].json()["generated_tokens"] > 1
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status is SIGTERM's (or 0)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
