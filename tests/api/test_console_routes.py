"""The console's routes: the page and its files, their headers, and that the API around them is unchanged."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from fastapi.testclient import TestClient

from service.api.routes.console import CONSOLE_DIR
from service.metrics import BASE_LABEL

ROOT = Path(__file__).resolve().parents[2]


def test_the_page_and_every_file_it_references_are_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    referenced = re.findall(r'(?:src|href)="(/console/[^"]+)"', page.text)
    assert sorted(referenced) == ["/console/console.css", "/console/console.js", "/console/favicon.svg"]
    types = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
    for path in referenced:
        asset = client.get(path)
        assert asset.status_code == 200, path
        assert asset.headers["content-type"].startswith(types[path.rsplit(".", 1)[1]])
        assert asset.content == (CONSOLE_DIR / path.removeprefix("/console/")).read_bytes()


def test_only_the_console_files_are_served(client: TestClient) -> None:
    for path in ("/console/index.py", "/console/..%2Froutes%2Fconsole.py", "/console/", "/console/console.js.map"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "message" in response.json()


def test_the_api_docs_and_metrics_are_unchanged(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/" not in schema["paths"] and not any(path.startswith("/console") for path in schema["paths"])
    assert "/v1/generate" in schema["paths"]
    assert "requests" in schema["components"]["schemas"]["AdapterEntry"]["required"]
    assert client.get("/docs").status_code == 200
    client.get("/")
    metrics = client.get("/metrics").text
    assert f'service_requests_total{{adapter="{BASE_LABEL}",route="/",status="200"}}' in metrics


def test_the_console_files_ship_in_the_package() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["service.api"]
    for file in CONSOLE_DIR.iterdir():
        relative = file.relative_to(ROOT / "service" / "api").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), f"{relative} is not in the package data"
