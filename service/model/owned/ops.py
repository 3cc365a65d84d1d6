"""The owned forward's steps between its matmuls: norms, rotary, activation and attention over the slot cache.

Two implementations compute the same thing: ``TorchOps`` in plain torch ops (every device; the reference), and
``KernelOps`` in the service's fused CPU kernels (``kernels.py``), which do each step in one pass where torch runs
a dozen small ops whose dispatch costs more than their arithmetic at a decode step's sizes, and attend decode rows
and short prompt chunks token by token in one call per layer, where torch's flash attention is set up once per
chunk and per decode batch. Long prompt chunks keep torch's attention in both: many queries against many keys is
what that kernel's blocked matmuls do well.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from service.model.owned.batch import Chunk, StepBatch
from service.model.owned.kernels import cpu_kernels_available, torch_threads
from service.model.owned.slot_cache import SlotCache

_KERNEL_LANES = 16  # the widest SIMD vector (floats) the kernels use: head sizes must be a multiple
_KERNEL_MAX_HEAD_DIM = 128  # 16 vectors of the narrowest width (AVX2) the attention kernel is instantiated for
_KERNEL_MAX_GROUP = 16  # query heads per key/value head it holds in registers
# Queries x keys of a prompt chunk up to which the token-by-token kernel beats torch's blocked attention (measured
# here: a 25-token prompt is 5x faster in the kernel, a 128-token chunk after 2,000 tokens 4x slower).
_KERNEL_CHUNK_WORK = 64 * 128


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
    def __init__(self) -> None:
        self._ops = torch.ops.adapter_service

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
        return self._ops.add_rms_norm(x, residual, weight, eps)

    def rotate(self, qkv: torch.Tensor, rotated_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor) -> None:
        self._ops.rotary_(qkv, rotated_heads, head_dim, cos, sin, positions)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._ops.silu_mul(gate_up)

    def attention(self, batch: StepBatch, cache: SlotCache, heads: int) -> Attention:
        return _KernelStepAttention(batch, cache, self._ops)

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
    ``_KERNEL_CHUNK_WORK`` goes to torch's attention instead, which does long prompts in blocked matmuls."""

    def __init__(self, batch: StepBatch, cache: SlotCache, kernels: object) -> None:
        self.cache = cache
        self.kernels = kernels
        self.scale = cache.shape.head_dim ** -0.5
        self.positions = batch.positions
        slots = [batch.decode_slots]
        self.segments: list[tuple[int, int] | Chunk] = []  # token spans for the kernel, and chunks for torch
        start = 0
        for chunk in batch.chunks:
            slots.append(torch.full((chunk.length,), chunk.slot, dtype=torch.long, device=batch.positions.device))
            if chunk.length * (chunk.start + chunk.length) > _KERNEL_CHUNK_WORK:
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


def step_ops(device: torch.device, head_dim: int, group: int, use_kernels: bool) -> StepOps:
    """The fused kernels where they run (a CPU, head sizes and GQA groups they are built for, a compiler that built
    them here), else torch ops."""
    if (use_kernels and device.type == "cpu" and head_dim % _KERNEL_LANES == 0 and head_dim <= _KERNEL_MAX_HEAD_DIM
            and group <= _KERNEL_MAX_GROUP and cpu_kernels_available()):
        return KernelOps()
    return TorchOps()
