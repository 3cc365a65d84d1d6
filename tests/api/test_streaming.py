"""Streaming (server-sent events), continuous batching and disconnects, through the real app."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.api.conftest import tiny_settings, wait_ready
from tests.servers import serve


def _events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.fixture(params=["mixed", "grouped"])
def strategy_client(request: pytest.FixtureRequest, tiny_base: Path, store_copy: Path) -> Iterator[TestClient]:
    """Both batching strategies stream token by token."""
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base), batching=request.param))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.mark.parametrize("adapter", ["prefix-gen", "lora-gen"])
def test_stream_adds_up_to_the_plain_answer(strategy_client: TestClient, adapter: str) -> None:
    client = strategy_client
    body = {"adapter": adapter, "prompt": "Tell me", "max_new_tokens": 12}
    plain = client.post("/v1/generate", json=body).json()
    response = client.post("/v1/generate", json={**body, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert events[-1][0] == "done" and events[-1][1] == plain
    assert all(kind == "token" for kind, _ in events[:-1]) and len(events) > 2
    assert "".join(data["text"] for _, data in events[:-1]) == plain["text"]


def test_stream_errors_before_streaming_are_plain_http_errors(client: TestClient) -> None:
    response = client.post("/v1/generate", json={"adapter": "missing", "prompt": "x", "stream": True})
    assert response.status_code == 404 and response.json()["error"] == "AdapterNotFound"


def test_short_request_does_not_wait_for_a_long_one(client: TestClient) -> None:
    finished: dict[str, float] = {}

    def run(name: str, tokens: int) -> None:
        # ignore_eos is not offered, so choose prompts the tiny model does not end early on
        client.post("/v1/generate", json={"adapter": "lora-gen", "prompt": "hello", "max_new_tokens": tokens})
        finished[name] = time.perf_counter()

    long = threading.Thread(target=run, args=("long", 240))
    long.start()
    engine = client.app.state.service.inference.worker.engine  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while not engine.active and time.monotonic() < deadline:  # the long one is decoding (a fixed sleep was
        time.sleep(0.002)  # longer than the whole request once the kernels made the tiny model this fast)
    run("short", 2)
    long.join()
    assert finished["short"] < finished["long"]


@pytest.fixture
def live_server(tiny_base: Path, store_copy: Path):
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base)))
    with serve(app) as url:
        yield url, app


def test_client_that_disconnects_frees_its_row(live_server) -> None:
    url, app = live_server
    body = {"prompt": "hello", "max_new_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data"):
                break  # got a first token: leave
    engine = app.state.service.inference.worker.engine
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0
    assert httpx.post(f"{url}/v1/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
