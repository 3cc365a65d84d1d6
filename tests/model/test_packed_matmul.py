"""The packed bf16 matmul (AMX tiles, or AVX-512 BF16 where the CPU has no AMX) computes x W^T (+ b) to bf16's
rounding for any rows, columns and depth (tails of its 32-wide blocks included), on one thread or a team; bad input
is refused with a message, and CPUs with neither never see it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from service.model.owned.kernels import (
    cpu_kernels_available,
    kernel_threads,
    packed_matmul_available,
    packed_matmul_unit,
    torch_threads,
)
from service.model.owned.matmul import (
    Matmul,
    Packing,
    choose_packing,
    head_logits,
    kernel_head_applies,
    kernel_measures_faster,
)

pytestmark = pytest.mark.skipif(not packed_matmul_available(), reason="this CPU has neither AMX nor AVX-512 BF16")

# Rows, out features, in features: whole blocks, tails of every kind, one row, a depth that is not a multiple of 32.
SHAPES = [(64, 960, 576), (1, 17, 33), (7, 576, 576), (16, 64, 64), (17, 64, 64), (31, 40, 64), (33, 3072, 576),
          (48, 49, 96), (160, 576, 1536), (5, 100, 70),
          # many rows, few columns (a head as head x hidden^T): the threads split the rows
          (1100, 1, 64), (2048, 64, 96), (1031, 100, 576), (1024, 128, 40),
          # past a panel of rows (512), in a tail too
          (1100, 160, 64)]


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.float() @ weight.float().T
    return out + bias.float() if bias is not None else out


def _assert_within_rounding(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    # Sums in float32, rounded once to bf16: within half a bf16 unit of the float32 sum, plus summation order.
    error = (got.float() - expected).abs() / expected.abs().clamp_min(1.0)
    assert error.max().item() <= 2 ** -8 + 1e-4


@pytest.mark.parametrize("rows,out_features,in_features", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_the_float32_product(rows: int, out_features: int, in_features: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=generator).to(torch.bfloat16) if with_bias else None
    ops = torch.ops.adapter_service
    got = ops.bf16_linear(x, ops.bf16_pack(weight), out_features, bias)
    _assert_within_rounding(got, _reference(x, weight, bias))


@pytest.mark.parametrize("rows", [1, 17, 64, 600])
@pytest.mark.parametrize("width,in_features", [(64, 40), (1536, 576), (96, 1536)])
def test_gate_up_with_silu_mul_gives_the_unfused_bits(rows: int, width: int, in_features: int) -> None:
    """One kernel for a fused gate/up matmul and SiLU(gate) * up: bit for bit bf16_linear then silu_mul, in one
    panel of rows and past it, with a K that is not a multiple of 32 too."""
    generator = torch.Generator().manual_seed(rows + width)
    weight = (torch.randn(2 * width, in_features, generator=generator) * 0.1).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    ops = torch.ops.adapter_service
    packed = ops.bf16_pack(weight)
    unfused = ops.silu_mul(ops.bf16_linear(x, packed, 2 * width, None))
    fused = ops.bf16_linear_silu_mul(x, packed, width)
    assert torch.equal(fused, unfused)
    silu = torch.nn.functional.silu
    expected = silu(_reference(x, weight[:width], None)) * _reference(x, weight[width:], None)
    assert (fused.float() - expected).abs().max().item() <= 0.05 * expected.abs().max().item()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.bf16_linear_silu_mul(x, ops.bf16_pack(weight[:80]), 40)


# Column blocks split among threads, rows split (many rows, few columns), row panels (past 512 rows).
@pytest.mark.parametrize("rows,out_features,in_features", [(40, 3072, 576), (2048, 64, 96), (1100, 160, 64)])
def test_one_thread_and_a_team_agree(rows: int, out_features: int, in_features: int) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    packed = torch.ops.adapter_service.bf16_pack(weight)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.ops.adapter_service.bf16_linear(x, packed, out_features, None)
        torch.set_num_threads(max(2, threads))
        together = torch.ops.adapter_service.bf16_linear(x, packed, out_features, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, together)  # each output block is one thread's, summed in the same order


def test_threads_calling_at_once_each_get_their_own_product() -> None:
    """The kernels' team (inside kernel_threads) runs one caller's loop at a time; a second caller meanwhile runs
    its loop itself."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(3072, 576, generator=generator).to(torch.bfloat16)
    inputs = [torch.randn(64, 576, generator=generator).to(torch.bfloat16) for _ in range(4)]
    packed = torch.ops.adapter_service.bf16_pack(weight)
    expected = [torch.ops.adapter_service.bf16_linear(x, packed, 3072, None) for x in inputs]
    results: dict[int, list[bool]] = {}

    default = torch.get_num_threads()

    def call(index: int) -> None:
        torch.set_num_threads(2)
        try:
            with kernel_threads():
                results[index] = [torch.equal(torch.ops.adapter_service.bf16_linear(inputs[index], packed, 3072, None),
                                              expected[index]) for _ in range(50)]
        finally:
            torch.set_num_threads(default)  # torch seeds threads started later from the last count set

    threads = [threading.Thread(target=call, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(all(same) for same in results.values()) and len(results) == 4


def test_kernel_threads_hand_the_count_to_the_team_and_give_it_back() -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(960, 576, generator=generator).to(torch.bfloat16)
    x = torch.randn(40, 576, generator=generator).to(torch.bfloat16)
    packed = torch.ops.adapter_service.bf16_pack(weight)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        outside = torch.ops.adapter_service.bf16_linear(x, packed, 960, None)
        with kernel_threads():
            assert torch.get_num_threads() == 1  # torch's own ops: one thread
            inside = torch.ops.adapter_service.bf16_linear(x, packed, 960, None)
            with pytest.raises(RuntimeError, match="packed weight"):  # a refusal inside leaves the count as it was
                torch.ops.adapter_service.bf16_linear(x, packed, 961, None)
            with torch_threads():  # torch's ops get the count back for a while
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
            with kernel_threads():  # nested: leaving the inner one keeps the outer's hand-over
                pass
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with torch_threads():  # outside kernel_threads: nothing changes
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(inside, outside)


def test_strided_and_empty_inputs() -> None:
    weight = torch.randn(96, 64).to(torch.bfloat16)
    packed = torch.ops.adapter_service.bf16_pack(weight)
    every_other = torch.randn(10, 128).to(torch.bfloat16)[:, ::2]
    first_half = torch.randn(10, 128).to(torch.bfloat16)[:, :64]
    for x in (every_other, first_half):
        _assert_within_rounding(torch.ops.adapter_service.bf16_linear(x, packed, 96, None), _reference(x, weight, None))
    assert torch.ops.adapter_service.bf16_linear(torch.empty(0, 64, dtype=torch.bfloat16), packed, 96,
                                                None).shape == (0, 96)


def test_bad_input_is_refused() -> None:
    weight = torch.randn(96, 64).to(torch.bfloat16)
    packed = torch.ops.adapter_service.bf16_pack(weight)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.adapter_service.bf16_linear(torch.randn(4, 64), packed, 96, None)
    with pytest.raises(RuntimeError, match="packed weight"):
        torch.ops.adapter_service.bf16_linear(torch.randn(4, 64).to(torch.bfloat16), packed, 200, None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.adapter_service.bf16_linear(torch.randn(4, 64).to(torch.bfloat16), packed, 96,
                                             torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.adapter_service.bf16_pack(torch.randn(96, 64))
    matmul = Matmul(weight, None, Packing.KERNEL)
    with pytest.raises(ValueError, match="input of 32 features"):
        matmul(torch.randn(4, 32).to(torch.bfloat16))


def test_packing_is_chosen_by_what_the_machine_has() -> None:
    cpu = torch.device("cpu")
    assert choose_packing(torch.bfloat16, cpu, allow_kernel=True, kernel_is_faster=lambda: True) is Packing.KERNEL
    # a CPU where oneDNN measured clearly faster keeps oneDNN
    assert choose_packing(torch.bfloat16, cpu, allow_kernel=True, kernel_is_faster=lambda: False) is Packing.ONEDNN
    assert choose_packing(torch.bfloat16, cpu, allow_kernel=False) is Packing.ONEDNN
    assert choose_packing(torch.float32, cpu, allow_kernel=True) is Packing.DENSE  # fp32 keeps the plain weights
    assert cpu_kernels_available()


def test_the_kernel_is_timed_against_onednn_once(caplog: pytest.LogCaptureFixture) -> None:
    kernel_measures_faster.cache_clear()
    with caplog.at_level("INFO", logger="service.model.owned.matmul"):
        first = kernel_measures_faster()
        assert kernel_measures_faster() is first  # once per process
    assert [record.getMessage() for record in caplog.records if "oneDNN takes" in record.getMessage()]
    choice = choose_packing(torch.bfloat16, torch.device("cpu"), allow_kernel=True)
    assert choice is (Packing.KERNEL if first else Packing.ONEDNN)


def test_the_unit_is_what_the_cpu_has() -> None:
    """AMX where the CPU lists it (and Linux lets the process use it), else AVX-512 BF16: never a unit the flags
    do not show."""
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split())
    unit = packed_matmul_unit()
    assert unit in ("amx", "avx512_bf16")
    assert "avx512_bf16" in flags and {"avx512f", "avx512bw"} <= flags
    if unit == "amx":
        assert {"amx_bf16", "amx_tile"} <= flags
    elif {"amx_bf16", "amx_tile"} <= flags:
        pytest.skip("AMX listed but not allowed to this process: AVX-512 BF16 runs instead")


def test_the_matmul_keeps_leading_dimensions() -> None:
    weight = torch.randn(48, 64).to(torch.bfloat16)
    bias = torch.randn(48).to(torch.bfloat16)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    got = Matmul(weight, bias, Packing.KERNEL)(x)
    assert got.shape == (2, 3, 48)
    _assert_within_rounding(got.reshape(6, 48), _reference(x.reshape(6, 64), weight, bias))


def test_the_head_reads_its_dense_weight_as_the_left_operand() -> None:
    generator = torch.Generator().manual_seed(7)
    head = torch.randn(3000, 64, generator=generator).to(torch.bfloat16)
    assert kernel_head_applies(head, None, Packing.KERNEL)
    assert not kernel_head_applies(head, torch.zeros(3000), Packing.KERNEL)  # a head with a bias keeps torch's matmul
    assert not kernel_head_applies(head[:, :40].contiguous(), None, Packing.KERNEL)  # K not whole 32-value steps
    assert not kernel_head_applies(head[::2], None, Packing.KERNEL)  # not contiguous
    assert not kernel_head_applies(head, None, Packing.ONEDNN)
    for rows in (1, 16, 33, 64, 129, 300):  # past 128 rows: in groups of 128, the same numbers as one call each
        hidden = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
        logits = head_logits(hidden, head)
        assert logits.shape == (rows, 3000)
        _assert_within_rounding(logits, _reference(hidden, head, None))
        if rows > 128:
            assert torch.equal(logits[128:129], head_logits(hidden[128:129], head))
