"""Schema-driven fuzzing of the real server over loopback: whatever the body, no 5xx, and answers match the schema."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from service.api.app import create_app
from tests.api.conftest import tiny_settings
from tests.servers import serve


@pytest.fixture(scope="module")
def fuzz_url(tiny_base: Path, tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("fuzz") / "store"
    shutil.copytree(tiny_store, store)
    # Small limits keep generated requests cheap; the admin token is one the fuzzer does not know.
    settings_ = tiny_settings(store, base_model=str(tiny_base), max_new_tokens_limit=8, max_input_tokens=64)
    with serve(create_app(settings_)) as url:
        yield url


def test_no_server_errors_and_schema_conformance(fuzz_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)  # the same examples every run, so CI is repeatable
        def check(case) -> None:
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance, status_code_conformance])

        check()
    assert httpx.get(f"{fuzz_url}/ready").status_code == 200  # and the server still serves
