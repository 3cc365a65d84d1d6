"""Running Debian's real Prometheus for tests: its own config, storage and loopback port, stopped for sure."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from tests.servers import free_port, wait_until_ready

PROMETHEUS_BINARY = shutil.which("prometheus")


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def query(self, expr: str, at: float | None = None) -> dict:
        """The HTTP API's answer to an instant query (at Unix time ``at``, or now), errors included."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        response = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        try:
            return response.json()
        except json.JSONDecodeError:
            return {"status": "error", "error": f"HTTP {response.status_code}: {response.text[:300]}"}

    def last_sample_time(self, metric: str) -> float:
        """The Unix time of the newest scraped sample of ``metric``, or 0 before its first scrape."""
        result = self.query(f"max(timestamp({metric}))").get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for_scrape_after(self, moment: float, metric: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.last_sample_time(metric) > moment:
                return
            time.sleep(0.1)
        raise AssertionError(f"Prometheus scraped no {metric} after {moment:.3f}:\n{self.log_tail()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def running_prometheus(config: dict, workdir: Path, timeout: float = 30.0) -> Iterator[Prometheus]:
    """Prometheus with ``config``, storing in ``workdir``, on a free loopback port; yields it once ready."""
    assert PROMETHEUS_BINARY is not None, "prometheus is not on PATH"
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [PROMETHEUS_BINARY, f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=sink, stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_ready(prometheus.url, timeout, "/-/ready", process, prometheus.log_tail)
        yield prometheus
    finally:
        _stop(process)
