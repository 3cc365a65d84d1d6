"""The deployment files (Dockerfile, docker-compose.yml, Prometheus and Grafana config) agree with the code."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "adapter-service.json"

INSTALL_COMMAND = "bash scripts/install.sh"
START_COMMAND = ".venv/bin/python -m service --host 0.0.0.0 --port 8000"
SERVICES = {"adapter-service", "prometheus", "grafana"}


# --- helpers --------------------------------------------------------------------------------------------------


def _compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of a compose service's volumes, in short ("src:dst[:mode]") or long syntax."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
        else:
            source, target = entry.get("source", ""), entry["target"]
        mounts.append((source, target))
    return mounts


def _bind_source(source: str) -> Path | None:
    """The host path of a bind mount source, or None for a named volume."""
    if source.startswith((".", "/", "~")):
        return (ROOT / source).resolve()
    return None


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _command_words(arguments: str) -> list[str]:
    """CMD/ENTRYPOINT arguments in exec (JSON) or shell form, as words."""
    if arguments.startswith("["):
        words = json.loads(arguments)
        assert all(isinstance(word, str) for word in words)
        return words
    return shlex.split(arguments)


def _metric_names() -> dict[str, str]:
    """Every series name the service's registry can expose, as PromQL sees it, mapped to its family's name."""
    names: dict[str, str] = {}
    for family in Metrics().registry.collect():
        base = family.name
        if family.type == "counter":
            # collect() names counters without `_total`; the exposition adds it (and `_created`).
            series = {f"{base}_total", f"{base}_created"}
        elif family.type == "histogram":
            series = {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        elif family.type == "summary":
            series = {base, f"{base}_sum", f"{base}_count", f"{base}_created"}
        else:
            series = {base}
        series |= {sample.name for sample in family.samples}
        names.update(dict.fromkeys(series, base))
    return names


def _dashboard_queries(node: object) -> list[str]:
    """Every PromQL string in the dashboard: panel targets' `expr` and templating queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"expr", "query", "definition"} and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_dashboard_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_dashboard_queries(item))
    return found


def _panels(panels: list[dict]) -> list[dict]:
    """All panels, including those nested in collapsed rows."""
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))
    return out


METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])service_[A-Za-z0-9_:]+")


# --- docker-compose.yml ---------------------------------------------------------------------------------------


def test_compose_has_the_three_services_and_no_version_key():
    data = _compose()
    assert "version" not in data, "the compose spec has no `version:` key"
    assert SERVICES <= set(data["services"])


def test_compose_adapter_service_builds_the_dockerfile_with_a_named_adapters_volume():
    data = _compose()
    service = data["services"]["adapter-service"]
    build = service["build"]
    build = {"context": build} if isinstance(build, str) else build
    assert (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert set(build.get("args", {})) >= {"BASE_IMAGE", "TORCH_SPEC", "TORCH_INDEX_URL"}
    assert any(str(port).split(":")[-1].split("/")[0] == "8000" for port in service["ports"])
    mounts = dict((target, source) for source, target in _mounts(service))
    assert "/data/adapters" in mounts
    volume = mounts["/data/adapters"]
    assert _bind_source(volume) is None, "the adapter store is a named volume"
    assert volume in (data.get("volumes") or {})
    environment = service["environment"]
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    assert "SERVICE_ADMIN_TOKEN" in environment
    assert ":?" in str(environment["SERVICE_ADMIN_TOKEN"]), "the admin token is required, not defaulted"


@pytest.mark.parametrize(
    ("service", "target", "source"),
    [
        ("prometheus", "/etc/prometheus/prometheus.yml", PROMETHEUS),
        ("grafana", "/etc/grafana/provisioning", GRAFANA_PROVISIONING),
        ("grafana", "/var/lib/grafana/dashboards", DASHBOARD.parent),
    ],
)
def test_compose_config_mounts_point_at_files_that_exist(service, target, source):
    mounts = {t: s for s, t in _mounts(_compose()["services"][service])}
    assert target in mounts, f"{service} does not mount {target}"
    host = _bind_source(mounts[target])
    assert host is not None, f"{service}'s {target} should be a bind mount of a repo path"
    assert host == source.resolve()
    assert host.exists()


def test_every_bind_mount_exists():
    for name, service in _compose()["services"].items():
        for source, target in _mounts(service):
            host = _bind_source(source)
            assert host is None or host.exists(), f"{name}: {source} -> {target} does not exist"


def test_compose_config_is_valid_for_docker_compose():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not on PATH")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"docker is on PATH but has no compose plugin: {probe.stderr.strip() or probe.stdout.strip()}")
    env = {**os.environ, "SERVICE_ADMIN_TOKEN": os.environ.get("SERVICE_ADMIN_TOKEN") or "test-token"}
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr


# --- Prometheus -----------------------------------------------------------------------------------------------


def test_prometheus_scrapes_the_service_every_5s():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = [
        job for job in config["scrape_configs"]
        if any("adapter-service:8000" in group.get("targets", []) for group in job.get("static_configs", []))
    ]
    assert len(jobs) == 1, "one scrape job targets adapter-service:8000"
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config.get("global", {}).get("scrape_interval")) == "5s"


