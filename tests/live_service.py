"""A real service on loopback for the client and CLI tests: the tiny base and a copy of the tiny store."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.api.app import create_app
from service.store.archive import make_zip
from tests.api.conftest import tiny_settings
from tests.servers import serve

ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="module")
def service_url(tiny_base: Path, tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server per test module; tests that change the store use names of their own."""
    store = tmp_path_factory.mktemp("live") / "store"
    shutil.copytree(tiny_store, store)
    with serve(create_app(tiny_settings(store, base_model=str(tiny_base)))) as url:
        yield url


def copy_adapter(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def zip_as_is(folder: Path) -> bytes:
    """Every file of the folder at the archive's top: what a user zipping the folder by hand sends."""
    return make_zip({path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()})


def with_tokenizer(folder: Path, base: Path) -> Path:
    """Put the base's tokenizer next to the adapter, as trainers do (the service accepts and checks it)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (base / name).is_file():
            shutil.copy(base / name, folder / name)
    return folder
