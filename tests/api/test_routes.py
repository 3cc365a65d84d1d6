"""The HTTP API through the real app (lifespan, batcher, model) on the tiny base."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from fastapi.testclient import TestClient

from service.store.archive import make_zip
from tests.api.conftest import ADMIN


def _zip_folder(folder: Path, inside: str | None = None) -> bytes:
    prefix = f"{inside}/" if inside else ""
    return make_zip({prefix + p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "alive"}
    assert client.get("/ready").status_code == 200
    text = client.get("/metrics").text
    assert "service_requests_total" in text and "service_queue_depth" in text


def test_a_repeated_prompt_is_served_from_the_prefix_cache_and_counted(client: TestClient) -> None:
    """The same prompt twice: the second reuses its cached blocks, with the same text; /metrics says so."""

    def gauge(name: str) -> float:
        line = next(line for line in client.get("/metrics").text.splitlines() if line.startswith(name + " "))
        return float(line.split()[1])

    prompt = "a prompt long enough to fill a few blocks of sixteen tokens, said twice over to the same service " * 2
    body = {"prompt": prompt, "max_new_tokens": 6, "temperature": 0}
    hits = gauge("service_prefix_cache_hit_tokens")
    first = client.post("/v1/generate", json=body)
    assert first.status_code == 200, first.text
    assert gauge("service_prefix_cache_bytes") > 0 and gauge("service_prefix_cache_hit_tokens") == hits
    second = client.post("/v1/generate", json=body)
    assert second.json()["text"] == first.json()["text"]
    assert gauge("service_prefix_cache_hit_tokens") - hits >= 32


def test_classify_one_and_many(client: TestClient) -> None:
    response = client.post("/v1/classify", json={"adapter": "lora-cls", "inputs": "a fine day"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["adapter"] == "lora-cls"
    [result] = body["results"]
    assert set(result["scores"]) == {"negative", "positive"}
    assert abs(sum(result["scores"].values()) - 1.0) < 1e-5
    assert result["score"] == max(result["scores"].values())
    many = client.post("/v1/classify", json={"adapter": "lora-cls3", "inputs": ["one", "two two", "three"]}).json()
    assert [sorted(r["scores"]) for r in many["results"]] == [["LABEL_0", "LABEL_1", "LABEL_2"]] * 3


def test_classify_errors(client: TestClient) -> None:
    no_adapter = client.post("/v1/classify", json={"adapter": None, "inputs": "x"})
    assert no_adapter.status_code == 422 and "classification head" in no_adapter.json()["message"]
    unknown = client.post("/v1/classify", json={"adapter": "nope", "inputs": "x"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["message"]
    wrong_task = client.post("/v1/classify", json={"adapter": "lora-gen", "inputs": "x"})
    assert wrong_task.status_code == 422 and "generation adapter" in wrong_task.json()["message"]
    assert client.post("/v1/classify", json={"inputs": 5}).status_code == 422
    assert client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/v1/classify", json={"adapter": "lora-cls", "inputs": []}).status_code == 422


def test_generate_base_and_adapters(client: TestClient) -> None:
    for adapter in (None, "lora-gen", "prefix-gen", "prefix-proj-gen"):
        response = client.post("/v1/generate", json={"adapter": adapter, "prompt": "Hello there", "max_new_tokens": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["adapter"] == adapter
        assert body["finish_reason"] in ("length", "eos", "stop") and 1 <= body["generated_tokens"] <= 5
    base = client.post("/v1/generate", json={"prompt": "Hello there", "max_new_tokens": 8}).json()["text"]
    lora = client.post("/v1/generate", json={"adapter": "lora-gen", "prompt": "Hello there", "max_new_tokens": 8}).json()
    assert lora["text"] != base


def test_generate_stop_and_errors(client: TestClient) -> None:
    full = client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 12}).json()
    word = full["text"].split()[1] if len(full["text"].split()) > 1 else full["text"][-2:]
    stopped = client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 12, "stop": [word]}).json()
    assert stopped["finish_reason"] == "stop" and word not in stopped["text"]
    assert full["text"].startswith(stopped["text"])
    assert client.post("/v1/generate", json={"adapter": "lora-cls", "prompt": "x"}).status_code == 422
    assert client.post("/v1/generate", json={"adapter": "missing", "prompt": "x"}).status_code == 404
    assert client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 0}).status_code == 422
    assert client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 100000}).status_code == 422
    assert client.post("/v1/generate", json={"prompt": "x", "bogus": 1}).status_code == 422


def test_sampling_is_repeatable_with_seed(client: TestClient) -> None:
    body = {"prompt": "Once upon", "max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first = client.post("/v1/generate", json=body).json()["text"]
    assert client.post("/v1/generate", json=body).json()["text"] == first


def test_list_and_get_adapters(client: TestClient) -> None:
    entries = {e["name"]: e for e in client.get("/v1/adapters").json()["adapters"]}
    assert {"lora-cls", "lora-gen", "prefix-gen", "prefix-cls"} <= set(entries)
    assert entries["lora-cls"]["type"] == "lora" and entries["lora-cls"]["task"] == "classification"
    assert entries["lora-cls"]["rank"] == 4 and entries["lora-cls"]["labels"] == ["negative", "positive"]
    assert entries["prefix-gen"]["type"] == "prefix_tuning" and entries["prefix-gen"]["num_virtual_tokens"] == 6
    assert len(entries["prefix-gen"]["sha256"]) == 64 and entries["prefix-gen"]["size_bytes"] > 0
    client.post("/v1/generate", json={"adapter": "prefix-gen", "prompt": "x", "max_new_tokens": 1})
    assert client.get("/v1/adapters/prefix-gen").json()["loaded"] is True
    assert client.get("/v1/adapters/unknown").status_code == 404


def test_admin_requires_token(client: TestClient, store_copy: Path) -> None:
    files = {"archive": ("a.zip", _zip_folder(store_copy / "lora-gen"), "application/zip")}
    assert client.post("/v1/adapters", data={"name": "x1"}, files=files).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert client.post("/v1/adapters", data={"name": "x1"}, files=files, headers=bad).status_code == 401
    assert client.delete("/v1/adapters/lora-gen").status_code == 401
    assert not (store_copy / "x1").exists()


def test_upload_use_and_delete(client: TestClient, store_copy: Path) -> None:
    archive = _zip_folder(store_copy / "lora-cls", inside="my-adapter")
    files = {"archive": ("a.zip", archive, "application/zip")}
    created = client.post("/v1/adapters", data={"name": "uploaded"}, files=files, headers=ADMIN)
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "uploaded" and created.json()["labels"] == ["negative", "positive"]
    again = client.post("/v1/adapters", data={"name": "uploaded"}, files=files, headers=ADMIN)
    assert again.status_code == 409
    original = client.post("/v1/classify", json={"adapter": "lora-cls", "inputs": "good"}).json()["results"]
    copy = client.post("/v1/classify", json={"adapter": "uploaded", "inputs": "good"}).json()["results"]
    assert copy == original
    assert client.delete("/v1/adapters/uploaded", headers=ADMIN).status_code == 204
    assert client.post("/v1/classify", json={"adapter": "uploaded", "inputs": "good"}).status_code == 404
    assert client.delete("/v1/adapters/uploaded", headers=ADMIN).status_code == 404


def test_upload_tar_gz(client: TestClient, store_copy: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for path in (store_copy / "prefix-gen").iterdir():
            bundle.add(path, arcname=path.name)
    files = {"archive": ("a.tar.gz", buffer.getvalue(), "application/gzip")}
    response = client.post("/v1/adapters", data={"name": "from-tar"}, files=files, headers=ADMIN)
    assert response.status_code == 201, response.text
    assert client.post("/v1/generate", json={"adapter": "from-tar", "prompt": "x", "max_new_tokens": 2}).status_code == 200


def test_upload_refusals_leave_store_unchanged(client: TestClient, store_copy: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in store_copy.iterdir())
    good = {p.name: p.read_bytes() for p in (store_copy / "lora-gen").iterdir() if p.is_file()}
    config = json.loads(good["adapter_config.json"])
    cases = {
        "pickle": make_zip({**good, "adapter_model.bin": b"\x80\x04junk"}),
        "traversal": make_zip({"../evil/adapter_config.json": b"{}"}),
        "absolute": make_zip({"/etc/adapter_config.json": b"{}"}),
        "extra file": make_zip({**good, "run.py": b"print(1)"}),
        "not an archive": b"hello world",
        "rank too big": make_zip({**good, "adapter_config.json": json.dumps({**config, "r": 100000}).encode()}),
        "wrong base": make_zip({**good, "adapter_config.json": json.dumps(
            {**config, "base_model_name_or_path": "someone/other-model"}).encode()}),
        "unknown module": make_zip({**good, "adapter_config.json": json.dumps(
            {**config, "target_modules": ["nonexistent_proj"]}).encode()}),
    }
    for case, archive in cases.items():
        files = {"archive": ("a.zip", archive, "application/zip")}
        response = client.post("/v1/adapters", data={"name": "evil"}, files=files, headers=ADMIN)
        assert 400 <= response.status_code < 500, (case, response.text)
        assert response.json()["message"], case
    bad_name = client.post("/v1/adapters", data={"name": "../x"}, files={"archive": ("a.zip", make_zip(good))},
                           headers=ADMIN)
    assert bad_name.status_code == 422
    assert sorted(p.name for p in store_copy.iterdir()) == before
    assert client.get("/ready").status_code == 200


def test_oversized_bodies_get_413(client: TestClient) -> None:
    huge = "word " * 1_000_000
    response = client.post("/v1/classify", json={"adapter": "lora-cls", "inputs": huge})
    assert response.status_code == 413 and "limit" in response.json()["message"]
    assert client.get("/ready").status_code == 200


def test_too_many_tokens_names_the_input_and_limit(client: TestClient) -> None:
    long_text = "token " * 3000
    response = client.post("/v1/classify", json={"adapter": "lora-cls", "inputs": ["short", long_text]})
    assert response.status_code == 422
    assert "input 1" in response.json()["message"] and "the limit is 256" in response.json()["message"]


def test_deadline_gives_504_and_server_carries_on(tiny_base: Path, store_copy: Path) -> None:
    from service.api.app import create_app
    from tests.api.conftest import tiny_settings, wait_ready

    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base), request_timeout_s=0.05))
    with TestClient(app) as client:
        wait_ready(client)
        slow = client.post("/v1/generate", json={"prompt": "Hello", "max_new_tokens": 200})
        assert slow.status_code == 504 and "longer than" in slow.json()["message"]
        assert client.get("/ready").status_code == 200
