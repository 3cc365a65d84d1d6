"""Per-row adapters inside the owned forward: which pool slot each row's tokens use, per layer and module.

The resident pools (gathered LoRA, IA3) stay the single home of adapter tensors; this maps the owned forward's
(layer, module) to their stacks and gives each step the rows' slots. Decode rows (one token each) use the pool's
gathered per-row matmuls, kept across steps while the rows stay the same; a prompt chunk (many tokens of one row)
uses its adapter's matrices directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from service.model.adapters import LoadedAdapter
from service.model.gathered import GatheredLora
from service.model.ia3 import IA3Pool
from service.model.owned.llama import MODULES, LlamaForward
from service.model.slots import NO_ADAPTER

# IA3 vectors the owned forward applies: on any module's output, and on down_proj's input (PEFT's feed-forward
# default for Llama). Others scale an input shared by a fused matmul; such adapters use the transformers path.
_INPUT_SCALED = ("down_proj",)


class OwnedAdapters:
    """The pools as the owned forward sees them."""

    def __init__(self, forward: LlamaForward, gathered: GatheredLora, ia3: IA3Pool) -> None:
        self.forward = forward
        self.gathered = gathered
        self.ia3 = ia3
        self._layer_ids = {id(module) for modules in forward.modules for module in modules.values()}
        self._paths = [{name: f"model.layers.{index}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"
                        for name in MODULES} for index in range(len(forward.modules))]
        self._input_paths = {paths[name] for paths in self._paths for name in _INPUT_SCALED}
        self._output_paths = {path for paths in self._paths for path in paths.values()}

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

    def for_step(self, decode: Sequence[LoadedAdapter | None], chunks: Sequence[tuple[LoadedAdapter | None, int]],
                 repeated_key: object) -> StepAdapters | None:
        """The step's routing: decode rows' adapters, then each chunk's adapter and token count."""
        adapters = list(decode) + [adapter for adapter, _ in chunks]
        lora = [a.peft_name if a is not None and a.peft_name is not None else None for a in adapters]
        ia3 = [a.pool_name if a is not None and a.ia3 is not None else None for a in adapters]
        if not any(lora) and not any(ia3):
            return None
        return StepAdapters(self, lora if any(lora) else None, ia3 if any(ia3) else None, len(decode),
                            [count for _, count in chunks], repeated_key)


class StepAdapters:
    def __init__(self, owned: OwnedAdapters, lora: list[str | None] | None, ia3: list[str | None] | None,
                 decode_rows: int, chunk_tokens: list[int], repeated_key: object) -> None:
        self._owned = owned
        device = owned.forward.embed.device
        self._decode_rows = decode_rows
        self._chunk_tokens = chunk_tokens
        self._lora_slots: list[int] = []
        self._decode_lora: torch.Tensor | None = None
        self._key = None
        if lora is not None:
            self._lora_slots = owned.gathered.slots(lora)
            decode_slots = self._lora_slots[:decode_rows]
            if any(slot != NO_ADAPTER for slot in decode_slots):
                self._decode_lora = torch.tensor(decode_slots, device=device)
                self._key = (repeated_key, tuple(decode_slots), owned.gathered.version)
        self._token_ia3: torch.Tensor | None = None
        if ia3 is not None:
            slots = owned.ia3.slots(ia3)
            counts = [1] * decode_rows + chunk_tokens
            self._token_ia3 = torch.repeat_interleave(torch.tensor(slots, device=device),
                                                      torch.tensor(counts, device=device))
        self._begun: dict[int, object] = {}  # stacks routed for this step's decode rows, by id

    def add_lora(self, layer: int, module: str, x: torch.Tensor, out: torch.Tensor) -> None:
        if not self._lora_slots:
            return
        stack = self._owned.gathered.stack(self._owned.forward.modules[layer][module])
        if stack is None:
            return
        decode = self._decode_rows
        if self._decode_lora is not None:
            if id(stack) not in self._begun:
                stack.begin(self._decode_lora, self._key)
                self._begun[id(stack)] = stack
            out[:decode] += stack.rows_delta(x[:decode]).to(out.dtype)
        offset = decode
        for slot, count in zip(self._lora_slots[decode:], self._chunk_tokens):
            if slot != NO_ADAPTER:
                out[offset:offset + count] += stack.slot_delta(x[offset:offset + count], slot).to(out.dtype)
            offset += count

    def scale(self, layer: int, module: str, of_input: bool = False) -> torch.Tensor | None:
        if self._token_ia3 is None:
            return None
        found = self._owned.ia3.scales(self._owned._paths[layer][module])
        if found is None or found[1] != of_input:
            return None
        return found[0].index_select(0, self._token_ia3)

    def finish(self) -> None:
        """Release the pools' per-step routing (their gathered rows are kept for the next step of the same rows)."""
        for stack in self._begun.values():
            stack.end(keep=True)
