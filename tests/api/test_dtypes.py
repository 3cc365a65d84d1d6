"""The service boots and serves in every dtype 'auto' may choose (bf16 takes the prepacked-weights path on CPUs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.api.conftest import tiny_settings, wait_ready


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_boots_and_serves_every_kind(dtype: str, tiny_base: Path, store_copy: Path) -> None:
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base), dtype=dtype))
    with TestClient(app) as client:
        wait_ready(client)
        for adapter in (None, "lora-gen", "prefix-gen", "prompt-gen", "ia3-gen"):
            response = client.post("/v1/generate", json={"adapter": adapter, "prompt": "hello", "max_new_tokens": 4})
            assert response.status_code == 200, response.json()
        response = client.post("/v1/classify", json={"adapter": "lora-cls", "inputs": ["hello"]})
        assert response.status_code == 200, response.json()
        metrics = client.get("/metrics").text
        assert "service_base_weight_bytes" in metrics and "service_kv_cache_budget_bytes" in metrics
