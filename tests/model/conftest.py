from __future__ import annotations

from pathlib import Path

import pytest

from service.model.loading import BaseModel, load_base_model
from service.model.runner import ModelRunner
from service.settings import Settings
from service.store.store import AdapterStore
from tests.conftest import TINY_ID


@pytest.fixture(scope="module")
def tiny_loaded(tiny_base: Path) -> BaseModel:
    return load_base_model(Settings(base_model=str(tiny_base), base_model_aliases=[TINY_ID]))


@pytest.fixture(scope="module")
def runner(tiny_loaded: BaseModel) -> ModelRunner:
    return ModelRunner(tiny_loaded)


@pytest.fixture(scope="module")
def store(tiny_store: Path, tiny_loaded: BaseModel) -> AdapterStore:
    return AdapterStore(tiny_store, tiny_loaded.names_base)
