"""Slot numbers for the adapters of a stacked per-row pool (gathered LoRA, IA3): slot 0 is reserved for rows with
no adapter, freed slots are reused, and the capacity (rows every stack must hold) grows by doubling."""

from __future__ import annotations

from collections.abc import Callable, Sequence

NO_ADAPTER = 0


class Slots:
    def __init__(self, capacity: int = 8) -> None:
        self._by_name: dict[str, int] = {}
        self._free: list[int] = []
        self.capacity = capacity

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def rows(self, names: Sequence[str | None]) -> list[int]:
        """Each row's slot (``NO_ADAPTER`` for None)."""
        return [NO_ADAPTER if name is None else self._by_name[name] for name in names]

    def claim(self, name: str, grow: Callable[[int], None], write: Callable[[int], None],
              clear: Callable[[int], None]) -> int:
        """Give ``name`` a slot: ``grow`` the stacks to a new capacity if needed, then ``write`` the adapter into
        its slot. If that fails, ``clear`` undoes what was written (the slot goes to the next adapter) and the
        error is raised."""
        slot = self._free.pop() if self._free else len(self._by_name) + 1
        try:
            if slot >= self.capacity:
                self.capacity *= 2
                grow(self.capacity)
            write(slot)
        except Exception:
            clear(slot)
            self._free.append(slot)
            raise
        self._by_name[name] = slot
        return slot

    def release(self, name: str, clear: Callable[[int], None]) -> int | None:
        """Free ``name``'s slot after ``clear`` resets it; None if it had none."""
        slot = self._by_name.pop(name, None)
        if slot is not None:
            clear(slot)
            self._free.append(slot)
        return slot
