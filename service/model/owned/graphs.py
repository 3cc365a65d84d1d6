"""Decode steps in static shapes, replayed as CUDA graphs by batch-size bucket (``SERVICE_DECODE_GRAPHS``).

A decode step (one new token per running row, no prompt chunk) launches a few hundred small kernels; on a GPU at
small batches their launch cost bounds the step, which is why vLLM and TGI capture such steps once per batch size
and replay them. A graph replays fixed shapes at fixed addresses, so the step here is laid out by cache slot, not by
row: slot ``i``'s token is row ``i`` of a static batch covering slots 0..B-1, with ``B`` the smallest bucket (1, 2,
4, then multiples of 8, as vLLM's) above the highest slot in use. Rows take the lowest free slots, so holes (slots
with no decoding row: free, or a row whose prompt is still going in) are few; where they would be most of the batch
the step runs dynamically instead. A hole computes a zero input at the last entry of its own slot and its output is
never read: no row ever writes that entry or reads it unmasked (a row's newest token is never fed back, so its
entries end at most one short of the slot), and what the hole leaves there is finite. Attention reads the first
``L`` entries of slots 0..B-1 as a view of the cache, masked by each row's position, ``L`` a power of two from 64:
the second part of a graph's key. Everything a step varies (embeddings, positions, each token's LoRA and IA3 pool
slots) is copied into buffers the graph reads; adapters' matrices are gathered from the pools inside the step
(``SlotStepAdapters``), and a pool whose tensors move (a new module, a larger rank) drops every graph. Embedding and
sampling stay outside: an adapter's own vocabulary is per-row work.

The step is idempotent (its residual stream starts from a copy of the input buffer), since a capture runs it once
to warm up and then the replay runs it again on the same inputs. Graphs are captured lazily, the first time a key
comes up, in ``thread_local`` error mode (the adapter loader's threads may copy tensors to the device meanwhile); a
key whose capture fails runs its static step eagerly. On a CPU that eager static step is all there is (with
``on``), so CPU tests exercise everything a graph replays but the capture itself: that, and the speed it brings,
are unverified here (no GPU was available), which is why the setting is off by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.model.owned.llama import LlamaForward
from service.model.owned.routing import OwnedAdapters, SlotStepAdapters
from service.model.owned.slot_cache import SlotCache
from service.model.slots import NO_ADAPTER

logger = logging.getLogger(__name__)

_SMALL_SIZES = (1, 2, 4)
_SIZE_STEP = 8
_MIN_LENGTH = 64


def batch_sizes(slots: int) -> list[int]:
    """The buckets of a cache of ``slots`` slots: 1, 2, 4, then multiples of 8, and the slot count."""
    return sorted({size for size in _SMALL_SIZES if size < slots} | set(range(_SIZE_STEP, slots, _SIZE_STEP))
                  | {slots})


def length_bucket(length: int, slot_tokens: int) -> int:
    """Cache entries a step attends over: a power of two from 64 holding ``length``, at most a slot's length."""
    bucket = _MIN_LENGTH
    while bucket < length:
        bucket *= 2
    return min(bucket, slot_tokens)


@dataclass(frozen=True)
class _Key:
    size: int  # slots 0..size-1 are the step's rows
    length: int  # cache entries attended over
    lora: bool  # whether the step adds LoRA deltas
    ia3: bool  # whether it applies IA3 scales


class _SlotAttention:
    """Attention of one token per slot 0..B-1: each writes its key/value at its position, then attends over the
    first ``length`` entries of its slot up to that position."""

    def __init__(self, cache: SlotCache, rows: torch.Tensor, positions: torch.Tensor, length: int) -> None:
        self.cache = cache
        self.rows = rows
        self.positions = positions
        self.size = rows.shape[0]
        self.length = length
        columns = torch.arange(length, device=positions.device)
        self.mask = (columns[None, :] <= positions[:, None])[:, None, None, :]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.rows, :, self.positions] = k
        values[self.rows, :, self.positions] = v
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys[:self.size, :, :self.length], values[:self.size, :, :self.length],
            attn_mask=self.mask, enable_gqa=True,
        )
        return out.squeeze(2)


class _Replay:
    """One key's step: captured once as a CUDA graph and replayed, or (on a CPU) the same function run each time."""

    def __init__(self, step: Callable[[], torch.Tensor], capture: bool, pool: object) -> None:
        self._step = step
        self._graph: torch.cuda.CUDAGraph | None = None
        if not capture:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # lazy set-up (cuBLAS handles, workspaces) must not happen while capturing
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self._output = step()
        self._graph = graph

    def __call__(self) -> torch.Tensor:
        if self._graph is None:
            return self._step()
        self._graph.replay()
        return self._output


