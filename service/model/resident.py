"""The bounded set of adapters resident in the model: hot-loaded on first use, least recently used evicted first.

Called from the model worker thread only, so loads, evictions and forward passes never overlap.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from service.domain import AdapterInfo
from service.model.adapters import LoadedAdapter
from service.model.runner import ModelRunner

logger = logging.getLogger(__name__)

# Observer events: "hit", "miss", "evict", "load_seconds", "load_error_seconds", "resident", "resident_bytes".
Observer = Callable[[str, float], None]


class ResidentAdapters:
    """Adapters loaded in the runner by name, bounded by count and bytes; pinned ones are never evicted.

    A changed content hash means a reload from the store's current files, never a stale answer; an adapter that
    is dropped or evicted while running rows hold it keeps its weights until ``collect`` finds it unused.
    """

    def __init__(
        self,
        runner: ModelRunner,
        max_loaded: int,
        max_bytes: int,
        pinned: set[str] | None = None,
        refresh: Callable[[str], AdapterInfo] | None = None,
        observe: Observer | None = None,
    ) -> None:
        self._runner = runner
        self._max_loaded = max_loaded
        self._max_bytes = max_bytes
        self._pinned = pinned or set()
        self._refresh = refresh
        self._observe = observe or (lambda event, value: None)
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._retired: list[LoadedAdapter] = []

    def __contains__(self, name: str) -> bool:
        return name in self._loaded

    @property
    def resident_bytes(self) -> int:
        return sum(adapter.resident_bytes for adapter in self._loaded.values())

    def acquire(self, info: AdapterInfo, protect: set[str] | None = None) -> LoadedAdapter:
        """The resident adapter for ``info``, loading it (and evicting the least recently used) when needed."""
        adapter = self._loaded.get(info.name)
        if adapter is not None and adapter.info.sha256 != info.sha256 and self._refresh is not None:
            info = self._refresh(info.name)  # the request predates a new version: serve the current files
        if adapter is not None and adapter.info.sha256 == info.sha256:
            self._loaded.move_to_end(info.name)
            self._observe("hit", 1)
            return adapter
        self._observe("miss", 1)
        if adapter is not None:
            self.drop(info.name)
        self._make_room(info.size_bytes, protect or set())
        started = time.perf_counter()
        try:
            adapter = self._runner.load(info)
        except Exception:
            self._observe("load_error_seconds", time.perf_counter() - started)
            raise
        self._observe("load_seconds", time.perf_counter() - started)
        self._loaded[info.name] = adapter
        self._report()
        return adapter

    def drop(self, name: str, only: LoadedAdapter | None = None) -> None:
        """Stop serving an adapter (``only`` that loaded instance, not a newer version of the name); its weights go
        once no running row uses them (see ``collect``)."""
        if only is not None and self._loaded.get(name) is not only:
            return
        adapter = self._loaded.pop(name, None)
        if adapter is not None:
            self._retired.append(adapter)
            self._report()

    def collect(self, in_use: set[int]) -> None:
        """Unload dropped adapters that no running row holds (``in_use``: ids of held LoadedAdapters)."""
        still = []
        for adapter in self._retired:
            if id(adapter) in in_use:
                still.append(adapter)
            else:
                self._runner.unload(adapter)
        self._retired = still

    def _report(self) -> None:
        self._observe("resident", len(self._loaded))
        self._observe("resident_bytes", self.resident_bytes)

    def _make_room(self, incoming_bytes: int, protect: set[str]) -> None:
        while self._loaded and (
            len(self._loaded) >= self._max_loaded or self.resident_bytes + incoming_bytes > self._max_bytes
        ):
            victim = next((n for n in self._loaded if n not in self._pinned and n not in protect), None)
            if victim is None:
                return  # everything resident is pinned or in this batch: go over rather than refuse service
            logger.info("evicting adapter %s", victim)
            self._observe("evict", 1)
            self.drop(victim)
