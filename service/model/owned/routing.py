"""Per-row adapters inside the owned forward: which pool slot each row's tokens use, per layer and module.

The resident pools (gathered LoRA, IA3) stay the single home of adapter tensors; this maps the owned forward's
(layer, module) to their stacks and gives each step the rows' slots. A prompt chunk (many tokens of one row) uses
its adapter's matrices directly. With the fused CPU kernels, every token's delta comes from one kernel call per
fused matmul (q and v of one q/k/v output together) that reads the adapters straight from the pool, the tokens of
one adapter together and only its own rank's rows (``lora_delta_``, after Punica's SGMV): adapter bytes read per
step are the cost there. Without them, decode rows (one token each) read their LoRA matrices from ``RowLora``: a
copy per cache slot, written when a row is admitted, so a step takes a view of the rows' span like the KV cache
does, where gathering every row's matrices again whenever a row joined or left cost more than the LoRA matmuls
themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch

from service.model.adapters import LoadedAdapter
from service.model.gathered import GatheredLora, ModuleStack
from service.model.ia3 import IA3Pool
from service.model.owned.llama import MODULES, LlamaForward
from service.model.owned.ops import KernelOps
from service.model.slots import NO_ADAPTER

# IA3 vectors the owned forward applies: on any module's output, and on down_proj's input (PEFT's feed-forward
# default for Llama). Others scale an input shared by a fused matmul; such adapters use the transformers path.
_INPUT_SCALED = ("down_proj",)


class OwnedAdapters:
    """The pools as the owned forward sees them."""

    def __init__(self, forward: LlamaForward, gathered: GatheredLora, ia3: IA3Pool, slots: int) -> None:
        self.forward = forward
        self.gathered = gathered
        self.ia3 = ia3
        self.rows = RowLora(slots)
        self.kernel_lora = isinstance(forward.ops, KernelOps)  # else bmm over RowLora's per-slot copies
        self._layer_ids = {id(module) for modules in forward.modules for module in modules.values()}
        self._paths = [{name: f"model.layers.{index}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"
                        for name in MODULES} for index in range(len(forward.modules))]
        self._input_paths = {paths[name] for paths in self._paths for name in _INPUT_SCALED}
        self._output_paths = {path for paths in self._paths for path in paths.values()}
        self._stacks: dict[tuple[int, tuple[str, ...]], LayerLora] = {}
        self._stacks_for: tuple[int, int] | None = None  # the pool's version and layout they were worked out at

    def lora_stacks(self, layer: int, names: tuple[str, ...]) -> LayerLora:
        """The pool's stacks for these modules of a layer, with each one's columns of the modules' fused output
        (worked out once per pool version and layout: a step asks for them 4 times per layer, and the layout
        changes whenever a stack's tensors are replaced, even by a pool write that then fails)."""
        key = (self.gathered.version, self.gathered.layout)
        if self._stacks_for != key:
            self._stacks.clear()
            self._stacks_for = key
        stacks = self._stacks.get((layer, names))
        if stacks is None:
            modules = self.forward.modules[layer]
            stacks = LayerLora([(self.forward.slices[name], stack) for name in names
                                if (stack := self.gathered.stack(modules[name])) is not None])
            self._stacks[(layer, names)] = stacks
        return stacks

    def ia3_scales(self, layer: int, module: str, of_input: bool) -> torch.Tensor | None:
        """The IA3 pool's per-slot scales of a layer's module (of its input or output), None if no adapter has any."""
        return self.ia3.scales(self.module_path(layer, module), of_input)

    def module_path(self, layer: int, module: str) -> str:
        return self._paths[layer][module]

    def serves(self, adapter: LoadedAdapter | None) -> bool:
        """Whether the owned forward computes this adapter exactly (else its rows take the transformers path)."""
        if adapter is None:
            return True
        if adapter.head is not None:
            return False
        if adapter.peft_name is not None:
            if adapter.peft_name not in self.gathered:
                return False  # a LoRA only PEFT's own layers compute (bias, embeddings ...)
            if not self.gathered.layers_of(adapter.peft_name) <= self._layer_ids:
                return False  # LoRA on lm_head: the transformers path applies it
        if adapter.pool_name is not None and adapter.ia3 is not None:
            for path, (_, scales_input) in adapter.ia3.items():
                if path not in (self._input_paths if scales_input else self._output_paths):
                    return False
        return True

    def layout(self) -> tuple[int, int]:
        """Where the pools' tensors live: a graph captured over them is valid while this stays the same."""
        return self.gathered.layout, self.ia3.layout

    def pool_slots(self, adapters: Sequence[LoadedAdapter | None]) -> tuple[list[int] | None, list[int] | None]:
        """Each row's LoRA pool slot and IA3 pool slot (None where no row has one of that kind)."""
        lora, ia3 = _pool_names(adapters)
        return (self.gathered.slots(lora) if lora else None, self.ia3.slots(ia3) if ia3 else None)

    def admit(self, cache_slot: int, adapter: LoadedAdapter | None) -> None:
        """A row joins in ``cache_slot``: its LoRA matrices (or zeros) are written there for its decode steps."""
        if self.kernel_lora:
            return  # the kernel reads the pool itself
        name = adapter.peft_name if adapter is not None and adapter.peft_name is not None else None
        self.rows.admit(cache_slot, self.gathered.slots([name])[0] if name in self.gathered else NO_ADAPTER,
                        self.gathered)

    def for_step(self, decode: Sequence[LoadedAdapter | None], decode_slots: Sequence[int],
                 chunks: Sequence[tuple[LoadedAdapter | None, int]]) -> StepAdapters | None:
        """The step's routing: decode rows' adapters (and cache slots, ascending), then each chunk's adapter and
        token count."""
        lora, ia3 = _pool_names(list(decode) + [adapter for adapter, _ in chunks])
        if lora is None and ia3 is None:
            return None
        return StepAdapters(self, lora, ia3, list(decode_slots), [count for _, count in chunks])


def _pool_names(adapters: Sequence[LoadedAdapter | None]) -> tuple[list[str | None] | None, list[str | None] | None]:
    """Each row's name in the LoRA pool and in the IA3 pool (None for a row with none; None for the whole list
    where no row has one of that kind)."""
    lora = [a.peft_name if a is not None and a.peft_name is not None else None for a in adapters]
    ia3 = [a.pool_name if a is not None and a.ia3 is not None else None for a in adapters]
    return (lora if any(lora) else None, ia3 if any(ia3) else None)


class LayerLora:
    """The pool's stacks behind one fused matmul of a layer, with each one's columns of its output, and the same as
    the LoRA kernel takes them (one call for all of them), as they are at the pool layout it was made at."""

    def __init__(self, stacks: list[tuple[slice, ModuleStack]]) -> None:
        for columns, stack in stacks:  # the kernel takes a stack's first column; its width is the stack's own
            if columns.stop is not None and columns.stop - (columns.start or 0) != stack.b_t.shape[2]:
                raise ValueError(f"a LoRA stack of {stack.b_t.shape[2]} outputs for columns {columns}")
        self.stacks = stacks
        self.columns = [columns.start or 0 for columns, _ in stacks]
        self.a = [stack.a for _, stack in stacks]
        self.b_t = [stack.b_t for _, stack in stacks]
        self.ranks = [stack.ranks for _, stack in stacks]


class RowLora:
    """Per cache slot, the LoRA A^T [in, r] and B^T [r, out] of the row running there, for every pooled module."""

    def __init__(self, slots: int) -> None:
        self._pool_slot = [NO_ADAPTER] * slots  # per cache slot: its row's adapter slot in the pool
        # by id of the pool's module stack: (the stack, A^T per cache slot, B^T per cache slot)
        self._rows: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._version: int | None = None  # the pool version the copies were made at

    def admit(self, cache_slot: int, pool_slot: int, gathered: GatheredLora) -> None:
        self._pool_slot[cache_slot] = pool_slot
        if self._version != gathered.version:
            return  # copied whole at the next step
        try:
            for stack, a_rows, b_rows in self._rows.values():
                a_rows[cache_slot] = stack.a[pool_slot].T
                b_rows[cache_slot] = stack.b_t[pool_slot]
        except RuntimeError:  # a stack changed shape without a new pool version (a failed pool write): copy anew
            self._version = None

    def view(self, stack: object, gathered: GatheredLora, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' A^T and B^T for cache slots low..high-1 (copied anew after the pool changed)."""
        if self._version != gathered.version:
            self._rows.clear()
            self._version = gathered.version
        rows = self._rows.get(id(stack))
        if rows is None:
            slots = torch.tensor(self._pool_slot, device=stack.a.device)
            rows = (stack, stack.a.index_select(0, slots).transpose(1, 2).contiguous(),
                    stack.b_t.index_select(0, slots))
            self._rows[id(stack)] = rows
        return rows[1][low:high], rows[2][low:high]


class StepAdapters:
    def __init__(self, owned: OwnedAdapters, lora: list[str | None] | None, ia3: list[str | None] | None,
                 decode_slots: list[int], chunk_tokens: list[int]) -> None:
        self._owned = owned
        device = owned.forward.embed.device
        decode_rows = len(decode_slots)
        self._decode_rows = decode_rows
        self._chunk_tokens = chunk_tokens
        counts = torch.tensor([1] * decode_rows + chunk_tokens, device=device)  # tokens of each row in the step
        self._lora_slots: list[int] = []
        self._decode_lora = False
        self._token_lora: torch.Tensor | None = None  # with the kernel: each token's pool slot (-1: none)
        self._any_lora = lora is not None
        if lora is not None:
            slots = owned.gathered.slots(lora)
            if owned.kernel_lora:
                rows = torch.tensor([slot if slot != NO_ADAPTER else -1 for slot in slots], device=device)
                self._token_lora = torch.repeat_interleave(rows, counts)
            else:
                self._lora_slots = slots
                self._decode_lora = any(slot != NO_ADAPTER for slot in slots[:decode_rows])
        if self._decode_lora:
            self._low, high = decode_slots[0], decode_slots[-1] + 1
            self._span = high - self._low
            self._index = torch.tensor([slot - self._low for slot in decode_slots], device=device)
            self._dense = self._span == decode_rows
        self._lora_names, self._ia3_names = set(lora or ()) - {None}, set(ia3 or ()) - {None}
        self._token_ia3: torch.Tensor | None = None
        if ia3 is not None:
            self._token_ia3 = torch.repeat_interleave(torch.tensor(owned.ia3.slots(ia3), device=device), counts)

    def adapt(self, layer: int, names: tuple[str, ...], x: torch.Tensor, output: torch.Tensor) -> None:
        if self._any_lora:
            lora = self._owned.lora_stacks(layer, names)
            if self._token_lora is not None:
                if lora.stacks:
                    torch.ops.adapter_service.lora_delta_(x, self._token_lora, lora.a, lora.b_t, lora.ranks,
                                                          lora.columns, output)
            else:
                for columns, stack in lora.stacks:
                    self._add_lora(stack, x, output[:, columns])
        if self._token_ia3 is not None:
            _scale_outputs(self._owned, self._token_ia3, layer, names, output, in_kernel=self._owned.kernel_lora)

    def touches(self, layer: int, names: tuple[str, ...]) -> bool:
        lora_layers, ia3_paths = self._adapted
        modules = self._owned.forward.modules[layer]
        return any(id(modules[name]) in lora_layers or self._owned.module_path(layer, name) in ia3_paths
                   for name in names)

    @cached_property
    def _adapted(self) -> tuple[set[int], set[str]]:
        """The base layers the step's LoRA adapters adapt and the module paths its IA3 adapters scale (worked out
        only for a step that asks ``touches``)."""
        owned = self._owned
        return (set().union(*(owned.gathered.layers_of(name) for name in self._lora_names)),
                set().union(*(owned.ia3.paths_of(name) for name in self._ia3_names)))

    def _add_lora(self, stack: ModuleStack, x: torch.Tensor, out: torch.Tensor) -> None:
        """Without the kernel: batched matmuls over the decode rows' copies, one adapter's per prompt chunk."""
        gathered = self._owned.gathered
        decode = self._decode_rows
        if self._decode_lora:
            a_rows, b_rows = self._owned.rows.view(stack, gathered, self._low, self._low + self._span)
            rows = x[:decode].to(a_rows.dtype)
            if not self._dense:  # holes (free or prefilling slots) in the span: their rows stay zero
                spread = rows.new_zeros((self._span, rows.shape[1]))
                spread[self._index] = rows
                rows = spread
            delta = torch.bmm(torch.bmm(rows.unsqueeze(1), a_rows), b_rows).squeeze(1)
            out[:decode] += (delta if self._dense else delta[self._index]).to(out.dtype)
        offset = decode
        for slot, count in zip(self._lora_slots[decode:], self._chunk_tokens):
            if slot != NO_ADAPTER:
                out[offset:offset + count] += stack.slot_delta(x[offset:offset + count], slot).to(out.dtype)
            offset += count

    def scale_input(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        if self._token_ia3 is None:
            return x
        scales = self._owned.ia3_scales(layer, module, True)
        if scales is not None:  # x is the step's own activation: scaled in place
            _scale_columns(scales, self._token_ia3, x, 0, self._owned.kernel_lora)
        return x


class SlotStepAdapters:
    """Adapters of a step whose tokens carry their pool slots in tensors (``NO_ADAPTER``: none), with every matrix
    and vector gathered from the pools inside the step: no host work per step, so a CUDA graph can replay it. Each
    token reads its adapter's padded matrices (the pool's zero rows past its rank add nothing)."""

    def __init__(self, owned: OwnedAdapters, lora: torch.Tensor | None, ia3: torch.Tensor | None) -> None:
        self._owned = owned
        self._lora = lora
        self._ia3 = ia3

    def adapt(self, layer: int, names: tuple[str, ...], x: torch.Tensor, output: torch.Tensor) -> None:
        if self._lora is not None:
            for columns, stack in self._owned.lora_stacks(layer, names).stacks:
                a = stack.a.index_select(0, self._lora)  # [tokens, rank, in]
                b_t = stack.b_t.index_select(0, self._lora)  # [tokens, rank, out]
                delta = torch.bmm(torch.bmm(x.to(a.dtype).unsqueeze(1), a.transpose(1, 2)), b_t).squeeze(1)
                output[:, columns] += delta.to(output.dtype)
        if self._ia3 is not None:
            _scale_outputs(self._owned, self._ia3, layer, names, output)

    def scale_input(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        scale = None if self._ia3 is None else _token_scales(self._owned, self._ia3, layer, module, True)
        return x if scale is None else x * scale

    def touches(self, layer: int, names: tuple[str, ...]) -> bool:
        """Whether any resident adapter has a stack on these modules (its rows may not be in the step: that only
        costs a fusion, which the static step, for GPUs, has none of)."""
        if self._lora is not None and self._owned.lora_stacks(layer, names).stacks:
            return True
        return self._ia3 is not None and any(self._owned.ia3_scales(layer, name, False) is not None for name in names)


def _token_scales(owned: OwnedAdapters, token_slots: torch.Tensor, layer: int, module: str,
                  of_input: bool) -> torch.Tensor | None:
    """Each token's IA3 scales of a module's output (or input) by its IA3 pool slot; None if no adapter has any."""
    scales = owned.ia3_scales(layer, module, of_input)
    return None if scales is None else scales.index_select(0, token_slots)


def _scale_outputs(owned: OwnedAdapters, token_slots: torch.Tensor, layer: int, names: tuple[str, ...],
                   output: torch.Tensor, in_kernel: bool = False) -> None:
    """Each module's columns of a fused output scaled, in place, by each token's IA3 vector (in the kernels: one
    call a module, no gathered [tokens, features] copy; else torch ops, which a CUDA graph can capture)."""
    for name in names:
        scales = owned.ia3_scales(layer, name, False)
        if scales is not None:
            _scale_columns(scales, token_slots, output, owned.forward.slices[name].start or 0, in_kernel)


def _scale_columns(scales: torch.Tensor, token_slots: torch.Tensor, target: torch.Tensor, column: int,
                   in_kernel: bool) -> None:
    """In place: each token's columns of ``target`` from ``column`` times its row of ``scales`` [pool, width]; in
    one kernel call where the kernels run and the dtypes match, else a gathered copy and torch's multiply (the
    same bits)."""
    if in_kernel and scales.dtype == target.dtype:
        torch.ops.adapter_service.scale_columns_(target, token_slots, scales, column)
    else:
        target[:, column:column + scales.shape[1]] *= scales.index_select(0, token_slots)