class DecodeGraphs:
    """The owned forward's decode steps in static shapes, by (batch-size bucket, attended length, adapter kinds)."""

    def __init__(self, forward: LlamaForward, cache: SlotCache, adapters: OwnedAdapters, capture: bool) -> None:
        self._forward = forward
        self._cache = cache
        self._adapters = adapters
        self._capture = capture
        slots = cache.shape.slots
        device = forward.embed.device
        self.sizes = batch_sizes(slots)
        self._embeddings = torch.zeros((slots, forward.embed.shape[1]), dtype=forward.dtype, device=device)
        self._positions = torch.zeros(slots, dtype=torch.long, device=device)
        self._lora = torch.zeros(slots, dtype=torch.long, device=device)
        self._ia3 = torch.zeros(slots, dtype=torch.long, device=device)
        self._rows = torch.arange(slots, device=device)
        self._hole_position = cache.shape.slot_tokens - 1
        self._replays: dict[_Key, _Replay] = {}
        self._layout: tuple | None = None
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.built = 0  # steps set up (captured, on CUDA) so far
        self.dropped = 0  # times every step was dropped because a pool's tensors moved
        self.failed_captures = 0

    def covers(self, slots: Sequence[int]) -> bool:
        """Whether decode rows in these cache slots (ascending) are at least half of their bucket's batch."""
        return 2 * len(slots) >= self._size(slots)

    def _size(self, slots: Sequence[int]) -> int:
        """The bucket of decode rows in these cache slots (ascending): the smallest batch over their highest."""
        return next(size for size in self.sizes if size > slots[-1])

    def __call__(self, embeddings: torch.Tensor, slots: Sequence[int], positions: Sequence[int],
                 lora: Sequence[int] | None, ia3: Sequence[int] | None) -> torch.Tensor:
        """The final-normed hidden states [rows, hidden] of decode rows in these cache slots (ascending), with
        these input embeddings, positions and pool slots."""
        size = self._size(slots)
        length = length_bucket(max(positions) + 1, self._cache.shape.slot_tokens)
        key = _Key(size, length, lora is not None, ia3 is not None)
        layout = self._adapters.layout()
        if layout != self._layout:
            if self._replays:
                self.dropped += 1
            self._replays.clear()
            self._layout = layout
        device = self._embeddings.device
        index = torch.tensor(slots, device=device)
        self._embeddings[:size].zero_()
        self._embeddings.index_copy_(0, index, embeddings.to(self._embeddings.dtype))
        self._fill(self._positions, size, self._hole_position, index, positions)
        if lora is not None:
            self._fill(self._lora, size, NO_ADAPTER, index, lora)
        if ia3 is not None:
            self._fill(self._ia3, size, NO_ADAPTER, index, ia3)
        self._cache.ensure_finite(0, size, length)
        replay = self._replays.get(key)
        if replay is None:
            replay = self._replays[key] = self._set_up(key)
            self.built += 1
            logger.debug("decode step of %d slots over %d entries set up (%s)", size, length,
                         "captured" if self._capture else "eager")
        return replay().index_select(0, index)

    def _set_up(self, key: _Key) -> _Replay:
        try:
            return _Replay(self._step(key), self._capture, self._pool)
        except Exception as error:
            if not self._capture:
                raise
            self.failed_captures += 1
            logger.warning("CUDA graph capture of a %d-slot step over %d entries failed (%r); it runs eagerly",
                           key.size, key.length, error)
            torch.cuda.synchronize()
            return _Replay(self._step(key), False, None)

    @staticmethod
    def _fill(buffer: torch.Tensor, size: int, hole: int, index: torch.Tensor, values: Sequence[int]) -> None:
        buffer[:size] = hole
        buffer.index_copy_(0, index, torch.tensor(values, dtype=buffer.dtype, device=buffer.device))

    def _step(self, key: _Key) -> Callable[[], torch.Tensor]:
        size = key.size
        x, positions, rows = self._embeddings[:size], self._positions[:size], self._rows[:size]
        adapters = SlotStepAdapters(self._adapters, self._lora[:size] if key.lora else None,
                                    self._ia3[:size] if key.ia3 else None)

        def step() -> torch.Tensor:
            attend = _SlotAttention(self._cache, rows, positions, key.length)
            return self._forward.layers_forward(x.clone(), positions, attend, adapters if key.lora or key.ia3 else None)

        return step
