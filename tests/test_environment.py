"""The start-up check that names torch/transformers/peft versions outside the tested range."""

from __future__ import annotations

import logging

import pytest

from service.environment import ranges_tested, untested_versions, warn_if_untested


def test_tested_ranges_come_from_the_package_metadata() -> None:
    ranges = ranges_tested()
    assert set(ranges) == {"torch", "transformers", "peft"}
    assert "<" in ranges["transformers"]  # an upper bound at what was tested


def test_versions_outside_the_range_are_named() -> None:
    ranges = {"torch": ">=2.4,<2.14", "transformers": ">=5.0,<5.24", "peft": ">=0.21,<0.22"}
    inside = {"torch": "2.13.0+cpu", "transformers": "5.23.0", "peft": "0.21.2"}
    assert untested_versions(inside, ranges) == []
    outside = untested_versions({**inside, "transformers": "5.24.0", "torch": "2.14.1+cu128"}, ranges)
    assert outside == ["torch 2.14.1+cu128 (tested: >=2.4,<2.14)", "transformers 5.24.0 (tested: >=5.0,<5.24)"]
    assert untested_versions({**inside, "peft": "0.22.0rc1"}, ranges) == ["peft 0.22.0rc1 (tested: >=0.21,<0.22)"]


def test_the_locked_environment_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="service.environment"):
        warn_if_untested()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
