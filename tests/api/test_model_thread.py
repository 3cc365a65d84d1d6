"""The served model runs on a thread with SERVICE_TORCH_THREADS intra-op threads; the event loop's thread runs
torch on one (a second OpenMP team makes the model's idle workers sleep between regions)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.model.threads import default_threads
from tests.api.conftest import tiny_settings, wait_ready


def test_the_model_thread_has_the_configured_threads(tiny_base: Path, store_copy: Path) -> None:
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base), torch_threads=3))
    try:
        with TestClient(app) as client:
            wait_ready(client)
            response = client.post("/v1/generate", json={"adapter": "lora-gen", "prompt": "hello",
                                                         "max_new_tokens": 4})
            assert response.status_code == 200, response.json()
            executor = app.state.service.executor
            assert executor.submit(torch.get_num_threads).result() == 3
            assert client.portal.call(torch.get_num_threads) == 1  # on the event loop's thread
    finally:
        torch.set_num_threads(default_threads())


def test_what_start_up_leaves_alive_is_kept_out_of_full_collections_until_shutdown(tiny_base: Path,
                                                                                   store_copy: Path) -> None:
    """The base, tokenizer and libraries alive once ready are frozen (a full collection walking them stalls every
    stream for ~250 ms); an app that stops unfreezes them, so a process that builds apps again frees the old."""
    assert gc.get_freeze_count() == 0
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base)))
    with TestClient(app) as client:
        wait_ready(client)
        assert gc.get_freeze_count() > 10_000
        assert client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 2}).status_code == 200
    assert gc.get_freeze_count() == 0
