"""Versions, API keys, the resident set's bounds, the queue bound, crash recovery, deletes under use."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.store.archive import make_zip
from tests.api.conftest import ADMIN, tiny_settings, wait_ready


def _zip(folder: Path) -> bytes:
    return make_zip({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def _gen(client: TestClient, adapter: str, **extra) -> dict:
    response = client.post("/v1/generate", json={"adapter": adapter, "prompt": "Hello", "max_new_tokens": 8, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_put_publishes_a_new_version_and_nothing_serves_the_old(client: TestClient, store_copy: Path) -> None:
    first = client.put("/v1/adapters/versioned", files={"archive": ("a.zip", _zip(store_copy / "lora-gen"))},
                       headers=ADMIN)
    assert first.status_code == 201, first.text
    assert _gen(client, "versioned")["text"] == _gen(client, "lora-gen")["text"]
    second = client.put("/v1/adapters/versioned", files={"archive": ("a.zip", _zip(store_copy / "lora-gen-mlp"))},
                        headers=ADMIN)
    assert second.status_code == 200 and second.json()["sha256"] != first.json()["sha256"]
    assert _gen(client, "versioned")["text"] == _gen(client, "lora-gen-mlp")["text"]
    assert client.get("/v1/adapters/versioned").json()["sha256"] == second.json()["sha256"]
    refused = client.put("/v1/adapters/versioned", files={"archive": ("a.zip", b"not a zip")}, headers=ADMIN)
    assert refused.status_code == 422
    assert client.get("/v1/adapters/versioned").json()["sha256"] == second.json()["sha256"]


def test_api_keys_guard_inference_but_not_health(tiny_base: Path, store_copy: Path) -> None:
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base), api_keys=["key-one", "key-two"]))
    with TestClient(app) as client:
        wait_ready(client)
        body = {"prompt": "hi", "max_new_tokens": 1}
        assert client.post("/v1/generate", json=body).status_code == 401
        assert client.post("/v1/generate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.post("/v1/generate", json=body, headers={"Authorization": "Bearer key-two"}).status_code == 200
        assert client.get("/v1/adapters", headers=ADMIN).status_code == 200
        assert client.get("/v1/adapters").status_code == 401
        assert client.delete("/v1/adapters/lora-gen", headers={"Authorization": "Bearer key-one"}).status_code == 401
        for route in ("/health", "/ready", "/metrics"):
            assert client.get(route).status_code == 200


def test_admin_routes_refused_without_a_configured_token(tiny_base: Path, store_copy: Path) -> None:
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base), admin_token=None))
    with TestClient(app) as client:
        wait_ready(client)
        response = client.delete("/v1/adapters/lora-gen", headers={"Authorization": "Bearer "})
        assert response.status_code == 403 and "SERVICE_ADMIN_TOKEN" in response.json()["message"]
        assert (store_copy / "lora-gen").is_dir()


def test_bounded_resident_set_evicts_lru_and_answers_stay_right(tiny_base: Path, store_copy: Path,
                                                                client: TestClient) -> None:
    names = ["lora-gen", "prefix-gen", "lora-gen-mlp", "prefix-proj-gen"]
    expected = {name: _gen(client, name)["text"] for name in names}
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base), max_loaded_adapters=2,
                                   preload_adapters=["lora-gen"]))
    with TestClient(app) as bounded:
        wait_ready(bounded)
        for _ in range(2):
            for name in names:
                assert _gen(bounded, name)["text"] == expected[name]
        metrics = bounded.get("/metrics").text
        evictions = float(re.search(r'service_adapter_cache_total\{event="evict"\} (\S+)', metrics).group(1))
        assert evictions >= 4
        assert bounded.get("/v1/adapters/lora-gen").json()["loaded"] is True  # pinned by the preload list
        assert sum(e["loaded"] for e in bounded.get("/v1/adapters").json()["adapters"]) <= 2


def test_full_queue_answers_429_with_retry_after(tiny_base: Path, store_copy: Path) -> None:
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base), max_queue_size=1, max_batch_size=1))
    statuses: list[int] = []
    retry_after: list[str | None] = []
    with TestClient(app) as client:
        wait_ready(client)

        def call() -> None:
            # long enough that the twelve overlap however fast the tiny model decodes
            response = client.post("/v1/generate", json={"prompt": "Hello", "max_new_tokens": 200})
            statuses.append(response.status_code)
            retry_after.append(response.headers.get("retry-after"))

        threads = [threading.Thread(target=call) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert client.get("/ready").status_code == 200
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
    assert all(r == "1" for s, r in zip(statuses, retry_after) if s == 429)


def test_crash_between_replace_renames_is_repaired_at_start(tiny_base: Path, store_copy: Path) -> None:
    (store_copy / "lora-gen").rename(store_copy / ".trash-lora-gen.0123abcd")  # the old version, mid-replace
    (store_copy / ".staging-deadbeef").mkdir()  # a half-written upload
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base)))
    with TestClient(app) as client:
        wait_ready(client)
        assert client.get("/v1/adapters/lora-gen").status_code == 200
    assert sorted(p.name for p in store_copy.iterdir() if p.name.startswith(".")) == []


def test_delete_while_generating_finishes_cleanly(client: TestClient, store_copy: Path) -> None:
    shutil.copytree(store_copy / "lora-gen", store_copy / "doomed")
    expected = _gen(client, "doomed", max_new_tokens=60)
    result: dict = {}

    def long_request() -> None:
        result["response"] = client.post("/v1/generate", json={"adapter": "doomed", "prompt": "Hello",
                                                                "max_new_tokens": 60})

    thread = threading.Thread(target=long_request)
    thread.start()
    assert client.delete("/v1/adapters/doomed", headers=ADMIN).status_code == 204
    thread.join()
    response = result["response"]
    assert response.status_code in (200, 404)  # finished on the old version, or refused before it started
    if response.status_code == 200:
        assert response.json()["text"] == expected["text"]
    assert client.post("/v1/generate", json={"adapter": "doomed", "prompt": "x"}).status_code == 404


def test_thousand_adapters_zipf_stream_with_room_for_64(tiny_base: Path, tiny_adapters: dict[str, Path],
                                                        tmp_path: Path) -> None:
    import random

    store = tmp_path / "thousand"
    sources = [tiny_adapters[n] for n in ("lora-gen", "prefix-gen", "lora-gen-mlp", "prefix-proj-gen")]
    for index in range(1000):
        shutil.copytree(sources[index % len(sources)], store / f"user-{index:04d}")
    app = create_app(tiny_settings(store, base_model=str(tiny_base), max_loaded_adapters=64))
    rng = random.Random(0)
    weights = [1.0 / (rank + 1) for rank in range(1000)]
    with TestClient(app) as client:
        wait_ready(client)
        for _ in range(400):
            name = f"user-{rng.choices(range(1000), weights)[0]:04d}"
            response = client.post("/v1/generate", json={"adapter": name, "prompt": "hi", "max_new_tokens": 1})
            assert response.status_code == 200, response.text
        metrics = client.get("/metrics").text
        counts = {event: float(re.search(rf'service_adapter_cache_total\{{event="{event}"\}} (\S+)', metrics).group(1))
                  for event in ("hit", "miss", "evict")}
        loads = float(re.search(r"service_adapter_load_seconds_count (\S+)", metrics).group(1))
        loaded = float(re.search(r"^service_adapters_loaded (\S+)", metrics, re.M).group(1))
    assert counts["miss"] > 64 and counts["evict"] > 0 and counts["hit"] > 0 and loads == counts["miss"]
    assert loaded <= 64


def test_upload_with_shapes_that_do_not_fit_the_base_is_refused(client: TestClient, store_copy: Path,
                                                                tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(store_copy / "lora-gen" / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:, :-1].contiguous()  # in_features one short of the base's
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    files = {p.name: p.read_bytes() for p in (store_copy / "lora-gen").iterdir() if p.is_file()}
    files["adapter_model.safetensors"] = (tmp_path / "adapter_model.safetensors").read_bytes()
    response = client.post("/v1/adapters", data={"name": "misfit"}, headers=ADMIN,
                           files={"archive": ("a.zip", make_zip(files))})
    assert response.status_code == 422 and "needs" in response.json()["message"] and key in response.json()["message"]
    assert not (store_copy / "misfit").exists()


def test_concurrent_uploads_of_one_name_over_http(client: TestClient, store_copy: Path) -> None:
    archive = _zip(store_copy / "prefix-gen")
    statuses: list[int] = []

    def upload() -> None:
        response = client.post("/v1/adapters", data={"name": "raced"}, headers=ADMIN,
                               files={"archive": ("a.zip", archive)})
        statuses.append(response.status_code)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201] + [409] * 5
    assert sorted(p.name for p in store_copy.iterdir() if p.name.startswith(".")) == []


def test_caps_on_rank_pattern_virtual_tokens_inputs_and_stops(tiny_base: Path, store_copy: Path) -> None:
    import json

    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base), max_lora_rank=8, max_virtual_tokens=4,
                                   max_inputs_per_request=3, max_stop_strings=2, max_adapter_tensors=8))
    with TestClient(app) as client:
        wait_ready(client)
        lora = {p.name: p.read_bytes() for p in (store_copy / "lora-gen").iterdir() if p.is_file()}
        config = json.loads(lora["adapter_config.json"])
        lora["adapter_config.json"] = json.dumps({**config, "rank_pattern": {"q_proj": 64}}).encode()
        response = client.post("/v1/adapters", data={"name": "big-pattern"}, headers=ADMIN,
                               files={"archive": ("a.zip", make_zip(lora))})
        assert response.status_code == 422 and "rank 64" in response.json()["message"]
        prefix = _zip(store_copy / "prefix-gen")  # 6 virtual tokens
        response = client.post("/v1/adapters", data={"name": "long-prefix"}, headers=ADMIN,
                               files={"archive": ("a.zip", prefix)})
        assert response.status_code == 422 and "num_virtual_tokens 6" in response.json()["message"]
        wide = client.post("/v1/adapters", data={"name": "wide"}, headers=ADMIN,
                           files={"archive": ("a.zip", _zip(store_copy / "lora-cls"))})  # 9 tensors
        assert wide.status_code == 422 and "the limit is 8" in wide.json()["message"]
        many = client.post("/v1/classify", json={"adapter": "lora-cls", "inputs": ["a", "b", "c", "d"]})
        assert many.status_code == 422 and "limit is 3" in many.json()["message"]
        stops = client.post("/v1/generate", json={"prompt": "x", "stop": ["a", "b", "c"]})
        assert stops.status_code == 422 and "at most 2" in stops.json()["message"]
        assert not (store_copy / "big-pattern").exists() and not (store_copy / "long-prefix").exists()


def test_adapter_config_code_pointers_are_never_followed(client: TestClient, store_copy: Path) -> None:
    import json
    import sys

    files = {p.name: p.read_bytes() for p in (store_copy / "lora-gen").iterdir() if p.is_file()}
    config = json.loads(files["adapter_config.json"])
    config["auto_mapping"] = {"base_model_class": "EvilModel", "parent_library": "evil_adapter_payload"}
    config["auto_map"] = {"AutoModel": "evil_adapter_payload.EvilModel"}
    files["adapter_config.json"] = json.dumps(config).encode()
    response = client.post("/v1/adapters", data={"name": "pointers"}, headers=ADMIN,
                           files={"archive": ("a.zip", make_zip(files))})
    assert response.status_code == 201, response.text
    served = client.post("/v1/generate", json={"adapter": "pointers", "prompt": "Hello", "max_new_tokens": 8})
    assert served.json()["text"] == _gen(client, "lora-gen")["text"]
    assert "evil_adapter_payload" not in sys.modules
