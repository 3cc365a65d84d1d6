"""The per-adapter count of requests served, as GET /v1/adapters reports it."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.store.archive import make_zip
from tests.api.conftest import ADMIN


def _served(client: TestClient) -> dict[str, int]:
    return {entry["name"]: entry["requests"] for entry in client.get("/v1/adapters").json()["adapters"]}


def test_each_successful_request_counts_once_for_its_adapter(client: TestClient) -> None:
    assert set(_served(client).values()) == {0}
    for texts in ("one", ["two", "three", "four"]):  # a request of several inputs is one request
        assert client.post("/v1/classify", json={"adapter": "lora-cls", "inputs": texts}).status_code == 200
    assert client.post("/v1/classify_tokens", json={"adapter": "lora-tok", "inputs": "John Smith"}).status_code == 200
    generate = {"adapter": "lora-gen", "prompt": "Hello", "max_new_tokens": 3}
    assert client.post("/v1/generate", json=generate).status_code == 200
    with client.stream("POST", "/v1/generate", json={**generate, "stream": True}) as streamed:
        assert "event: done" in streamed.read().decode()
    assert client.post("/v1/generate", json={**generate, "adapter": None}).status_code == 200  # the base: no entry
    assert client.post("/v1/classify", json={"adapter": "lora-gen", "inputs": "x"}).status_code == 422  # wrong task
    assert client.post("/v1/generate", json={**generate, "max_new_tokens": 10**6}).status_code == 422

    served = _served(client)
    assert {name: count for name, count in served.items() if count} == {"lora-cls": 2, "lora-tok": 1, "lora-gen": 2}
    assert client.get("/v1/adapters/lora-cls").json()["requests"] == 2


def test_deleting_an_adapter_resets_its_count(client: TestClient, store_copy: Path) -> None:
    archive = make_zip({p.name: p.read_bytes() for p in (store_copy / "prefix-gen").iterdir() if p.is_file()})
    for _ in range(2):
        assert client.post("/v1/generate", json={"adapter": "prefix-gen", "prompt": "Hi", "max_new_tokens": 2}
                           ).status_code == 200
    replaced = client.put("/v1/adapters/prefix-gen", headers=ADMIN, files={"archive": ("a.zip", archive)})
    assert replaced.status_code == 200 and replaced.json()["requests"] == 2  # a new version keeps the count

    assert client.delete("/v1/adapters/prefix-gen", headers=ADMIN).status_code == 204
    uploaded = client.post("/v1/adapters", headers=ADMIN, data={"name": "prefix-gen"},
                           files={"archive": ("a.zip", archive)})
    assert uploaded.status_code == 201 and uploaded.json()["requests"] == 0
    assert _served(client)["prefix-gen"] == 0
