"""A key/value cache that appends in place.

transformers' ``DynamicLayer`` concatenates every new token onto the whole cache, so each decode step copies every
layer's keys and values: on this model at 16 rows that copy took as long as all the matmuls of the step. Here each
layer keeps its keys and values in a buffer with spare room (grown by doubling), and a step writes one column.
Anything that replaces ``keys``/``values`` from outside (row selection, merging batches, trimming padding) simply
makes the next append move them into a fresh buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

_MIN_ROOM = 32  # columns of headroom given at least, so short generations reallocate once or twice

Entries = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values): [rows, heads, columns, dim]


def _capacity(needed: int) -> int:
    """Columns to allocate for ``needed``: doubling, so appends cost amortised constant time."""
    return needed + max(needed, _MIN_ROOM)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views into larger buffers."""

    def __init__(self) -> None:
        super().__init__()
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not self._holds_current(key_states.shape[0], needed):
            self._move_to_new_buffers(_capacity(needed), key_states, value_states, length)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, length:needed] = key_states
        self._value_buffer[:, :, length:needed] = value_states
        self.keys = self._key_buffer[:, :, :needed]
        self.values = self._value_buffer[:, :, :needed]
        return self.keys, self.values

    def adopt(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Take buffers whose first ``length`` columns hold the keys and values."""
        self.lazy_initialization(key_buffer, value_buffer)
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self.keys, self.values = key_buffer[:, :, :length], value_buffer[:, :, :length]

    def _holds_current(self, batch: int, needed: int) -> bool:
        """Whether ``keys``/``values`` are still the leading columns of the buffers, with room for ``needed``."""
        buffer = self._key_buffer
        if buffer is None or buffer.shape[0] != batch or buffer.shape[2] < needed:
            return False
        if self.get_seq_length() == 0:
            return True
        return (
            self.keys.data_ptr() == buffer.data_ptr()
            and self.keys.stride() == buffer.stride()
            and self.values.data_ptr() == self._value_buffer.data_ptr()
            and self.values.stride() == self._value_buffer.stride()
        )

    def _move_to_new_buffers(
        self, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor, length: int
    ) -> None:
        batch, heads, _, key_dim = key_states.shape
        self._key_buffer = key_states.new_empty((batch, heads, capacity, key_dim))
        self._value_buffer = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
        if length:
            self._key_buffer[:, :, :length] = self.keys
            self._value_buffer[:, :, :length] = self.values


class KVCache(DynamicCache):
    """A ``DynamicCache`` made of ``GrowingLayer``s (empty ones added as layers are first used)."""

    def __init__(self, layers: Sequence[GrowingLayer] = ()) -> None:
        if layers:
            Cache.__init__(self, layers=list(layers))
        else:
            Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    def entries(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.layers]


def stack_right_aligned(parts: Sequence[Entries], width: int) -> KVCache:
    """One cache holding the rows of every part, each row's entries ending at column ``width`` (zeros before
    them), written once into buffers with room to grow."""
    stacked: list[GrowingLayer] = []
    for layer_parts in zip(*parts):
        batch = sum(keys.shape[0] for keys, _ in layer_parts)
        keys, values = layer_parts[0]
        key_buffer = keys.new_zeros((batch, keys.shape[1], _capacity(width), keys.shape[3]))
        value_buffer = values.new_zeros((batch, values.shape[1], _capacity(width), values.shape[3]))
        row = 0
        for keys, values in layer_parts:
            rows, length = keys.shape[0], keys.shape[2]
            if length:  # rows without a prefix stay zeros: a mixed batch would dispatch thousands of empty copies
                key_buffer[row:row + rows, :, width - length:width] = keys
                value_buffer[row:row + rows, :, width - length:width] = values
            row += rows
        layer = GrowingLayer()
        layer.adopt(key_buffer, value_buffer, width)
        stacked.append(layer)
    return KVCache(stacked)
