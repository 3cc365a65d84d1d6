"""Whether the libraries the answers depend on are within the range the test suite has passed on."""

from __future__ import annotations

import logging
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

logger = logging.getLogger(__name__)

DISTRIBUTION = "adapter-service"
CHECKED = ("torch", "transformers", "peft")


def ranges_tested() -> dict[str, str]:
    """The package's declared ranges for the libraries whose versions change answers (pyproject.toml's upper bounds
    stop at what the suite passed on)."""
    ranges: dict[str, str] = {}
    for line in metadata.requires(DISTRIBUTION) or []:
        requirement = Requirement(line)
        if requirement.name in CHECKED and requirement.marker is None:
            ranges[requirement.name] = str(requirement.specifier)
    return ranges


def untested_versions(installed: dict[str, str], ranges: dict[str, str]) -> list[str]:
    """``name version (tested: range)`` for each installed library outside its tested range."""
    outside: list[str] = []
    for name, specifier in ranges.items():
        version = installed.get(name)
        if version is None:
            continue
        # A local build label (2.13.0+cpu, +cu128) is the same release as far as the range is concerned.
        release = Version(version).public
        if not Requirement(f"{name}{specifier}").specifier.contains(release, prereleases=True):
            outside.append(f"{name} {version} (tested: {specifier})")
    return outside


def warn_if_untested() -> None:
    """One log line at start when torch, transformers or peft is outside the tested range; the service still
    starts."""
    try:
        ranges = ranges_tested()
    except metadata.PackageNotFoundError:
        logger.info("%s is not installed as a package; skipping the tested-versions check", DISTRIBUTION)
        return
    installed = {}
    for name in ranges:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    outside = untested_versions(installed, ranges)
    if outside:
        logger.warning(
            "untested environment: %s; the service starts, but its answers are verified only within the tested "
            "range (install the locked set with `bash scripts/install.sh`)",
            "; ".join(outside),
        )
