"""The shipped Grafana dashboard against a real Prometheus: Prometheus (Debian's binary) scrapes the real app on
loopback while it serves traffic of every kind, then every PromQL expression of the dashboard (panel targets,
nested rows, template variable queries), with Grafana's variables substituted, must parse and return data."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi import FastAPI

from service.api.app import create_app
from service.store.archive import make_zip
from tests.api import conftest as api_fixtures
from tests.api.conftest import ADMIN, tiny_settings
from tests.prometheus import PROMETHEUS_BINARY, Prometheus, running_prometheus
from tests.servers import serve

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "adapter-service.json"
SHIPPED_PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SHIPPED_TARGET = "adapter-service:8000"

SCRAPE_SECONDS = 1
SCRAPED_METRIC = "service_ready"  # present from the start: its sample times tell when Prometheus last scraped
# What Grafana puts in place of its built-in variables. $__rate_interval is at least four scrape intervals in
# Grafana; 15 s holds ~15 scrapes here, so every rate() has many samples and the whole traffic is inside it.
GRAFANA_BUILTINS = {
    "__rate_interval": "15s",
    "__interval": "5s",
    "__interval_ms": "5000",
    "__range": "60s",
    "__range_s": "60",
    "__range_ms": "60000",
}
TRAFFIC_ROUNDS = 3
BROKEN_ADAPTER = "broken-cls"
UPLOADED_ADAPTER = "uploaded-gen"

store_copy = api_fixtures.store_copy  # the API tests' fixture (a fresh copy of the tiny store), used here too

pytestmark = pytest.mark.skipif(
    PROMETHEUS_BINARY is None,
    reason="the `prometheus` binary is not on PATH (Debian: apt-get install prometheus), so the dashboard's "
    "queries cannot be checked against a real Prometheus",
)


# --- the dashboard --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a panel, where it is, and the legend Grafana names its series with."""

    where: str
    expr: str
    legend: str = ""


def _all_panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, including those nested in rows (collapsed rows keep theirs under `panels`)."""
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels", []))


def panel_queries(dashboard: dict) -> list[Query]:
    return [
        Query(f"panel {panel.get('title', panel.get('id'))!r}", target["expr"], target.get("legendFormat", ""))
        for panel in _all_panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def _count_exprs(node: object) -> int:
    if isinstance(node, dict):
        return sum(1 if key == "expr" and value else _count_exprs(value) for key, value in node.items())
    if isinstance(node, list):
        return sum(_count_exprs(item) for item in node)
    return 0


@dataclass(frozen=True)
class Variable:
    """A dashboard template variable: how Grafana fills its options, and what it sends for 'All'."""

    name: str
    kind: str
    query: str
    all_value: str | None
    include_all: bool
    multi: bool


def template_variables(dashboard: dict) -> list[Variable]:
    variables = []
    for entry in dashboard.get("templating", {}).get("list", []):
        query = entry.get("query", "")
        if isinstance(query, dict):
            query = query.get("query", "")
        variables.append(Variable(entry["name"], entry.get("type", "query"), query, entry.get("allValue"),
                                  bool(entry.get("includeAll")), bool(entry.get("multi"))))
    return variables


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+),\s*)?(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
VARIABLE_REFERENCE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's interpolation of `$name`, `${name}`, `${name:format}` and `[[name]]`; an unknown name fails."""

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise AssertionError(f"{expr!r} uses ${name}, which this test does not know how to fill like Grafana")
        return values[name]

    return VARIABLE_REFERENCE.sub(replace, expr)


# --- Prometheus -----------------------------------------------------------------------------------------------


def prometheus_config(service_url: str) -> dict:
    """The shipped config's scrape job for the service, pointed at the test server and scraping every second."""
    shipped = yaml.safe_load(SHIPPED_PROMETHEUS_CONFIG.read_text())
    jobs = [
        job for job in shipped["scrape_configs"]
        if any(SHIPPED_TARGET in group.get("targets", []) for group in job.get("static_configs", []))
    ]
    assert len(jobs) == 1, f"{SHIPPED_PROMETHEUS_CONFIG} has no single scrape job for {SHIPPED_TARGET}"
    job = {
        **jobs[0],
        "scrape_interval": f"{SCRAPE_SECONDS}s",
        "scrape_timeout": f"{SCRAPE_SECONDS}s",
        "static_configs": [{"targets": [service_url.removeprefix("http://")]}],
    }
    interval = f"{SCRAPE_SECONDS}s"
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval}, "scrape_configs": [job]}


# --- traffic --------------------------------------------------------------------------------------------------