# --- Grafana --------------------------------------------------------------------------------------------------


def _datasource_uids() -> set[str]:
    uids = set()
    for path in sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml")):
        for source in yaml.safe_load(path.read_text()).get("datasources", []):
            assert source.get("uid"), f"{path.name}: datasource {source.get('name')} needs a fixed uid"
            uids.add(source["uid"])
    return uids


def test_grafana_provisions_a_prometheus_datasource_and_the_dashboards_folder():
    assert _datasource_uids()
    providers = []
    for path in sorted((GRAFANA_PROVISIONING / "dashboards").glob("*.y*ml")):
        providers.extend(yaml.safe_load(path.read_text()).get("providers", []))
    assert any(p["options"]["path"] == "/var/lib/grafana/dashboards" for p in providers)


def test_dashboard_uses_only_metrics_the_service_defines():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _dashboard_queries(dashboard)
    assert queries
    known = _metric_names()
    used = {name for query in queries for name in METRIC_RE.findall(query)}
    unknown = used - set(known)
    assert not unknown, f"the dashboard queries metrics the service does not define: {sorted(unknown)}"
    # ...and charts every metric the service has.
    families = set(known.values())
    charted = {known[name] for name in used}
    assert charted == families, f"not charted: {sorted(families - charted)}"


def test_dashboard_panels_use_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    uids = _datasource_uids()
    panels = [p for p in _panels(dashboard["panels"]) if p.get("type") != "row"]
    assert len(panels) >= 10
    titles = " | ".join(p["title"].lower() for p in panels)
    for word in ("request rate", "latency", "queue wait", "batch size", "queue depth", "adapters loaded",
                 "adapter load", "tokens/s", "ready"):
        assert word in titles, f"no panel about {word!r}"
    for panel in panels:
        for item in [panel, *panel.get("targets", [])]:
            source = item.get("datasource")
            if isinstance(source, dict) and source.get("type") == "prometheus":
                assert source.get("uid") in uids, f"panel {panel['title']!r} names an unknown datasource"


# --- Dockerfile -----------------------------------------------------------------------------------------------


def test_dockerfile_installs_and_starts_like_the_readme():
    instructions = _instructions()
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    assert any(INSTALL_COMMAND in run for run in runs)
    cmds = [args for keyword, args in instructions if keyword == "CMD"]
    assert cmds, "no CMD"
    assert not [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert " ".join(_command_words(cmds[-1])) == START_COMMAND


def test_dockerfile_build_args_runtime_user_and_volume():
    instructions = _instructions()
    keywords = [keyword for keyword, _ in instructions]
    first_from = keywords.index("FROM")
    args_before_from = {args.split("=")[0] for keyword, args in instructions[:first_from] if keyword == "ARG"}
    assert "BASE_IMAGE" in args_before_from
    assert "BASE_IMAGE" in instructions[first_from][1]
    all_args = {args.split("=")[0] for keyword, args in instructions if keyword == "ARG"}
    assert {"TORCH_SPEC", "TORCH_INDEX_URL"} <= all_args
    install = next(args for keyword, args in instructions if keyword == "RUN" and INSTALL_COMMAND in args)
    assert "TORCH_SPEC" in install and "TORCH_INDEX_URL" in install
    assert ("WORKDIR", "/app") in instructions
    assert any(keyword == "RUN" and "embedded_model_folder" in args for keyword, args in instructions)
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert "SERVICE_CACHE_DIR=/app/.cache" in env
    assert "SERVICE_ADAPTERS_DIR=/data/adapters" in env
    assert any(keyword == "VOLUME" and "/data/adapters" in args for keyword, args in instructions)
    assert any(keyword == "EXPOSE" and "8000" in args.split() for keyword, args in instructions)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}
    healthcheck = next(args for keyword, args in instructions if keyword == "HEALTHCHECK")
    assert "/health" in healthcheck and "python" in healthcheck


def test_dockerignore_keeps_local_environments_out():
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", ".git"} <= patterns
