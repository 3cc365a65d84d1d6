"""The owned forward's weight matrices: fused from the HF model's linears, held once, prepacked where that is faster.

q/k/v (and gate/up) are concatenated into one matrix so a step runs one matmul for them. The HF modules stay
usable for the transformers path (classification, PEFT-hosted LoRA) without a second copy of the weights:

- dense (float32, GPUs): each HF module's weight becomes a view of its rows of the fused matrix;
- prepacked (bfloat16 on a CPU): the fused matrix is reordered once into a blocked layout, the dense weights are
  freed, and each HF module computes through the packed matrix: the first module of a group called on an input
  runs the fused matmul, the others take their slice of that output. Their ``weight`` is then a zero-strided
  placeholder with the right shape, dtype and device (PEFT and the adapter pools read only those). The layout is
  the service's packed kernel's (``csrc/packed_linear.cpp``, on AMX tiles or AVX-512 BF16) where the CPU has
  either, else oneDNN's (a plain bf16 matmul reorders the weight on every call; oneDNN-packed, the step's matmuls
  ran 1.2-1.7x faster here, with bit-identical results).
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from service.model.owned.kernels import packed_matmul_available, packed_matmul_unit

logger = logging.getLogger(__name__)

_BATCH_HINT = 64  # rows oneDNN tunes the packed layout for (a decode step's order of magnitude)


class Packing(enum.Enum):
    DENSE = "dense"  # the weights as they are (float32, GPUs)
    ONEDNN = "oneDNN"  # oneDNN's blocked layout
    KERNEL = "kernel"  # the service's packed kernel's layout (AMX tiles or AVX-512 BF16)


def choose_packing(dtype: torch.dtype, device: torch.device, allow_kernel: bool,
                   kernel_is_faster: Callable[[], bool] | None = None) -> Packing:
    """The fastest layout available for weights of this dtype on this device: the service's kernel where the CPU
    runs it (AMX or AVX-512 BF16) unless oneDNN measures clearly faster here (``kernel_is_faster``, by default
    timed once per process), else oneDNN's."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return Packing.DENSE
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    if allow_kernel and packed_matmul_available():
        if not onednn or (kernel_is_faster or kernel_measures_faster)():
            return Packing.KERNEL
    return Packing.ONEDNN if onednn else Packing.DENSE


@functools.cache
def kernel_measures_faster() -> bool:
    """Whether the service's packed kernel runs a decode step's matmuls at least about as fast as oneDNN's packed
    ones on this CPU. It was measured faster on the CPUs this was built on (Intel AMX; AMD Zen 5 with AVX-512 BF16:
    1.2-1.4x at 16-64 rows), but CPUs with the same instructions differ (a Zen 4 runs 512-bit vectors in two
    halves), so it is timed here, as a step meets its weights: a layer's gate/up shape, 16 and 64 rows, over
    copies that together outgrow the caches (~40 MB, one layout's at a time, freed after). Rounds alternate the two
    (a pass right after packing, which finds some copies cached, is not counted), each keeps its fastest, and the
    kernel stays unless oneDNN takes under 0.9 of its time (well under a second at start)."""
    if not packed_matmul_available():
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3072, 576, generator=generator).to(torch.bfloat16)
    inputs = [torch.randn(rows, 576, generator=generator).to(torch.bfloat16) for rows in (16, 64)]
    copies = 12  # 3.5 MB each: more than the last-level caches of the machines this runs on
    timings = dict.fromkeys((Packing.KERNEL, Packing.ONEDNN), float("inf"))
    with torch.inference_mode():
        for _ in range(2):
            for packing in timings:
                matmuls = [Matmul(weight, None, packing) for _ in range(copies)]
                for counted in (False, True, True):
                    started = time.perf_counter()
                    for x in inputs:
                        for matmul in matmuls:
                            matmul(x)
                    if counted:
                        timings[packing] = min(timings[packing], time.perf_counter() - started)
                del matmuls
    ratio = timings[Packing.ONEDNN] / timings[Packing.KERNEL]
    logger.info("bf16 matmul: oneDNN takes %.2fx the service kernel's time (%s) here; using %s", ratio,
                packed_matmul_unit(), "oneDNN" if ratio < 0.9 else "the kernel")
    return ratio >= 0.9


