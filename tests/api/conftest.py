from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings
from tests.conftest import TINY_ID

ADMIN = {"Authorization": "Bearer test-admin-token"}


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/ready")
        if response.status_code == 200:
            return
        assert response.json()["status"] != "failed", response.json()
        time.sleep(0.05)
    raise AssertionError("service did not become ready")


def tiny_settings(store: Path, **overrides) -> Settings:
    values = dict(
        base_model=None, adapters_dir=store, admin_token="test-admin-token", base_model_aliases=[TINY_ID],
        max_wait_ms=2.0,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def store_copy(tmp_path: Path, tiny_store: Path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(tiny_store, target)
    return target


@pytest.fixture
def client(tiny_base: Path, store_copy: Path) -> Iterator[TestClient]:
    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base)))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client
