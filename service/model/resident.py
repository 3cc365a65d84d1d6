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


class ResidentAdapters:
    """Adapters loaded in the runner by name; a changed content hash means a reload, never a stale answer."""

    def __init__(
        self,
        runner: ModelRunner,
        max_loaded: int,
        pinned: set[str] | None = None,
        on_load: Callable[[float, str], None] | None = None,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self._runner = runner
        self._max_loaded = max_loaded
        self._pinned = pinned or set()
        self._on_load = on_load or (lambda seconds, outcome: None)
        self._on_change = on_change or (lambda count: None)
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._retired: list[LoadedAdapter] = []  # dropped while rows may still use them

    def __contains__(self, name: str) -> bool:
        return name in self._loaded

    def loaded_version(self, name: str) -> str | None:
        adapter = self._loaded.get(name)
        return None if adapter is None else adapter.info.sha256

    def acquire_all(self, infos: list[AdapterInfo | None]) -> list[LoadedAdapter | None]:
        """Load what a batch needs; none of the batch's own adapters is evicted to make room for another."""
        protect = {info.name for info in infos if info is not None}
        loaded: dict[str, LoadedAdapter] = {}
        for info in infos:
            if info is not None and info.name not in loaded:
                loaded[info.name] = self.acquire(info, protect)
        return [None if info is None else loaded[info.name] for info in infos]

    def acquire(self, info: AdapterInfo, protect: set[str] | None = None) -> LoadedAdapter:
        """The resident adapter for ``info``, loading it (and evicting the least recently used) when needed."""
        adapter = self._loaded.get(info.name)
        if adapter is not None and adapter.info.sha256 == info.sha256:
            self._loaded.move_to_end(info.name)
            return adapter
        if adapter is not None:
            self.drop(info.name)
        self._make_room(protect or set())
        started = time.perf_counter()
        try:
            adapter = self._runner.load(info)
        except Exception:
            self._on_load(time.perf_counter() - started, "error")
            raise
        self._on_load(time.perf_counter() - started, "loaded")
        self._loaded[info.name] = adapter
        self._on_change(len(self._loaded))
        return adapter

    def drop(self, name: str) -> None:
        """Stop serving an adapter; its weights go once no running row uses them (see ``collect``)."""
        adapter = self._loaded.pop(name, None)
        if adapter is not None:
            self._retired.append(adapter)
            self._on_change(len(self._loaded))

    def collect(self, in_use: set[int]) -> None:
        """Unload dropped adapters that no running row holds (``in_use``: ids of held LoadedAdapters)."""
        still = []
        for adapter in self._retired:
            if id(adapter) in in_use:
                still.append(adapter)
            else:
                self._runner.unload(adapter)
        self._retired = still

    def _make_room(self, protect: set[str]) -> None:
        while len(self._loaded) >= self._max_loaded:
            victim = next((n for n in self._loaded if n not in self._pinned and n not in protect), None)
            if victim is None:
                return  # everything resident is pinned or in this batch: go over rather than refuse service
            logger.info("evicting adapter %s", victim)
            self.drop(victim)
