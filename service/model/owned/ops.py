"""The owned forward's steps between its matmuls: norms, rotary, activation and attention over the slot cache.

Two implementations compute the same thing: ``TorchOps`` in plain torch ops (every device; the reference), and
``KernelOps`` in the service's fused CPU kernels (``kernels.py``), which do each step in one pass where torch runs
a dozen small ops whose dispatch costs more than their arithmetic at a decode step's sizes, and attend decode rows
and short prompt chunks token by token in one call per layer, where torch's flash attention is set up once per
chunk and per decode batch. Long prompt chunks go to whichever of the two measures faster on this CPU
(``chunk_work_limit``): torch's blocked matmuls where they run on AMX, the kernel where torch's attention does
not.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Protocol

import torch
import torch.nn.functional as F

from service.model.owned.batch import Chunk, StepBatch
from service.model.owned.kernels import cpu_kernels_available, kernel_threads, torch_threads
from service.model.owned.slot_cache import SlotCache

logger = logging.getLogger(__name__)

_KERNEL_LANES = 16  # the widest SIMD vector (floats) the kernels use: head sizes must be a multiple
_KERNEL_MAX_HEAD_DIM = 128  # 16 vectors of the narrowest width (AVX2) the attention kernel is instantiated for
_KERNEL_MAX_GROUP = 16  # query heads per key/value head it holds in registers
# Queries x keys of a prompt chunk up to which the token-by-token kernel beats torch's blocked attention where
# torch's is the faster for long chunks (on an Intel Xeon with AMX: a 25-token prompt 5x faster in the kernel, a
# 128-token chunk after 2,000 tokens 4x slower).
_KERNEL_CHUNK_WORK = 64 * 128
# The long chunk both are timed on: a 512-token piece of a prompt after its first 1,536 tokens.
_PROBE_START, _PROBE_LENGTH = 1536, 512
# The share of torch's time under which the kernel takes long chunks: a clear win only, so that a machine's load
# at start does not flip between two paths that round differently (the same long prompt could then get other
# greedy tokens after a restart).
_CLEAR_WIN = 0.9


class Attention(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write the step's keys/values ([tokens, kv_heads, dim]) into the cache, return attention [tokens, heads,
        dim] of q [tokens, heads, dim]."""


class StepOps(Protocol):
    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
        """Add ``residual`` into ``x`` in place (if given), return RMSNorm(x) * weight."""

    def rotate(self, qkv: torch.Tensor, rotated_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor) -> None:
        """Rotary embedding, in place, of the first ``rotated_heads`` heads of qkv [tokens, features]."""

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...

    def attention(self, batch: StepBatch, cache: SlotCache, heads: int) -> Attention: ...

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """[rows, vocabulary] (possibly a transposed view: ``top_logits`` reads either layout fast)."""


# -- torch ops ------------------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [tokens, heads, dim] with cos/sin [tokens, 1, dim] (HF's rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class TorchOps:
    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
        if residual is not None:
            x.add_(residual)
        return rms_norm(x, weight, eps)

    def rotate(self, qkv: torch.Tensor, rotated_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor) -> None:
        width = rotated_heads * head_dim
        heads = qkv[:, :width].view(qkv.shape[0], rotated_heads, head_dim)
        heads.copy_(rotate(heads, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)))

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_mul(gate_up)

    def attention(self, batch: StepBatch, cache: SlotCache, heads: int) -> Attention:
        decode = _DecodeAttention(batch, cache, heads) if batch.decode_rows else None
        return _StepAttention(batch, cache, decode)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(hidden, weight, bias)


class _StepAttention:
    """Decode rows through ``decode`` (if any), prompt chunks one call each."""

    def __init__(self, batch: StepBatch, cache: SlotCache, decode: Attention | None) -> None:
        self.batch = batch
        self.cache = cache
        self.decode = decode

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rows = self.batch.decode_rows
        if not self.batch.chunks:
            assert self.decode is not None
            return self.decode(layer, q, k, v)
        out = q.new_empty(q.shape)
        if self.decode is not None:
            out[:rows] = self.decode(layer, q[:rows], k[:rows], v[:rows])
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        for chunk in self.batch.chunks:
            span = slice(chunk.offset, chunk.offset + chunk.length)
            out[span] = _chunk_attention(chunk, q[span], k[span], v[span], keys, values)
        return out


