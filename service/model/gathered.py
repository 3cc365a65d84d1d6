"""Per-row LoRA for a batch of many adapters: stacked weights, one index per row, two batched matmuls per module.

PEFT's mixed-batch path loops over the adapters present in every layer (a sub-batch, two matmuls and an
index_add each), which costs more the more adapters share a batch. Here the batch's adapters are stacked once
per distinct set (the idea of Punica's SGMV/BGMV, in plain torch): each adapted module gathers its rows' A and B
and adds ``x @ A^T @ B^T * scaling`` to the frozen layer's output while PEFT's own LoRA layers stay switched off.
PEFT still reads, checks and holds the adapters; this only changes how a mixed batch is computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear


class GatheredLora:
    """Computes a mixed batch's LoRA deltas from stacked weights; ``supports`` says when PEFT must do it instead."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._stacks: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._supported: dict[str, bool] = {}

    def supports(self, peft_model: PeftModel, names: Sequence[str]) -> bool:
        """Whether every named adapter can take this path (remembered per adapter: names are never reused)."""
        for name in names:
            if name not in self._supported:
                self._supported[name] = _plain_lora(peft_model, name)
        return all(self._supported[name] for name in names)

    def _build(self, peft_model: PeftModel, names: tuple[str, ...]) -> None:
        """Stack, per adapted module, every batch adapter's A and scaled B; slot 0 is 'no adapter' (zeros)."""
        stacks = []
        for module, present in _lora_modules(peft_model, names):
            rank = max(module.r[name] for name in present)
            weight = module.base_layer.weight
            a_stack = weight.new_zeros((len(names) + 1, rank, module.in_features))
            b_stack = weight.new_zeros((len(names) + 1, module.out_features, rank))
            slots = torch.zeros(len(names), dtype=torch.long)
            for slot, name in enumerate(names, start=1):
                if name in present:
                    r = module.r[name]
                    a_stack[slot, :r] = module.lora_A[name].weight
                    b_stack[slot, :, :r] = module.lora_B[name].weight * module.scaling[name]
                    slots[slot - 1] = slot
            stacks.append((module, a_stack, b_stack, slots.to(weight.device)))
        self._key, self._stacks = names, stacks

    @contextmanager
    def route(self, peft_model: PeftModel, row_names: Sequence[str | None]) -> Iterator[None]:
        """Within this context, a forward pass adds each row's own LoRA delta (rows named None get none)."""
        names = tuple(sorted({n for n in row_names if n is not None}))
        if names != self._key:
            self._build(peft_model, names)
        position = {name: index for index, name in enumerate(names)}
        device = self._stacks[0][1].device if self._stacks else torch.device("cpu")
        rows = torch.tensor([position[n] if n is not None else -1 for n in row_names], device=device)
        handles = []
        for module, a_stack, b_stack, slots in self._stacks:
            # Map each row to its module slot: rows whose adapter skips this module (or have none) get slot 0.
            row_slots = torch.where(rows >= 0, slots[rows.clamp(min=0)], torch.zeros_like(rows))
            handles.append(module.register_forward_hook(_adder(a_stack[row_slots], b_stack[row_slots])))
        try:
            yield  # PEFT's own LoRA layers are kept switched off (LoraHost), so only these deltas apply
        finally:
            for handle in handles:
                handle.remove()


def _plain_lora(peft_model: PeftModel, name: str) -> bool:
    """Plain LoRA on linear layers only: no DoRA, LoRA bias, fan-in-fan-out or extra modules_to_save."""
    config = peft_model.peft_config[name]
    if config.use_dora or getattr(config, "lora_bias", False) or config.fan_in_fan_out:
        return False
    if config.modules_to_save or getattr(config, "trainable_token_indices", None):
        return False
    return all(
        isinstance(module, LoraLinear) and isinstance(module.base_layer, torch.nn.Linear)
        for module, _ in _lora_modules(peft_model, [name])
    )


def _adder(a_rows: torch.Tensor, b_rows: torch.Tensor):
    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0].to(a_rows.dtype)
        delta = torch.bmm(torch.bmm(x, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))
        return output + delta.to(output.dtype)

    return hook


def _lora_modules(peft_model: PeftModel, names: Sequence[str]) -> Iterator[tuple[torch.nn.Module, list[str]]]:
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            present = [name for name in names if name in module.lora_A]
            if present:
                yield module, present
