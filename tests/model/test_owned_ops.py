"""The fused CPU kernels compute what the torch ops compute: attention over slots (holes, prefixes, GQA, prompt
chunks beside decode rows), residual + RMSNorm, rotary and SiLU, in float32 and bfloat16; bad input is refused."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from service.model.owned.batch import Chunk, StepBatch
from service.model.owned.kernels import cpu_kernels_available
from service.model.owned.ops import KernelOps, TorchOps, chunk_work_limit, step_ops, top_logits
from service.model.owned.slot_cache import CacheShape, SlotCache

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the service runs torch ops instead")

HEADS, KV_HEADS, DIM = 6, 2, 32
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def test_the_kernels_build_where_a_compiler_is() -> None:
    assert cpu_kernels_available()


@pytest.fixture(autouse=True)
def _kernels_loaded() -> None:
    """Tests that call torch.ops.adapter_service directly need the library loaded, whichever of them run."""
    cpu_kernels_available()


def _cache(dtype: torch.dtype, slots: int = 8, slot_tokens: int = 256, kv_heads: int = KV_HEADS,
           dim: int = DIM) -> SlotCache:
    shape = CacheShape(layers=1, kv_heads=kv_heads, head_dim=dim, slots=slots, slot_tokens=slot_tokens,
                       budget_tokens=slots * slot_tokens)
    cache = SlotCache(shape, dtype, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=generator))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator))
    for slot in range(slots):  # as earlier steps of running rows would have left them
        cache.claim(slot_tokens)
        cache.mark_written(slot, slot_tokens)
    return cache


def _attend(ops: TorchOps | KernelOps, batch: StepBatch, cache: SlotCache, qkv: tuple[torch.Tensor, ...]):
    q, k, v = (t.clone() for t in qkv)
    out = ops.attention(batch, cache, HEADS)(0, q, k, v)
    return out, cache.keys[0].clone(), cache.values[0].clone()


@pytest.mark.parametrize("chunk_work_limit", [64 * 128, math.inf], ids=["long-chunks-in-torch", "all-in-kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_torch_for_decode_rows_with_holes_and_prompt_chunks(dtype: torch.dtype,
                                                                                chunk_work_limit: float) -> None:
    # Decode rows in slots 0, 2, 5 (holes between, different lengths; slot 5 as if behind a 7-entry prefix), then
    # a fresh prompt chunk in slot 3, a long chunk late in a prompt in slot 7 (torch's attention with the kernels
    # where torch's measures faster, else the kernel) and a later chunk of a prompt in slot 6.
    decode_slots, decode_positions = [0, 2, 5], [4, 17, 30]
    chunks = [Chunk(slot=3, start=0, length=5, offset=3), Chunk(slot=7, start=120, length=80, offset=8),
              Chunk(slot=6, start=9, length=4, offset=88)]
    positions = decode_positions + list(range(0, 5)) + list(range(120, 200)) + list(range(9, 13))
    tokens = len(positions)
    generator = torch.Generator().manual_seed(1)
    qkv = (torch.randn(tokens, HEADS, DIM, generator=generator).to(dtype),
           torch.randn(tokens, KV_HEADS, DIM, generator=generator).to(dtype),
           torch.randn(tokens, KV_HEADS, DIM, generator=generator).to(dtype))
    batch = StepBatch(torch.empty(tokens, 1), torch.tensor(positions), torch.tensor(decode_slots), chunks)
    results = [_attend(ops, batch, _cache(dtype), qkv) for ops in (TorchOps(), KernelOps(chunk_work_limit))]
    (expected, keys, values), (actual, kernel_keys, kernel_values) = results
    # What the step wrote is identical; what a row may read of the cache (up to its position) is too.
    for slot, position in zip(decode_slots, decode_positions):
        assert torch.equal(keys[slot, :, :position + 1], kernel_keys[slot, :, :position + 1])
        assert torch.equal(values[slot, :, :position + 1], kernel_values[slot, :, :position + 1])
    for chunk in chunks:
        assert torch.equal(keys[chunk.slot, :, :chunk.start + chunk.length],
                           kernel_keys[chunk.slot, :, :chunk.start + chunk.length])
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_attention_maps_query_heads_to_their_kv_head() -> None:
    """Head h reads kv head h // (heads / kv_heads): making one kv head's values huge moves only its heads."""
    cache = _cache(torch.float32)
    batch = StepBatch(torch.empty(1, 1), torch.tensor([3]), torch.tensor([1]), [])
    q, k, v = torch.zeros(1, HEADS, DIM), torch.zeros(1, KV_HEADS, DIM), torch.zeros(1, KV_HEADS, DIM)
    cache.values[0][1, 1, :4] = 1000.0
    v[0, 1] = 1000.0
    out = KernelOps().attention(batch, cache, HEADS)(0, q, k, v)
    group = HEADS // KV_HEADS
    assert torch.all(out[0, group:].abs() > 100) and torch.all(out[0, :group].abs() < 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pointwise_kernels_match_torch(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    width = 72  # not a multiple of the SIMD width: the tail path runs too
    x = torch.randn(5, width, generator=generator).to(dtype)
    residual = torch.randn(5, width, generator=generator).to(dtype)
    weight = torch.randn(width, generator=generator).to(dtype)
    torch_x, kernel_x = x.clone(), x.clone()
    expected = TorchOps().add_norm(torch_x, residual, weight, 1e-5)
    actual = KernelOps().add_norm(kernel_x, residual, weight, 1e-5)
    assert torch.equal(torch_x, kernel_x)  # the residual lands in x identically
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    no_residual = KernelOps().add_norm(x.clone(), None, weight, 1e-5)
    torch.testing.assert_close(no_residual.float(), TorchOps().add_norm(x.clone(), None, weight, 1e-5).float(),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])

    gate_up = (4 * torch.randn(5, 2 * width, generator=generator)).to(dtype)
    torch.testing.assert_close(KernelOps().silu_mul(gate_up).float(), TorchOps().silu_mul(gate_up).float(),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])

    qkv = torch.randn(5, (HEADS + 2 * KV_HEADS) * DIM, generator=generator).to(dtype)
    angles = torch.randn(40, DIM, generator=generator)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    positions = torch.tensor([0, 3, 39, 7, 7])
    torch_qkv, kernel_qkv = qkv.clone(), qkv.clone()
    TorchOps().rotate(torch_qkv, HEADS + KV_HEADS, DIM, cos, sin, positions)
    KernelOps().rotate(kernel_qkv, HEADS + KV_HEADS, DIM, cos, sin, positions)
    torch.testing.assert_close(kernel_qkv.float(), torch_qkv.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    values = slice((HEADS + KV_HEADS) * DIM, None)
    assert torch.equal(kernel_qkv[:, values], qkv[:, values])  # values are not rotated


def test_kernels_refuse_what_would_read_outside_the_cache() -> None:
    cache = _cache(torch.float32)
    q, k, v = torch.zeros(1, HEADS, DIM), torch.zeros(1, KV_HEADS, DIM), torch.zeros(1, KV_HEADS, DIM)
    kernels = torch.ops.adapter_service
    with pytest.raises(RuntimeError, match="slot outside"):
        kernels.slot_attention(q, k, v, cache.keys[0], cache.values[0], torch.tensor([8]), torch.tensor([0]), 1.0)
    with pytest.raises(RuntimeError, match="position outside"):
        kernels.slot_attention(q, k, v, cache.keys[0], cache.values[0], torch.tensor([0]), torch.tensor([256]), 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernels.slot_attention(q.double(), k, v, cache.keys[0], cache.values[0], torch.tensor([0]),
                               torch.tensor([0]), 1.0)
    with pytest.raises(RuntimeError, match="rotary table"):
        kernels.rotary_(torch.zeros(1, HEADS * DIM), HEADS, DIM, torch.zeros(4, DIM), torch.zeros(4, DIM),
                        torch.tensor([4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 16, 5, 72])  # 72: past the kernel's on-stack buffer
@pytest.mark.parametrize("width_in,width_out", [(40, 24), (100, 90)])  # 90: 64 columns at once, then 16, then 10
def test_lora_kernel_adds_each_tokens_own_adapter_delta(dtype: torch.dtype, rank: int, width_in: int,
                                                         width_out: int) -> None:
    """Per token, out += B[slot] A[slot] x from the pool's stacks (B kept transposed), over the slot's own rank
    only; tokens without an adapter (-1) or of a slot of rank 0 are untouched, and a strided view (one module's
    slice of a fused output) is written in place."""
    generator = torch.Generator().manual_seed(3)
    pool = 5
    a = torch.randn(pool, rank, width_in, generator=generator).to(dtype)
    b = torch.randn(pool, width_out, rank, generator=generator).to(dtype)
    b_t = b.transpose(1, 2).contiguous()
    ranks = torch.tensor([rank, rank, rank - 2, rank, 0])  # slot 2 uses fewer rows; slot 4 is empty
    x = torch.randn(7, width_in, generator=generator).to(dtype)
    fused = torch.randn(7, 3 * width_out, generator=generator).to(dtype)
    slots = torch.tensor([1, -1, 3, 1, 2, 4, -1])
    expected = fused.clone()
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            used = ranks[slot]
            delta = b[slot, :, :used].float() @ (a[slot, :used].float() @ x[token].float())
            expected[token, width_out:2 * width_out] = (expected[token, width_out:2 * width_out].float()
                                                         + delta).to(dtype)
    torch.ops.adapter_service.lora_delta_(x, slots, [a], [b_t], [ranks], [width_out], fused)
    torch.testing.assert_close(fused.float(), expected.float(), atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype])
    untouched = [1, 5, 6]
    assert torch.equal(fused[untouched], expected[untouched])
    assert torch.equal(fused[:, :width_out], expected[:, :width_out])
    with pytest.raises(RuntimeError, match="outside the pool"):
        torch.ops.adapter_service.lora_delta_(x, torch.tensor([0, 0, 0, 0, 0, 0, pool]), [a], [b_t], [ranks], [0],
                                              fused)
    with pytest.raises(RuntimeError, match="rank outside"):
        torch.ops.adapter_service.lora_delta_(x, slots, [a], [b_t], [ranks + 1], [0], fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_kernel_adds_every_stack_of_a_fused_output_in_one_call(dtype: torch.dtype) -> None:
    """A layer's stacks in one call (q and v of a fused q/k/v output, of different widths and pool ranks) give each
    stack's columns the bits a call of its own gives them; the columns between stay as they were, and a slot with
    no rows in one stack (an adapter on q only) gets only the other's delta."""
    generator = torch.Generator().manual_seed(6)
    pool, width_in, tokens = 4, 48, 16
    widths, pool_ranks, firsts = (32, 16), (16, 8), (0, 48)
    a = [torch.randn(pool, r, width_in, generator=generator).to(dtype) for r in pool_ranks]
    b_t = [torch.randn(pool, r, w, generator=generator).to(dtype) for r, w in zip(pool_ranks, widths)]
    ranks = [torch.tensor([16, 8, 16, 0]), torch.tensor([8, 0, 4, 8])]
    x = torch.randn(tokens, width_in, generator=generator).to(dtype)
    fused = torch.randn(tokens, 64, generator=generator).to(dtype)
    slots = torch.tensor([0, 1, 2, 3, -1, 1, 0, 2, -1, 0, 0, 0, 0, 1, 1, 2])  # groups of 1, 2, 3 and 4 tokens
    together = fused.clone()
    torch.ops.adapter_service.lora_delta_(x, slots, a, b_t, ranks, list(firsts), together)
    apart = fused.clone()
    for k in range(2):
        torch.ops.adapter_service.lora_delta_(x, slots, [a[k]], [b_t[k]], [ranks[k]], [firsts[k]], apart)
    assert torch.equal(together, apart)
    assert torch.equal(together[:, 32:48], fused[:, 32:48])
    assert torch.equal(together[4], fused[4]) and torch.equal(together[8], fused[8])
    assert torch.equal(together[1, 48:], fused[1, 48:]) and not torch.equal(together[1, :32], fused[1, :32])
    assert torch.equal(together[3, :32], fused[3, :32]) and not torch.equal(together[3, 48:], fused[3, 48:])
    with pytest.raises(RuntimeError, match="columns outside out"):
        torch.ops.adapter_service.lora_delta_(x, slots, a, b_t, ranks, [0, 49], together)
    with pytest.raises(RuntimeError, match="columns overlap"):
        torch.ops.adapter_service.lora_delta_(x, slots, a, b_t, ranks, [0, 24], together)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_kernel_gives_a_token_the_same_bits_alone_or_among_its_adapters_tokens(dtype: torch.dtype) -> None:
    """Tokens of one adapter are computed together (its matrices read once per group); each token's result is
    bit for bit what it gets alone, for groups of every size and interleaved slots."""
    generator = torch.Generator().manual_seed(5)
    pool, rank, width_in, width_out, tokens = 3, 16, 72, 50, 23
    a = torch.randn(pool, rank, width_in, generator=generator).to(dtype)
    b_t = torch.randn(pool, rank, width_out, generator=generator).to(dtype)
    ranks = torch.tensor([16, 8, 16])
    x = torch.randn(tokens, width_in, generator=generator).to(dtype)
    base = torch.randn(tokens, width_out, generator=generator).to(dtype)
    slots = torch.tensor([(token * 7) % pool if token % 5 else 1 for token in range(tokens)])
    together = base.clone()
    torch.ops.adapter_service.lora_delta_(x, slots, [a], [b_t], [ranks], [0], together)
    for token in range(tokens):
        alone = base[token:token + 1].clone()
        torch.ops.adapter_service.lora_delta_(x[token:token + 1], slots[token:token + 1], [a], [b_t], [ranks], [0],
                                              alone)
        assert torch.equal(alone[0], together[token]), token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 37])
def test_logits_as_columns_give_torchs_greedy_tokens(dtype: torch.dtype, rows: int) -> None:
    """The kernel path's transposed logits and column max pick what F.linear + max picks: the first of equal
    maxima, NaN for a row holding one, +inf where it is the largest."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(3000, 24, generator=generator).to(dtype)
    weight[2000] = weight[1000]  # two vocabulary entries with equal logits everywhere
    hidden = torch.randn(rows, 24, generator=generator).to(dtype)
    hidden[0] = weight[1000] * 4  # row 0's maximum is at 1000 and again at 2000
    expected = TorchOps().logits(hidden, weight, None)
    logits = KernelOps().logits(hidden, weight, None)
    assert logits.shape == expected.shape and logits.stride(0) == 1  # columns: top_logits takes the kernel
    top, index = top_logits(logits)
    expected_top, expected_index = expected.max(dim=-1)
    assert index[0] == 1000
    assert torch.equal(index, expected_index)
    # The same products summed by another BLAS kernel (the head as the left operand): on some CPUs (AMD Zen 5) the
    # float32 sums come out in another order, so the maxima agree to float32's rounding rather than bit for bit.
    torch.testing.assert_close(top, expected_top.float(), rtol=1e-6 if dtype == torch.float32 else 0, atol=0)
    broken = logits.clone().t().contiguous().t()  # the same transposed layout
    broken[0, 7] = float("nan")
    broken[rows - 1, 9] = float("inf")
    top, index = top_logits(broken)
    assert torch.isnan(top[0]) and index[0] == 7
    if rows > 1:
        assert top[rows - 1] == float("inf") and index[rows - 1] == 9


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(7, 1, 48), (4, 4, 80), (14, 2, 112), (16, 1, 128)])
def test_attention_kernel_takes_every_head_shape_it_is_chosen_for(heads: int, kv_heads: int, dim: int) -> None:
    """Head sizes that are multiples of 16 up to 128 and up to 16 query heads per kv head (what step_ops picks the
    kernels for) match torch; larger ones are left to torch ops."""
    assert isinstance(step_ops(torch.device("cpu"), dim, kv_heads, heads // kv_heads, torch.float32, True), KernelOps)
    generator = torch.Generator().manual_seed(5)
    outputs = []
    for ops in (TorchOps(), KernelOps()):
        cache = _cache(torch.float32, slots=4, slot_tokens=32, kv_heads=kv_heads, dim=dim)
        generator.manual_seed(5)
        q = torch.randn(3, heads, dim, generator=generator)
        k, v = torch.randn(2, 3, kv_heads, dim, generator=generator)
        batch = StepBatch(torch.empty(3, 1), torch.tensor([3, 20, 31]), torch.tensor([0, 1, 3]), [])
        outputs.append(ops.attention(batch, cache, heads)(0, q, k, v))
    torch.testing.assert_close(outputs[1], outputs[0], atol=2e-5, rtol=2e-5)


def test_shapes_past_the_kernels_get_torch_ops() -> None:
    cpu = torch.device("cpu")
    assert isinstance(step_ops(cpu, 256, 2, 4, torch.float32, True), TorchOps)
    assert isinstance(step_ops(cpu, 64, 1, 32, torch.float32, True), TorchOps)
    assert isinstance(step_ops(cpu, 72, 2, 4, torch.float32, True), TorchOps)
    assert isinstance(step_ops(cpu, 64, 2, 4, torch.float32, False), TorchOps)


def test_long_chunks_go_where_they_were_measured_faster_once_per_shape() -> None:
    """The kernel takes every chunk, or chunks up to the Intel crossover, as timed here; once per head shape."""
    chunk_work_limit.cache_clear()
    limit = chunk_work_limit(64, 3, 3, torch.bfloat16)
    assert limit in (math.inf, 64 * 128)
    assert chunk_work_limit(64, 3, 3, torch.bfloat16) == limit and chunk_work_limit.cache_info().misses == 1
    ops = step_ops(torch.device("cpu"), 64, 3, 3, torch.bfloat16, True)
    assert isinstance(ops, KernelOps) and ops._chunk_work_limit == limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ia3_column_scales_match_torch_and_leave_unadapted_rows_alone(dtype: torch.dtype) -> None:
    """Each token's columns scaled by its pool row, as torch's gathered multiply rounds it; slot 0 (the pool's row
    of ones, no adapter) and the columns outside the span untouched."""
    generator = torch.Generator().manual_seed(8)
    width = 40  # not a multiple of the SIMD width: the tail runs too
    scales = torch.rand(4, width, generator=generator).to(dtype) * 2
    scales[0] = 1.0
    out = torch.randn(5, 96, generator=generator).to(dtype)
    slots = torch.tensor([2, 0, 3, 1, 2])
    expected = out.clone()
    expected[:, 24:24 + width] *= scales.index_select(0, slots)
    actual = out.clone()
    torch.ops.adapter_service.scale_columns_(actual, slots, scales, 24)
    assert torch.equal(actual, expected)
    assert torch.equal(actual[1], out[1]) and torch.equal(actual[:, :24], out[:, :24])
    with pytest.raises(RuntimeError, match="outside the pool"):
        torch.ops.adapter_service.scale_columns_(out.clone(), torch.tensor([0, 0, 4, 0, 0]), scales, 24)
    with pytest.raises(RuntimeError, match="outside out"):
        torch.ops.adapter_service.scale_columns_(out.clone(), slots, scales, 60)