def mismatched_copy(store: Path, source: str, name: str) -> None:
    """A copy of a LoRA adapter whose config claims a smaller rank than its weights: it passes the store's checks
    and fails when loaded, so the worker quarantines it."""
    shutil.copytree(store / source, store / name)
    config_file = store / name / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = config["r"] // 2
    config_file.write_text(json.dumps(config))


def provoke_internal_error(app: FastAPI, client: httpx.Client, not_a_folder: Path) -> None:
    """A route error nothing expects (the store's root turned into a file, as in test_fault_isolation)."""
    store = app.state.service.inference.store
    root = store.root
    store.root = not_a_folder
    try:
        response = client.get("/v1/adapters")
    finally:
        store.root = root
    assert response.status_code == 500, response.text


def expect(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, f"{response.request.method} {response.request.url}: {response.text}"


def one_round(client: httpx.Client, round_index: int) -> None:
    """Every kind of request: classification, token classification, generation (base and adapters, plain and
    streamed), listing and an unknown adapter."""
    expect(client.post("/v1/classify", json={"adapter": "lora-cls", "inputs": ["I loved it", "Never again"]}), 200)
    expect(client.post("/v1/classify", json={"adapter": "prefix-cls", "inputs": "fine"}), 200)
    expect(client.post("/v1/classify_tokens", json={"adapter": "lora-tok", "inputs": ["John Smith lives here"]}),
           200)
    generate = {"prompt": f"round {round_index}", "max_new_tokens": 4, "temperature": 0.0}
    expect(client.post("/v1/generate", json={**generate, "adapter": None}), 200)
    expect(client.post("/v1/generate", json={**generate, "adapter": "lora-gen"}), 200)
    with client.stream("POST", "/v1/generate", json={**generate, "adapter": "prefix-gen", "stream": True}) as stream:
        assert stream.status_code == 200
        assert "event: done" in stream.read().decode()
    with client.stream("POST", "/v1/generate", json={**generate, "adapter": None, "stream": True}) as stream:
        assert stream.status_code == 200
        assert "event: done" in stream.read().decode()
    expect(client.get("/v1/adapters"), 200)
    expect(client.post("/v1/classify", json={"adapter": "no-such-adapter", "inputs": "x"}), 404)


def admin_round(client: httpx.Client, store: Path) -> None:
    """An upload, a request on it, and its deletion."""
    archive = make_zip({path.name: path.read_bytes() for path in (store / "lora-gen").iterdir() if path.is_file()})
    expect(client.post("/v1/adapters", data={"name": UPLOADED_ADAPTER}, files={"archive": ("a.zip", archive)},
                       headers=ADMIN), 201)
    expect(client.post("/v1/generate", json={"adapter": UPLOADED_ADAPTER, "prompt": "hi", "max_new_tokens": 3}), 200)
    expect(client.delete(f"/v1/adapters/{UPLOADED_ADAPTER}", headers=ADMIN), 204)


def send_traffic(app: FastAPI, url: str, store: Path, workdir: Path) -> None:
    """Rounds of traffic about a scrape apart, so counters and histograms move across several scrapes."""
    not_a_folder = workdir / "not-a-folder"
    not_a_folder.write_text("x")
    with httpx.Client(base_url=url, timeout=60) as client:
        for round_index in range(TRAFFIC_ROUNDS):
            one_round(client, round_index)
            broken = client.post("/v1/classify", json={"adapter": BROKEN_ADAPTER, "inputs": "x"})
            expect(broken, 422)  # its load fails, then it stays quarantined
            if round_index > 0:
                assert broken.json()["error"] == "AdapterFailed", broken.text
            if round_index == 1:
                admin_round(client, store)
            elif round_index == 2:
                provoke_internal_error(app, client, not_a_folder)
            time.sleep(SCRAPE_SECONDS)


# --- checking -------------------------------------------------------------------------------------------------


def evaluate(prometheus: Prometheus, where: str, expr: str, at: float) -> tuple[list[dict], str | None]:
    """An expression's result, and why it fails the check (an error, no series, only NaN) or None when it charts
    data. Only NaN fails too: Grafana draws nothing for it (a quantile of a histogram with no observations)."""
    answer = prometheus.query(expr, at)
    if answer.get("status") != "success":
        return [], f"{where}: {expr}\n    error: {answer.get('errorType', '')} {answer.get('error')}"
    data = answer["data"]
    if data["resultType"] == "scalar":
        result, values = [{"metric": {}, "value": data["result"]}], [data["result"][1]]
    elif data["resultType"] == "vector":
        result, values = data["result"], [series["value"][1] for series in data["result"]]
    else:
        result, values = data["result"], [value for series in data["result"] for _, value in series["values"]]
    if not values:
        return result, f"{where}: {expr}\n    returned no series"
    if all(math.isnan(float(value)) for value in values):
        return result, f"{where}: {expr}\n    returned only NaN (nothing observed in the window): {result}"
    return result, None


def legend_problem(query: Query, expr: str, result: list[dict]) -> str | None:
    """Labels a legend names (`{{label}}`) that some series lacks: renamed, or aggregated away, so Grafana's legend
    would not tell the series apart."""
    named = LEGEND_LABEL.findall(query.legend)
    missing = sorted({label for label in named for series in result if label not in series["metric"]})
    if not missing:
        return None
    labels = [series["metric"] for series in result]
    return f"{query.where}: {expr}\n    legend {query.legend!r}: some series lack {missing}: {labels}"


def variable_options(prometheus: Prometheus, variable: Variable, known: dict[str, str], at: float,
                     problems: list[str]) -> list[str]:
    """The options Grafana would offer for a template variable, from its own query through Prometheus."""
    where = f"template variable ${variable.name}"
    if variable.kind in {"custom", "constant"}:
        return [option.strip() for option in variable.query.split(",") if option.strip()]
    if variable.kind != "query":
        problems.append(f"{where}: type {variable.kind!r} is not filled by this test; teach it how")
        return []
    label_values = LABEL_VALUES.match(variable.query)
    if not (label_values and label_values["selector"]):
        problems.append(f"{where}: {variable.query!r} is not a query this test can evaluate; teach it how")
        return []
    expr, label = substitute(label_values["selector"], known), label_values["label"]
    result, failure = evaluate(prometheus, where, expr, at)
    if failure:
        problems.append(failure)
        return []
    options = sorted({series["metric"][label] for series in result if label in series["metric"]})
    if not options:
        problems.append(f"{where}: {expr} has no series with the label {label!r}")
    return options


def grafana_escape(value: str, variable: Variable) -> str:
    """A variable's value as Grafana's Prometheus data source writes it into a query: for a multi-value or 'All'
    variable, regex characters escaped with a backslash that is itself escaped for the PromQL string
    (prometheusSpecialRegexEscape); otherwise backslashes and quotes only (prometheusRegularEscape)."""
    if variable.multi or variable.include_all:
        return re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", value.replace("\\", "\\\\\\\\"))
    return value.replace("\\", "\\\\").replace("'", "\\\\'")


def variable_choices(prometheus: Prometheus, dashboard: dict, at: float, problems: list[str]) -> list[dict[str, str]]:
    """The variable settings to check every panel under: 'All' everywhere, then each variable on one real value."""
    all_choice: dict[str, str] = dict(GRAFANA_BUILTINS)
    single_choice: dict[str, str] = dict(GRAFANA_BUILTINS)
    for variable in template_variables(dashboard):
        options = variable_options(prometheus, variable, all_choice, at, problems)
        if not options:
            continue
        escaped = [grafana_escape(option, variable) for option in options]
        if variable.include_all:
            all_choice[variable.name] = variable.all_value or "(" + "|".join(escaped) + ")"
        else:
            all_choice[variable.name] = escaped[0]
        single_choice[variable.name] = escaped[0]
    return [all_choice, single_choice]


def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    tiny_base: Path, store_copy: Path, tmp_path: Path
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = panel_queries(dashboard)
    assert queries and len(queries) == _count_exprs(dashboard), "some `expr` is outside the panels walked here"

    app = create_app(tiny_settings(store_copy, base_model=str(tiny_base)))
    with serve(app) as url:
        mismatched_copy(store_copy, "lora-cls", BROKEN_ADAPTER)
        with running_prometheus(prometheus_config(url), tmp_path) as prometheus:
            prometheus.wait_for_scrape_after(time.time(), SCRAPED_METRIC)  # the target is up before any traffic
            send_traffic(app, url, store_copy, tmp_path)
            # Two scrapes after the traffic: the last round's new series have two samples for rate().
            prometheus.wait_for_scrape_after(time.time() + SCRAPE_SECONDS, SCRAPED_METRIC)
            at = time.time()
            problems: list[str] = []
            choices = variable_choices(prometheus, dashboard, at, problems)
            assert not problems, "template variables Grafana could not fill:\n" + "\n".join(problems)
            for values in choices:
                for query in queries:
                    expr = substitute(query.expr, values)
                    result, failure = evaluate(prometheus, query.where, expr, at)
                    failure = failure or legend_problem(query, expr, result)
                    if failure:
                        problems.append(failure)
            assert not problems, "dashboard queries that fail against a real Prometheus:\n" + "\n".join(problems)