class Matmul:
    """x @ W^T (+ b) for x [..., in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packing: Packing) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packing = packing
        if packing is Packing.KERNEL:
            self.weight = torch.ops.adapter_service.bf16_pack(weight)
            # the kernel adds the bias in float32: converted once here, not on every call (same values)
            self.bias = bias.float() if bias is not None else None
        elif packing is Packing.ONEDNN:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT)
        else:
            self.weight = weight

    @property
    def packed(self) -> bool:
        return self.packing is not Packing.DENSE

    @property
    def fuses_silu_mul(self) -> bool:
        """Whether ``silu_mul`` runs in one kernel (the kernel's packing, no bias, halves of whole 32-column blocks)."""
        return self.packing is Packing.KERNEL and self.bias is None and self.out_features % 64 == 0

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU of the first half of x @ W^T times its second half (a fused gate/up), [..., out / 2]: the same bits
        as ``self(x)`` then the kernels' ``silu_mul``, without writing the product and reading it back."""
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.adapter_service.bf16_linear_silu_mul(flat, self.weight, self.out_features // 2)
        return out.view(*x.shape[:-1], self.out_features // 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packing is Packing.DENSE:
            return F.linear(x, self.weight, self.bias)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input of {x.shape[-1]} features to a matmul of {self.in_features}")
        flat = x.reshape(-1, self.in_features)
        if self.packing is Packing.KERNEL:
            out = torch.ops.adapter_service.bf16_linear(flat, self.weight, self.out_features, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


_HEAD_MAX_ROWS = 128  # rows the packed kernel takes in one call against a transposed head (its vocabulary split)


def kernel_head_applies(weight: torch.Tensor, bias: torch.Tensor | None, packing: Packing) -> bool:
    """Whether ``head_logits`` can run this head: the kernel's packing, a dense bf16 weight of whole 32-value K
    steps."""
    return (packing is Packing.KERNEL and bias is None and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.is_contiguous() and weight.shape[1] % 32 == 0)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [rows, in] x weight [vocabulary, in]^T as a [rows, vocabulary] view of a [vocabulary, rows] result.

    The head (often the tied embedding, which must stay dense for lookups) is the packed kernel's left operand, read
    as it lies; the few rows of ``hidden`` are packed per call as its right one. A packed copy of the head would
    cost its size again. Measured against oneDNN's ``weight @ hidden.T`` on SmolLM2's head, cold: with AMX 1 row
    5.2 -> 2.9 ms, 16 rows 2.8 -> 2.5, 32 rows 6.1 -> 2.9, 64 rows even; with AVX-512 BF16 (AMD Zen 5) 1 row 1.9 ->
    2.3 ms, 16 rows 4.3 -> 2.3, 64 rows 5.4 -> 4.3. More rows than ``_HEAD_MAX_ROWS`` go in groups of that many,
    so the head stays in the kernels (a step then opens no OpenMP team: ``kernels.kernel_threads``)."""
    ops = torch.ops.adapter_service
    parts = [ops.bf16_linear(weight, ops.bf16_pack(group.contiguous()), group.shape[0], None)
             for group in hidden.split(_HEAD_MAX_ROWS)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).t()


class _SharedOutput:
    """The fused output for the input last seen, so each module of the group runs the matmul once per input."""

    def __init__(self, matmul: Matmul) -> None:
        self.matmul = matmul
        self._input: torch.Tensor | None = None  # held, so its identity cannot be reused while cached
        self._output: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input:
            self._input, self._output = x, self.matmul(x)
        assert self._output is not None
        return self._output


def fuse(modules: Sequence[torch.nn.Linear], packing: Packing) -> Matmul:
    """One matmul for linears over the same input, the modules computing through it (see the module docstring)."""
    weight = torch.cat([m.weight.detach() for m in modules])
    biases = [m.bias for m in modules]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        raise ValueError("some of the fused linears have a bias and some do not")
    matmul = Matmul(weight, bias, packing)
    shared = _SharedOutput(matmul)
    row = 0
    for module in modules:
        rows = slice(row, row + module.out_features)
        if matmul.packed:
            module.weight = torch.nn.Parameter(
                torch.zeros((), dtype=weight.dtype, device=weight.device).expand(module.out_features,
                                                                                 module.in_features),
                requires_grad=False)
            module.forward = _slice_of(shared, rows, len(modules) == 1)
        else:
            module.weight = torch.nn.Parameter(weight[rows], requires_grad=False)
            if bias is not None:
                module.bias = torch.nn.Parameter(bias[rows], requires_grad=False)
        row += module.out_features
    return matmul


def _slice_of(shared: _SharedOutput, rows: slice, whole: bool):
    if whole:
        return shared.matmul

    def forward(x: torch.Tensor) -> torch.Tensor:
        return shared(x)[..., rows]

    return forward
