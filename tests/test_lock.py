"""The committed lock and the package's declared ranges agree, and the environment under test is the locked one."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = ROOT / os.environ.get("LOCK_DIR", "requirements")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?: ;[^\\]*)? \\$", re.MULTILINE)


def _pins(lock: str) -> dict[str, set[str]]:
    pins: dict[str, set[str]] = {}
    for name, version in PIN.findall((LOCK_DIR / lock).read_text()):
        pins.setdefault(canonicalize_name(name), set()).add(version)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


@pytest.mark.parametrize("lock", ["runtime.lock", "dev.lock", "model.lock"])
def test_every_pin_is_exact_and_hashed(lock: str) -> None:
    text = (LOCK_DIR / lock).read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1].strip())
    assert entries
    for entry in entries:
        if entry.startswith("#"):
            continue
        assert re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==", entry), entry
        assert "--hash=sha256:" in entry, entry.splitlines()[0]


def test_torch_and_its_accelerator_runtime_stay_out_of_the_lock() -> None:
    """scripts/install.sh installs torch on its own: a CPU wheel here, a CUDA build where the user asks."""
    names = set(_pins("dev.lock"))
    assert not {n for n in names if n == "torch" or n == "triton" or n.startswith(("nvidia-", "cuda-"))}


def test_lock_satisfies_the_declared_ranges() -> None:
    """Editing pyproject.toml without re-locking (scripts/update_lock.py --no-upgrade) fails here."""
    pins = _pins("dev.lock")
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} is declared but not locked"
        for version in pins[name]:
            assert requirement.specifier.contains(version, prereleases=True), (name, version, requirement)


def test_runtime_lock_is_the_dev_lock_without_dev_tools() -> None:
    runtime, dev = _pins("runtime.lock"), _pins("dev.lock")
    assert set(runtime) <= set(dev)
    shared = {name: versions for name, versions in runtime.items() if dev[name] != versions}
    assert not shared, f"runtime and dev locks pin these differently: {shared}"


def test_the_environment_under_test_is_the_locked_one() -> None:
    """CI and the README's test command install from the lock; anything else is not what was tested."""
    mismatched = {}
    for name, versions in (_pins("dev.lock") | _pins("model.lock")).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a pin for another platform or Python (its marker excludes this one)
        if installed not in versions:
            mismatched[name] = (installed, sorted(versions))
    assert not mismatched, f"installed versions differ from the lock (run bash scripts/install.sh --dev): {mismatched}"
