"""Adapter versions that failed at run time: refused until replaced (PUT) or deleted. No torch, no HTTP."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from service.domain import AdapterInfo
from service.errors import AdapterFailed


@dataclass(frozen=True)
class Failure:
    sha256: str
    reason: str


class Quarantine:
    """Written by the model worker when an adapter's forward fails, read by request handlers and the listing."""

    def __init__(self) -> None:
        self._failed: dict[str, Failure] = {}
        self._lock = threading.Lock()

    def mark(self, info: AdapterInfo, reason: str) -> None:
        with self._lock:
            self._failed[info.name] = Failure(info.sha256, reason)

    def failure(self, info: AdapterInfo) -> Failure | None:
        """This version's failure; a new version (another content hash) starts clean."""
        with self._lock:
            failure = self._failed.get(info.name)
            if failure is not None and failure.sha256 != info.sha256:
                del self._failed[info.name]
                return None
            return failure

    def forget(self, name: str) -> None:
        with self._lock:
            self._failed.pop(name, None)

    def check(self, info: AdapterInfo) -> None:
        """Raise ``AdapterFailed`` for a quarantined version."""
        failure = self.failure(info)
        if failure is not None:
            raise adapter_failed(info.name, failure.reason)


def adapter_failed(name: str, reason: str) -> AdapterFailed:
    return AdapterFailed(
        f"adapter {name!r} failed at run time and was unloaded: {reason}. Its other requests are refused until it "
        f"is replaced (PUT /v1/adapters/{name} with a fixed archive) or deleted (DELETE /v1/adapters/{name})"
    )
