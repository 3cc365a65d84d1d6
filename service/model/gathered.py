"""Per-row LoRA for a batch of many adapters: a resident pool of stacked weights, one slot index per row.

PEFT's mixed-batch path loops over the adapters present in every layer (a sub-batch, two matmuls and an
index_add each), which costs more the more adapters share a batch. Here every resident plain-LoRA adapter owns a
slot in per-module stacks of A and scaled B, written once when it loads (the idea of S-LoRA's unified pool and
Punica's SGMV/BGMV, in plain torch). A forward pass gathers each row's slot and adds ``x @ A^T @ B^T`` to the
frozen layer's output through a hook installed once per module, while PEFT's own LoRA layers stay switched off.
PEFT still reads, checks and holds the adapters; this only changes how their deltas are computed.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear

from service.model.slots import Slots


class ModuleStack:
    """One adapted module's stacks: A [slots, rank, in] and scaled B transposed [slots, rank, out], zero where unused
    (B^T so a row's delta is a sum of whole rows of it: what the LoRA kernel and the batched matmuls both read)."""

    def __init__(self, layer: torch.nn.Linear, capacity: int) -> None:
        weight = layer.weight
        self.rank = 0
        self.a = weight.new_zeros((capacity, 0, layer.in_features))
        self.b_t = weight.new_zeros((capacity, 0, layer.out_features))
        self.ranks = torch.zeros(capacity, dtype=torch.long, device=weight.device)  # each slot's own rank (0: none)
        self.rows: torch.Tensor | None = None  # the slot of each row of the batch being computed, if any
        # The rows' A^T and B^T gathered for the current routing; kept across decode steps while the rows and the
        # pool stay the same, since the gather copies more bytes than the two small matmuls read.
        self.gathered: tuple[torch.Tensor, torch.Tensor] | None = None
        self.gathered_for: Hashable | None = None

    def ensure(self, capacity: int, rank: int) -> None:
        if capacity <= self.a.shape[0] and rank <= self.rank:
            return
        capacity, rank = max(capacity, self.a.shape[0]), max(rank, self.rank)
        a = self.a.new_zeros((capacity, rank, self.a.shape[2]))
        b_t = self.b_t.new_zeros((capacity, rank, self.b_t.shape[2]))
        a[: self.a.shape[0], : self.rank] = self.a
        b_t[: self.b_t.shape[0], : self.rank] = self.b_t
        ranks = self.ranks.new_zeros(capacity)
        ranks[: self.ranks.shape[0]] = self.ranks
        self.a, self.b_t, self.ranks, self.rank = a, b_t, ranks, rank

    def hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return output
        return output + self.rows_delta(inputs[0]).to(output.dtype)

    def rows_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Each routed row's delta: x [rows, tokens, in], or [rows, in] for one token per row."""
        assert self.rows is not None
        if self.gathered is None:
            self.gathered = (self.a.index_select(0, self.rows).transpose(1, 2),
                             self.b_t.index_select(0, self.rows))
        a_rows, b_rows = self.gathered
        x = x.to(self.a.dtype)
        flat = x.dim() == 2
        delta = torch.bmm(torch.bmm(x.unsqueeze(1) if flat else x, a_rows), b_rows)
        return delta.squeeze(1) if flat else delta

    def slot_delta(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """One adapter's delta for x [tokens, in] (a prompt chunk of one row)."""
        return (x.to(self.a.dtype) @ self.a[slot].T) @ self.b_t[slot]

    def begin(self, rows: torch.Tensor, key: Hashable | None) -> None:
        if key is None or key != self.gathered_for:
            self.gathered = None
        self.rows, self.gathered_for = rows, key

    def end(self, keep: bool) -> None:
        self.rows = None
        if not keep:
            self.gathered = self.gathered_for = None


class GatheredLora:
    """The resident pool of plain LoRA adapters, and the routing of a mixed batch through it."""

    def __init__(self) -> None:
        self._slots = Slots()
        self._stacks: dict[int, ModuleStack] = {}  # by id of the base layer
        self._modules: dict[int, torch.nn.Linear] = {}
        self._hooks: list = []
        self._version = 0  # bumped whenever a slot's weights change, so rows gathered earlier are never reused
        self._layout = 0  # see layout
        self._layers_of: dict[str, set[int]] = {}  # adapter -> ids of the base layers it adapts

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def add(self, peft_model: PeftModel, name: str) -> bool:
        """Give a freshly loaded PEFT LoRA adapter a slot; False (and nothing kept) when it is not plain LoRA on
        linears."""
        if not _plain_lora(peft_model, name):
            return False
        entries = [
            (module.base_layer, module.lora_A[name].weight, module.lora_B[name].weight * module.scaling[name])
            for module, _ in _lora_modules(peft_model, [name])
        ]
        self.add_entries(name, entries)
        return True

    def add_entries(self, name: str, entries: Sequence[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]]) -> None:
        """Give an adapter a slot holding, per linear layer, its A [r, in] and its scaled B [out, r]."""
        self._slots.claim(name, self._grow, lambda slot: self._write(slot, entries), self._clear)
        self._layers_of[name] = {id(layer) for layer, _, _ in entries}
        self._version += 1

    def _grow(self, capacity: int) -> None:
        self._layout += 1
        for stack in self._stacks.values():  # every module must have a row for every slot
            stack.ensure(capacity, 0)

    def _write(self, slot: int, entries: Sequence[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]]) -> None:
        for layer, a, b in entries:
            # Hooks sit on the frozen base layers (inside PEFT's wrappers), so they stay put when a LoRA host
            # wraps a layer later.
            stack = self._stacks.get(id(layer))
            if stack is None:
                stack = self._stacks[id(layer)] = ModuleStack(layer, self._slots.capacity)
                self._modules[id(layer)] = layer
                self._hooks.append(layer.register_forward_hook(stack.hook))
                self._layout += 1
            r = a.shape[0]
            held = stack.a
            stack.ensure(self._slots.capacity, r)
            if stack.a is not held:
                self._layout += 1
            with torch.no_grad():
                stack.a[slot].zero_()
                stack.b_t[slot].zero_()
                stack.a[slot, :r] = a
                stack.b_t[slot, :r] = b.T
                stack.ranks[slot] = r

    def _clear(self, slot: int) -> None:
        for stack in self._stacks.values():
            if slot < stack.a.shape[0]:
                stack.a[slot].zero_()
                stack.b_t[slot].zero_()
                stack.ranks[slot] = 0

    def remove(self, name: str) -> None:
        self._layers_of.pop(name, None)
        if self._slots.release(name, self._clear) is not None:
            self._version += 1

    @property
    def version(self) -> int:
        return self._version

    @property
    def layout(self) -> int:
        """Bumped whenever a stack's tensors are replaced or a stack is added (a new module, a larger rank, more
        slots), not when a slot is written in place: a captured CUDA graph reads the tensors it saw."""
        return self._layout

    def layers_of(self, name: str) -> set[int]:
        """Ids of the base layers an adapter in the pool adapts."""
        return self._layers_of.get(name, set())

    def stack(self, layer: torch.nn.Module) -> ModuleStack | None:
        return self._stacks.get(id(layer))

    def slots(self, names: Sequence[str | None]) -> list[int]:
        return self._slots.rows(names)

    def supports(self, names: Sequence[str]) -> bool:
        return all(name in self._slots for name in names)

    @contextmanager
    def route(self, row_names: Sequence[str | None], repeated: bool = False) -> Iterator[None]:
        """Within this context, a forward pass adds each row's own LoRA delta (rows named None get none).

        ``repeated`` says the same rows will come again (decode steps): their gathered weights are then kept for
        the next routing of the same rows instead of being freed.
        """
        if not self._stacks:
            yield
            return
        device = next(iter(self._stacks.values())).a.device
        slots = self._slots.rows(row_names)
        rows = torch.tensor(slots, device=device)
        key = (tuple(slots), self._version) if repeated else None
        for stack in self._stacks.values():
            stack.begin(rows, key)
        try:
            yield  # PEFT's own LoRA layers are kept switched off (LoraHost), so only these deltas apply
        finally:
            for stack in self._stacks.values():
                stack.end(keep=repeated)


def _plain_lora(peft_model: PeftModel, name: str) -> bool:
    """Plain LoRA on linear layers only: no DoRA, LoRA bias, fan-in-fan-out or extra modules_to_save."""
    config = peft_model.peft_config[name]
    if config.use_dora or getattr(config, "lora_bias", False) or config.fan_in_fan_out:
        return False
    if config.modules_to_save or getattr(config, "trainable_token_indices", None):
        return False
    if any(name in getattr(module, "lora_embedding_A", {}) for module in peft_model.modules()):
        return False  # LoRA on an embedding: PEFT's own layer computes it
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