class _DecodeAttention:
    """Attention of the decode rows (one new token each) over the span of slots they occupy, as a view."""

    def __init__(self, batch: StepBatch, cache: SlotCache, heads: int) -> None:
        slots = batch.decode_slots
        self.cache = cache
        self.slots = slots
        self.positions = batch.positions[:slots.shape[0]]
        self.low = int(slots[0])
        high = int(slots[-1]) + 1
        self.span = high - self.low
        self.length = int(self.positions.max()) + 1
        self.dense = self.span == slots.shape[0]  # rows fill their span: no holes to scatter into
        self.index = slots - self.low
        columns = torch.arange(self.length, device=slots.device)
        lengths = torch.zeros(self.span, dtype=torch.long, device=slots.device)
        lengths[self.index] = self.positions + 1  # holes attend to nothing (their output is never read)
        mask = columns[None, :] < lengths[:, None]
        mask[:, 0] = True  # a hole still needs one key, or its softmax is NaN
        self.mask = mask[:, None, None, :]
        self.heads = heads
        cache.ensure_finite(self.low, high, self.length)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.slots, :, self.positions] = k
        values[self.slots, :, self.positions] = v
        span = slice(self.low, self.low + self.span)
        if self.dense:
            query = q.unsqueeze(2)  # [rows, heads, 1, dim]
        else:
            query = q.new_zeros((self.span, self.heads, 1, q.shape[-1]))
            query[self.index] = q.unsqueeze(2)
        out = F.scaled_dot_product_attention(
            query, keys[span, :, :self.length], values[span, :, :self.length], attn_mask=self.mask, enable_gqa=True,
        )
        return (out if self.dense else out[self.index]).squeeze(2)


