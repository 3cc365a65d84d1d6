"""Through the real app: an adapter that fails at run time fails its own requests only, is quarantined until it is
replaced or deleted, and the next mixed batch succeeds for everyone; every error is JSON; uploads run once first."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from service.api.app import create_app
from service.store.archive import make_zip
from tests.api.conftest import ADMIN, tiny_settings, wait_ready

CLASSIFIERS = ("lora-cls", "prefix-cls", "lora-cls3")


@pytest.fixture
def batching_client(tiny_base: Path, store_copy: Path) -> Iterator[TestClient]:
    """Waits long enough to form a batch of concurrent requests."""
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base), max_wait_ms=150.0))
    with TestClient(app) as client:
        wait_ready(client)
        yield client


def _resident(client: TestClient, name: str):
    return client.app.state.service.inference.worker.resident._loaded[name]


def _concurrently(calls: dict[str, callable]) -> dict[str, object]:
    results: dict[str, object] = {}
    threads = [threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f())) for k, f in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _classify(client: TestClient, name: str):
    return client.post("/v1/classify", json={"adapter": name, "inputs": ["one text", "and another"]})


def _same_scores(a: dict, b: dict) -> bool:
    """Equal up to float noise (a batch's padding changes the last bits)."""
    return all(ra["label"] == rb["label"] and all(abs(ra["scores"][k] - rb["scores"][k]) < 1e-4 for k in ra["scores"])
               for ra, rb in zip(a["results"], b["results"], strict=True))


def _zip(folder: Path) -> bytes:
    return make_zip({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def test_a_head_failing_at_run_time_is_quarantined_and_its_neighbours_answer(
    batching_client: TestClient, store_copy: Path
) -> None:
    client = batching_client
    before = {name: _classify(client, name).json() for name in CLASSIFIERS}  # loads them all
    _resident(client, "lora-cls3").head = torch.nn.Linear(65, 3)  # a real shape fault in its forward
    got = _concurrently({name: (lambda n=name: _classify(client, n)) for name in CLASSIFIERS})
    failed = got["lora-cls3"]
    assert failed.status_code == 422 and failed.json()["error"] == "AdapterFailed", failed.text
    assert "lora-cls3" in failed.json()["message"] and "PUT /v1/adapters/lora-cls3" in failed.json()["message"]
    for name in ("lora-cls", "prefix-cls"):
        assert got[name].status_code == 200 and _same_scores(got[name].json(), before[name]), name

    entry = client.get("/v1/adapters/lora-cls3").json()
    assert entry["state"] == "failed" and entry["loaded"] is False and "RuntimeError" in entry["error"]
    listed = {e["name"]: e["state"] for e in client.get("/v1/adapters").json()["adapters"]}
    assert listed["lora-cls3"] == "failed" and listed["lora-cls"] == "ready"
    again = _classify(client, "lora-cls3")
    assert again.status_code == 422 and again.json()["error"] == "AdapterFailed"
    # The very next mixed batch of the others and the base succeeds.
    nxt = _concurrently({
        "lora-cls": lambda: _classify(client, "lora-cls"),
        "prefix-cls": lambda: _classify(client, "prefix-cls"),
        "gen": lambda: client.post("/v1/generate", json={"adapter": "lora-gen", "prompt": "hi", "max_new_tokens": 3}),
        "base": lambda: client.post("/v1/generate", json={"adapter": None, "prompt": "hi", "max_new_tokens": 3}),
    })
    assert {k: r.status_code for k, r in nxt.items()} == dict.fromkeys(nxt, 200)
    assert _same_scores(nxt["lora-cls"].json(), before["lora-cls"])
    metrics = client.get("/metrics").text
    assert 'service_adapter_failures_total{adapter="lora-cls3",stage="forward"} 1.0' in metrics

    # The way out: a new version (PUT) serves again; a delete clears it too.
    replaced = client.put("/v1/adapters/lora-cls3", files={"archive": ("a.zip", _zip(store_copy / "lora-cls3"))},
                          headers=ADMIN)
    assert replaced.status_code == 200 and replaced.json()["state"] == "ready", replaced.text
    assert _classify(client, "lora-cls3").status_code == 200


def test_a_generation_adapter_failing_mid_batch_ends_its_stream_with_an_error_event(
    batching_client: TestClient,
) -> None:
    client = batching_client
    body = {"prompt": "hello there", "max_new_tokens": 6}
    expected = client.post("/v1/generate", json={**body, "adapter": "lora-gen"}).json()["text"]
    client.post("/v1/generate", json={**body, "adapter": "prefix-gen"})  # resident now
    prefix = _resident(client, "prefix-gen")
    prefix.prefix = [(k[..., :-1], v[..., :-1]) for k, v in prefix.prefix]

    def stream() -> str:
        with client.stream("POST", "/v1/generate", json={**body, "adapter": "prefix-gen", "stream": True}) as r:
            assert r.status_code == 200
            return "".join(r.iter_text())

    got = _concurrently({
        "stream": stream,
        "lora": lambda: client.post("/v1/generate", json={**body, "adapter": "lora-gen"}),
        "base": lambda: client.post("/v1/generate", json={**body, "adapter": None}),
    })
    last = got["stream"].strip().split("\n\n")[-1]
    assert last.startswith("event: error"), got["stream"]
    assert json.loads(last.split("data: ", 1)[1])["error"] == "AdapterFailed"
    assert got["lora"].status_code == 200 and got["lora"].json()["text"] == expected
    assert got["base"].status_code == 200
    assert client.get("/v1/adapters/prefix-gen").json()["state"] == "failed"
    assert client.delete("/v1/adapters/prefix-gen", headers=ADMIN).status_code == 204
    assert client.post("/v1/generate", json={**body, "adapter": "prefix-gen"}).status_code == 404


def test_an_unexpected_error_in_a_route_is_a_json_500_and_the_server_keeps_serving(
    client: TestClient, tmp_path: Path
) -> None:
    store = client.app.state.service.inference.store
    root = store.root
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    store.root = not_a_folder  # listing it raises NotADirectoryError, which no route expects
    try:
        response = client.get("/v1/adapters")
    finally:
        store.root = root
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "Internal"
    assert client.get("/v1/adapters").status_code == 200
    assert 'service_internal_errors_total{where="route"} 1.0' in client.get("/metrics").text


def test_an_upload_that_cannot_run_is_refused_before_publishing(client: TestClient, store_copy: Path,
                                                                 tmp_path: Path) -> None:
    source = store_copy / "lora-gen"
    broken = tmp_path / "nan-lora"
    broken.mkdir()
    for path in source.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = load_file(source / "adapter_model.safetensors")
    weights = {k: (torch.full_like(v, float("nan")) if "lora_B" in k else v) for k, v in weights.items()}
    save_file(weights, broken / "adapter_model.safetensors")
    response = client.post("/v1/adapters", data={"name": "nan-lora"}, files={"archive": ("a.zip", _zip(broken))},
                           headers=ADMIN)
    assert response.status_code == 422 and "non-finite" in response.json()["message"], response.text
    assert not (store_copy / "nan-lora").exists()
    assert client.post("/v1/generate", json={"adapter": "nan-lora", "prompt": "x"}).status_code == 404
    ok = client.post("/v1/generate", json={"adapter": "lora-gen", "prompt": "x", "max_new_tokens": 2})
    assert ok.status_code == 200
