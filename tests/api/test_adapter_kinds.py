"""Prompt tuning, P-tuning, IA3 and AdaLoRA over HTTP: uploaded, listed with their kind, checked against the caps
and the base, served in one mixed batch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from service.api.app import create_app
from service.store.archive import make_zip
from tests.api.conftest import ADMIN, tiny_settings, wait_ready


def _zip(folder: Path) -> bytes:
    return make_zip({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def test_prompt_and_p_tuning_uploads_are_served(client: TestClient, tiny_adapters: dict[str, Path]) -> None:
    kinds = (("prompt-gen", "prompt_tuning"), ("ptuning-lstm-gen", "p_tuning"), ("prompt-cls", "prompt_tuning"),
             ("ia3-gen", "ia3"), ("adalora-gen", "adalora"), ("ia3-cls", "ia3"))
    for name, kind in kinds:
        response = client.post("/v1/adapters", data={"name": f"up-{name}"},
                               files={"archive": ("a.zip", _zip(tiny_adapters[name]))}, headers=ADMIN)
        assert response.status_code == 201, response.text
        assert response.json()["type"] == kind
        assert (response.json()["num_virtual_tokens"] or 0) > 0 or kind in ("ia3", "adalora")
    body = {"prompt": "hello", "max_new_tokens": 5}
    ours = client.post("/v1/generate", json={**body, "adapter": "up-prompt-gen"}).json()["text"]
    assert ours == client.post("/v1/generate", json={**body, "adapter": "prompt-gen"}).json()["text"]
    assert ours != client.post("/v1/generate", json={**body, "adapter": None}).json()["text"]
    got = client.post("/v1/classify", json={"adapter": "up-prompt-cls", "inputs": ["a", "b c"]})
    assert got.status_code == 200 and got.json()["results"][0]["label"] in ("no", "yes")
    names = ["up-ia3-gen", "up-adalora-gen", "up-ptuning-lstm-gen", "lora-gen", "prefix-gen", None]
    with ThreadPoolExecutor(len(names)) as pool:  # one mixed batch of every kind
        mixed = list(pool.map(lambda n: client.post("/v1/generate", json={**body, "adapter": n}), names))
    for name, response in zip(names, mixed):
        alone = client.post("/v1/generate", json={**body, "adapter": name}).json()["text"]
        assert response.status_code == 200 and response.json()["text"] == alone, name


def test_virtual_token_cap_and_shape_are_checked(tiny_base: Path, store_copy: Path, tiny_adapters: dict[str, Path],
                                                 tmp_path: Path) -> None:
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base), max_virtual_tokens=4))
    with TestClient(app) as client:
        wait_ready(client)
        too_many = client.post("/v1/adapters", data={"name": "long-prompt"}, headers=ADMIN,
                               files={"archive": ("a.zip", _zip(tiny_adapters["prompt-gen"]))})  # 5 tokens
        assert too_many.status_code == 422 and "num_virtual_tokens 5" in too_many.json()["message"]
        narrow = tmp_path / "narrow"
        narrow.mkdir()
        for path in tiny_adapters["ptuning-mlp-gen"].iterdir():
            (narrow / path.name).write_bytes(path.read_bytes())
        weights = load_file(narrow / "adapter_model.safetensors")
        save_file({"prompt_embeddings": weights["prompt_embeddings"][:, :32].contiguous()},
                  narrow / "adapter_model.safetensors")
        wrong = client.post("/v1/adapters", data={"name": "narrow"}, headers=ADMIN,
                            files={"archive": ("a.zip", _zip(narrow))})
        assert wrong.status_code == 422 and "prompt_embeddings has shape" in wrong.json()["message"], wrong.text
        assert not (store_copy / "narrow").exists() and not (store_copy / "long-prompt").exists()
        assert client.post("/v1/generate", json={"adapter": "ptuning-mlp-gen", "prompt": "x",
                                                  "max_new_tokens": 2}).status_code == 200
