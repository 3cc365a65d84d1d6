"""A preallocated key/value cache in slots: each running row owns one slot for its whole life.

Per layer, keys and values are one tensor [slots, kv_heads, slot_tokens, head_dim]; a row's entries sit at their
positions (entry j holds position j: prefix virtual tokens first, then prompt and generated tokens), so a row joins
by claiming a free slot and leaves by releasing it, and no other row's entries ever move. A decode step attends over
a view of the slots in use, never a copy.

The tensors are allocated empty: the operating system commits their pages as rows write them, so the memory in use
follows the tokens held rather than the slots' full length. Batched attention reads (masked) entries past a row's
length up to the longest row's, and a masked entry still multiplies by zero: never-written memory could hold NaN bit
patterns, so each slot is zeroed ahead of use, in strides, up to the span a step reads (``ensure_finite``).
Admission is by a token budget (the sum of what every admitted row may grow to), which is what bounds that memory; a
slot is long enough for the longest row a request may ask for. Free slots are handed out lowest first, so rows stay
packed at the start and the span a step attends over stays short.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

import torch

_ZERO_STRIDE = 64  # entries zeroed past the current need at once, so zeroing runs once every so many steps


@dataclass(frozen=True)
class CacheLimits:
    """The owned engine's sizes (and kernels), from the settings."""

    slots: int = 64  # rows running at once
    cache_bytes: int = 2 * 1024**3  # keys/values of every running row together
    row_tokens: int = 2048 + 256 + 1024  # the longest row a request may make (prompt, virtual and new tokens)
    max_batch_tokens: int = 2048  # tokens in one forward: decode rows plus prompt chunks
    cpu_kernels: bool = True  # the fused CPU kernels where they build (else torch ops)
    kernel_matmul: bool = True  # bf16 matmuls in the service's packed kernel (AMX or AVX-512 BF16; else oneDNN)
    decode_graphs: Literal["off", "on"] = "off"  # decode steps in static shapes, CUDA graphs on a GPU (graphs.py)
    prefix_cache_bytes: int = 0  # keys/values of prefilled prompts kept for prompts that start the same way


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    slots: int
    slot_tokens: int
    budget_tokens: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return bytes_per_token(self.layers, self.kv_heads, self.head_dim, dtype)

    @classmethod
    def sized(cls, limits: CacheLimits, layers: int, kv_heads: int, head_dim: int, max_positions: int,
              dtype: torch.dtype) -> CacheShape:
        budget = max(1, limits.cache_bytes // bytes_per_token(layers, kv_heads, head_dim, dtype))
        return cls(layers=layers, kv_heads=kv_heads, head_dim=head_dim, slots=limits.slots,
                   slot_tokens=min(max_positions, budget, limits.row_tokens), budget_tokens=budget)


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class SlotCache:
    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        size = (shape.slots, shape.kv_heads, shape.slot_tokens, shape.head_dim)
        self.keys = [torch.empty(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.empty(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self._free = list(range(shape.slots))
        heapq.heapify(self._free)
        self._reserved: dict[int, int] = {}  # slot -> tokens its row may grow to
        self._finite = [0] * shape.slots  # per slot: entries before this are written or zeroed

    @property
    def reserved_tokens(self) -> int:
        return sum(self._reserved.values())

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def nbytes_budget(self) -> int:
        return self.shape.budget_tokens * self.shape.bytes_per_token(self.keys[0].dtype)

    def fits_ever(self, tokens: int) -> bool:
        """Whether a row of this many tokens could be admitted into an empty cache."""
        return tokens <= min(self.shape.slot_tokens, self.shape.budget_tokens)

    def claim(self, tokens: int) -> int | None:
        """A slot for a row that may grow to ``tokens`` entries, or None while the cache cannot take it."""
        if not self._free or not self.fits_ever(tokens) or self.reserved_tokens + tokens > self.shape.budget_tokens:
            return None
        slot = heapq.heappop(self._free)
        self._reserved[slot] = tokens
        return slot

    def release(self, slot: int) -> None:
        if self._reserved.pop(slot, None) is not None:
            heapq.heappush(self._free, slot)
            # Whatever the row left (inf or NaN from a broken adapter included) is zeroed again before the next
            # row's steps read past its own length: a masked NaN still poisons attention.
            self._finite[slot] = 0

    def mark_written(self, slot: int, end: int) -> None:
        """Entries before ``end`` of the slot are (about to be) written by its row."""
        if end > self._finite[slot]:
            self._finite[slot] = end

    def forget_written(self, slot: int, end: int) -> None:
        """Only entries before ``end`` hold real values (a step that wrote past it failed)."""
        self._finite[slot] = min(self._finite[slot], end)

    def ensure_finite(self, low: int, high: int, length: int) -> None:
        """Make entries [0, length) of slots low..high-1 hold finite numbers, zeroing in strides ahead of need."""
        for slot in range(low, high):
            start = self._finite[slot]
            if start >= length:
                continue
            end = min(self.shape.slot_tokens, length + _ZERO_STRIDE)
            for keys, values in zip(self.keys, self.values):
                keys[slot, :, start:end] = 0
                values[slot, :, start:end] = 0
            self._finite[slot] = end

    def write_prefix(self, slot: int, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A prefix adapter's keys/values ([1, kv_heads, P, dim] per layer) into the slot's first P entries."""
        for layer, (keys, values) in enumerate(prefix):
            length = keys.shape[2]
            self.keys[layer][slot, :, :length] = keys[0]
            self.values[layer][slot, :, :length] = values[0]
        self.mark_written(slot, prefix[0][0].shape[2])