def _chunk_attention(chunk: Chunk, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor) -> torch.Tensor:
    end = chunk.start + chunk.length
    keys[chunk.slot, :, chunk.start:end] = k.transpose(0, 1)
    values[chunk.slot, :, chunk.start:end] = v.transpose(0, 1)
    query = q.transpose(0, 1).unsqueeze(0)  # [1, heads, length, dim]
    key_view = keys[chunk.slot:chunk.slot + 1, :, :end]
    value_view = values[chunk.slot:chunk.slot + 1, :, :end]
    if chunk.start == 0:
        out = F.scaled_dot_product_attention(query, key_view, value_view, is_causal=True, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(query, key_view, value_view, attn_mask=chunk.mask(q.device),
                                             enable_gqa=True)
    return out[0].transpose(0, 1)


# -- fused CPU kernels ----------------------------------------------------------------------------------------------

class KernelOps:
    def __init__(self, chunk_work_limit: float = _KERNEL_CHUNK_WORK) -> None:
        self._ops = torch.ops.adapter_service
        self._chunk_work_limit = chunk_work_limit

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
        return self._ops.add_rms_norm(x, residual, weight, eps)

    def rotate(self, qkv: torch.Tensor, rotated_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor) -> None:
        self._ops.rotary_(qkv, rotated_heads, head_dim, cos, sin, positions)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._ops.silu_mul(gate_up)

    def attention(self, batch: StepBatch, cache: SlotCache, heads: int) -> Attention:
        return _KernelStepAttention(batch, cache, self._ops, self._chunk_work_limit)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The head as the left operand: oneDNN then reads it as it lies instead of reordering all of it (the
        # tied embedding, kept unpacked) on every call; 1.7-2x faster at 16-64 rows here. Rows come out as
        # columns, which top_logits reads in one pass.
        logits = torch.mm(weight, hidden.t())
        if bias is not None:
            logits += bias[:, None]
        return logits.t()


class _KernelStepAttention:
    """Decode rows and short prompt chunks in one kernel call per layer: each token writes its key/value into its
    row's slot, then attends over that slot up to its own position (its prefix, its prompt's earlier tokens, what
    it generated), reading nothing past it, so no slot needs zeroing ahead. A chunk whose queries times keys pass
    ``chunk_work_limit`` goes to torch's attention instead, which does long prompts in blocked matmuls."""

    def __init__(self, batch: StepBatch, cache: SlotCache, kernels: object, chunk_work_limit: float) -> None:
        self.cache = cache
        self.kernels = kernels
        self.scale = cache.shape.head_dim ** -0.5
        self.positions = batch.positions
        slots = [batch.decode_slots]
        self.segments: list[tuple[int, int] | Chunk] = []  # token spans for the kernel, and chunks for torch
        start = 0
        for chunk in batch.chunks:
            slots.append(torch.full((chunk.length,), chunk.slot, dtype=torch.long, device=batch.positions.device))
            if chunk.length * (chunk.start + chunk.length) > chunk_work_limit:
                if chunk.offset > start:
                    self.segments.append((start, chunk.offset))
                self.segments.append(chunk)
                start = chunk.offset + chunk.length
        if batch.positions.shape[0] > start:
            self.segments.append((start, batch.positions.shape[0]))
        self.slots = torch.cat(slots) if len(slots) > 1 else batch.decode_slots

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if len(self.segments) == 1 and not isinstance(self.segments[0], Chunk):
            return self._kernel(q, k, v, keys, values, 0, q.shape[0])
        out = q.new_empty(q.shape)
        for segment in self.segments:
            if isinstance(segment, Chunk):
                span = slice(segment.offset, segment.offset + segment.length)
                with torch_threads():  # torch's blocked attention, on all the threads
                    out[span] = _chunk_attention(segment, q[span], k[span], v[span], keys, values)
            else:
                out[segment[0]:segment[1]] = self._kernel(q, k, v, keys, values, *segment)
        return out

    def _kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                begin: int, end: int) -> torch.Tensor:
        return self.kernels.slot_attention(  # type: ignore[attr-defined]
            q[begin:end], k[begin:end], v[begin:end], keys, values, self.slots[begin:end],
            self.positions[begin:end], self.scale)


def top_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest logit and its first index (NaN if the row has one), for logits [rows, vocabulary] in
    either layout: a transposed one goes to the column kernel, where torch's reduction across rows is slow."""
    if (logits.dim() == 2 and logits.stride(0) == 1 and logits.stride(1) == logits.shape[0]
            and logits.device.type == "cpu" and cpu_kernels_available()):
        return torch.ops.adapter_service.column_max(logits.t())
    return logits.max(dim=-1)


def step_ops(device: torch.device, head_dim: int, kv_heads: int, group: int, dtype: torch.dtype,
             use_kernels: bool) -> StepOps:
    """The fused kernels where they run (a CPU, head sizes and GQA groups they are built for, a compiler that built
    them here), else torch ops."""
    if (use_kernels and device.type == "cpu" and head_dim % _KERNEL_LANES == 0 and head_dim <= _KERNEL_MAX_HEAD_DIM
            and group <= _KERNEL_MAX_GROUP and cpu_kernels_available()):
        return KernelOps(chunk_work_limit(head_dim, kv_heads, group, dtype))
    return TorchOps()


@functools.cache
def chunk_work_limit(head_dim: int, kv_heads: int, group: int, dtype: torch.dtype) -> float:
    """Queries x keys of a prompt chunk up to which the attention kernel takes it: unlimited where the kernel
    measures faster than torch's attention on a long chunk, else ``_KERNEL_CHUNK_WORK``.

    Which is faster depends on the CPU: on an Intel Xeon with AMX torch's blocked attention was 4x the kernel's
    speed on a 128-token chunk after 2,000 tokens; on an AMD EPYC (Zen 5, AVX-512 BF16, no AMX) it was slower at
    every length tried (a 2,048-token step of 16 prompts of ~200 tokens took 976 ms with long chunks in torch and
    579 ms all in the kernel; one 3,079-token prompt 3.6 s against 2.1 s). So both are timed once here, as a step
    runs them (inside ``kernel_threads``): a 512-token chunk after 1,536 tokens, the fastest of three runs each
    after one uncounted (0.2-0.7 s at start); the kernel must take under ``_CLEAR_WIN`` of torch's time."""
    if not cpu_kernels_available():
        return _KERNEL_CHUNK_WORK
    heads = kv_heads * group
    generator = torch.Generator().manual_seed(0)
    tokens = _PROBE_START + _PROBE_LENGTH

    def sample(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    q, k, v = sample(_PROBE_LENGTH, heads, head_dim), sample(_PROBE_LENGTH, kv_heads, head_dim), sample(
        _PROBE_LENGTH, kv_heads, head_dim)
    keys, values = sample(1, kv_heads, tokens, head_dim), sample(1, kv_heads, tokens, head_dim)
    slots = torch.zeros(_PROBE_LENGTH, dtype=torch.long)
    positions = torch.arange(_PROBE_START, tokens)
    chunk = Chunk(slot=0, start=_PROBE_START, length=_PROBE_LENGTH, offset=0)
    ops = torch.ops.adapter_service

    def in_kernel() -> None:
        ops.slot_attention(q, k, v, keys, values, slots, positions, head_dim ** -0.5)

    def in_torch() -> None:
        with torch_threads():
            _chunk_attention(chunk, q, k, v, keys, values)

    seconds = dict.fromkeys(("kernel", "torch"), math.inf)
    with torch.inference_mode(), kernel_threads():
        for run in range(4):
            for name, attend in (("kernel", in_kernel), ("torch", in_torch)):
                started = time.perf_counter()
                attend()
                if run:
                    seconds[name] = min(seconds[name], time.perf_counter() - started)
    kernel_wins = seconds["kernel"] < _CLEAR_WIN * seconds["torch"]
    logger.info("long prompt chunks: attention kernel %.1f ms, torch %.1f ms; long chunks in %s",
                seconds["kernel"] * 1e3, seconds["torch"] * 1e3, "the kernel" if kernel_wins else "torch")
    return math.inf if kernel_wins else _KERNEL_CHUNK_WORK
