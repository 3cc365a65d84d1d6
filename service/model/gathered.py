"""Per-row LoRA for a batch of many adapters: a resident pool of stacked weights, one slot index per row.

PEFT's mixed-batch path loops over the adapters present in every layer (a sub-batch, two matmuls and an
index_add each), which costs more the more adapters share a batch. Here every resident plain-LoRA adapter owns a
slot in per-module stacks of A and scaled B, written once when it loads (the idea of S-LoRA's unified pool and
Punica's SGMV/BGMV, in plain torch). A forward pass gathers each row's slot and adds ``x @ A^T @ B^T`` to the
frozen layer's output through a hook installed once per module, while PEFT's own LoRA layers stay switched off.
PEFT still reads, checks and holds the adapters; this only changes how their deltas are computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear

NO_ADAPTER = 0  # slot 0 is all zeros: rows without LoRA, or whose adapter skips a module


class _ModuleStack:
    """One adapted module's stacks: A [slots, rank, in] and scaled B [slots, out, rank], zero where unused."""

    def __init__(self, module: LoraLinear, capacity: int) -> None:
        weight = module.base_layer.weight
        self.rank = 0
        self.a = weight.new_zeros((capacity, 0, module.in_features))
        self.b = weight.new_zeros((capacity, module.out_features, 0))
        self.rows: torch.Tensor | None = None  # the slot of each row of the batch being computed, if any

    def ensure(self, capacity: int, rank: int) -> None:
        if capacity <= self.a.shape[0] and rank <= self.rank:
            return
        capacity, rank = max(capacity, self.a.shape[0]), max(rank, self.rank)
        a = self.a.new_zeros((capacity, rank, self.a.shape[2]))
        b = self.b.new_zeros((capacity, self.b.shape[1], rank))
        a[: self.a.shape[0], : self.rank] = self.a
        b[: self.b.shape[0], :, : self.rank] = self.b
        self.a, self.b, self.rank = a, b, rank

    def hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return output
        x = inputs[0].to(self.a.dtype)
        a_rows, b_rows = self.a.index_select(0, self.rows), self.b.index_select(0, self.rows)
        delta = torch.bmm(torch.bmm(x, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))
        return output + delta.to(output.dtype)


class GatheredLora:
    """The resident pool of plain LoRA adapters, and the routing of a mixed batch through it."""

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self._capacity = 8
        self._stacks: dict[int, _ModuleStack] = {}  # by id of the LoRA module
        self._modules: dict[int, LoraLinear] = {}
        self._hooks: list = []

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def add(self, peft_model: PeftModel, name: str) -> bool:
        """Give a freshly loaded adapter a slot; False (and nothing kept) when it is not plain LoRA on linears."""
        if not _plain_lora(peft_model, name):
            return False
        slot = self._free.pop() if self._free else len(self._slots) + 1
        if slot >= self._capacity:
            self._capacity *= 2
            for stack in self._stacks.values():  # every module must have a row for every slot
                stack.ensure(self._capacity, 0)
        for module, _ in _lora_modules(peft_model, [name]):
            stack = self._stacks.get(id(module))
            if stack is None:
                stack = self._stacks[id(module)] = _ModuleStack(module, self._capacity)
                self._modules[id(module)] = module
                self._hooks.append(module.register_forward_hook(stack.hook))
            r = module.r[name]
            stack.ensure(self._capacity, r)
            with torch.no_grad():
                stack.a[slot].zero_()
                stack.b[slot].zero_()
                stack.a[slot, :r] = module.lora_A[name].weight
                stack.b[slot, :, :r] = module.lora_B[name].weight * module.scaling[name]
        self._slots[name] = slot
        return True

    def remove(self, name: str) -> None:
        slot = self._slots.pop(name, None)
        if slot is None:
            return
        for stack in self._stacks.values():
            stack.a[slot].zero_()
            stack.b[slot].zero_()
        self._free.append(slot)

    def supports(self, names: Sequence[str]) -> bool:
        return all(name in self._slots for name in names)

    @contextmanager
    def route(self, row_names: Sequence[str | None]) -> Iterator[None]:
        """Within this context, a forward pass adds each row's own LoRA delta (rows named None get none)."""
        if not self._stacks:
            yield
            return
        device = next(iter(self._stacks.values())).a.device
        rows = torch.tensor([NO_ADAPTER if n is None else self._slots[n] for n in row_names], device=device)
        for stack in self._stacks.values():
            stack.rows = rows
        try:
            yield  # PEFT's own LoRA layers are kept switched off (LoraHost), so only these deltas apply
        finally:
            for stack in self._stacks.values():
                stack.rows = None


def _plain_lora(peft_model: PeftModel, name: str) -> bool:
    """Plain LoRA on linear layers only: no DoRA, LoRA bias, fan-in-fan-out or extra modules_to_save."""
    config = peft_model.peft_config[name]
    if config.use_dora or getattr(config, "lora_bias", False) or config.fan_in_fan_out:
        return False
    if config.modules_to_save or getattr(config, "trainable_token_indices", None):
        return False
    modules = list(_lora_modules(peft_model, [name]))
    return bool(modules) and all(
        isinstance(module, LoraLinear) and isinstance(module.base_layer, torch.nn.Linear) for module, _ in modules
    )


def _lora_modules(peft_model: PeftModel, names: Sequence[str]) -> Iterator[tuple[torch.nn.Module, list[str]]]:
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            present = [name for name in names if name in module.lora_A]
            if present:
                yield module, present
