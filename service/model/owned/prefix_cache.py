"""Keys/values of prompts already prefilled, reused by later prompts that start the same way (vLLM's automatic
prefix caching, for the slot cache).

A prompt is cut into blocks of ``BLOCK_TOKENS`` inputs. A block is found by its parent block (the one before it in
the same prompt, or the adapter for the first) and its own inputs, so a match is exact: the same adapter version
(its name and content hash: LoRA, IA3, a prefix or virtual tokens change every key and value after them), the same
inputs from the first on. When a row's prompt is in, its whole blocks are copied out of its slot; when a row is
given a slot, the longest run of its prompt's blocks held here is copied in and its prefill starts after them
(never at its last input, whose hidden state gives the first token). Blocks go least recently used first once the
byte budget is full; one whose parent went is no longer reached and goes in its turn.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from service.model.owned.slot_cache import SlotCache

BLOCK_TOKENS = 16


@dataclass
class _Block:
    id: int
    keys: torch.Tensor  # [layers, kv_heads, BLOCK_TOKENS, head_dim]
    values: torch.Tensor


class PrefixCache:
    def __init__(self, cache: SlotCache, budget_bytes: int) -> None:
        self._cache = cache
        self._block_bytes = BLOCK_TOKENS * cache.shape.bytes_per_token(cache.keys[0].dtype)
        self._capacity = budget_bytes // max(1, self._block_bytes)
        self._blocks: OrderedDict[tuple[Hashable, tuple[int, ...]], _Block] = OrderedDict()
        self._ids = itertools.count(1)
        self.hit_tokens = 0  # prompt inputs taken from here instead of computed

    @property
    def enabled(self) -> bool:
        return self._capacity > 0

    @property
    def nbytes(self) -> int:
        return len(self._blocks) * self._block_bytes

    def restore(self, adapter_key: Hashable, inputs: list[int], slot: int, start: int) -> int:
        """Copy the longest run of this prompt's blocks held here into the slot from entry ``start``; returns
        how many inputs they cover (a multiple of ``BLOCK_TOKENS``, short of the last input)."""
        if not self.enabled:
            return 0
        parent: Hashable = ("adapter", adapter_key)
        found: list[_Block] = []
        for begin in range(0, len(inputs) - 1 - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            key = (parent, tuple(inputs[begin:begin + BLOCK_TOKENS]))
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
            parent = block.id
        if not found:
            return 0
        keys = torch.cat([block.keys for block in found], dim=2)
        values = torch.cat([block.values for block in found], dim=2)
        end = start + keys.shape[2]
        for layer in range(len(self._cache.keys)):
            self._cache.keys[layer][slot, :, start:end] = keys[layer]
            self._cache.values[layer][slot, :, start:end] = values[layer]
        self._cache.mark_written(slot, end)
        self.hit_tokens += keys.shape[2]
        return keys.shape[2]

    def store(self, adapter_key: Hashable, inputs: list[int], slot: int, start: int) -> None:
        """Keep the whole blocks of a prompt now in the slot from entry ``start`` (those not held already)."""
        if not self.enabled:
            return
        whole = len(inputs) // BLOCK_TOKENS * BLOCK_TOKENS
        parent: Hashable = ("adapter", adapter_key)
        keys = values = None  # the prompt's entries, [layers, kv_heads, whole, head_dim], read once if needed
        for begin in range(0, whole, BLOCK_TOKENS):
            key = (parent, tuple(inputs[begin:begin + BLOCK_TOKENS]))
            block = self._blocks.get(key)
            if block is None:
                if keys is None or values is None:
                    span = slice(start, start + whole)
                    keys = torch.stack([layer[slot, :, span] for layer in self._cache.keys])
                    values = torch.stack([layer[slot, :, span] for layer in self._cache.values])
                block = _Block(next(self._ids), keys[:, :, begin:begin + BLOCK_TOKENS].clone(),
                               values[:, :, begin:begin + BLOCK_TOKENS].clone())
                self._blocks[key] = block
                while len(self._blocks) > self._capacity:
                    self._blocks.popitem(last=False)
            else:
                self._blocks.move_to_end(key)
            parent = block.id
