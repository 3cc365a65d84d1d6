"""Model execution: padded batched forward passes for classification and generation on the shared base.

Everything here runs on one worker thread (the batcher's executor), so adapter loads never race a forward pass.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from service.domain import AdapterInfo, Generation, GenerationParams
from service.errors import InvalidRequest
from service.model.adapters import LoadedAdapter, LoraHost, load_adapter
from service.model.loading import BaseModel


@dataclass
class GenerationJob:
    """A generation request with its prompt already tokenized."""

    params: GenerationParams
    prompt_ids: list[int]
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when its client is gone


@dataclass
class _Row:
    job: GenerationJob
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class ModelRunner:
    """Owns the base model, the LoRA host and the resident adapters' tensors; runs batches."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.lora_host = LoraHost(base)
        self._peft_names = (f"adapter{i}" for i in itertools.count())
        config = base.model.config
        self.max_positions: int = getattr(config, "max_position_embeddings", None) or 1 << 30
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id: int = base.tokenizer.pad_token_id

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.base.model.generation_config, self.base.model.config, self.base.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    # -- adapters -------------------------------------------------------------------------------------------------

    def load(self, info: AdapterInfo) -> LoadedAdapter:
        # no_grad rather than inference_mode: PEFT later flips requires_grad on these tensors when switching.
        with torch.no_grad():
            return load_adapter(info, self.base, self.lora_host, next(self._peft_names))

    def unload(self, adapter: LoadedAdapter) -> None:
        if adapter.peft_name is not None:
            self.lora_host.remove(adapter.peft_name)

    @contextmanager
    def _adapter_scope(self, adapter: LoadedAdapter | None) -> Iterator[None]:
        """Route the batch through one LoRA adapter, or keep every LoRA layer off (base and prefix rows)."""
        peft_model = self.lora_host.peft_model
        if adapter is not None and adapter.peft_name is not None:
            peft_model.set_adapter(adapter.peft_name)
            yield
        elif peft_model is not None and peft_model.peft_config:
            with peft_model.disable_adapter():
                yield
        else:
            yield

    # -- tokenization ---------------------------------------------------------------------------------------------

    def encode_text(self, text: str, limit: int, what: str = "input") -> list[int]:
        limit = min(limit, self.max_positions)
        ids = self.base.tokenizer(text)["input_ids"]
        if not ids:
            raise InvalidRequest(f"{what} is empty after tokenization")
        if len(ids) > limit:
            raise InvalidRequest(f"{what} has {len(ids)} tokens; the limit is {limit}")
        return ids

    def encode_prompt(self, params: GenerationParams, limit: int) -> list[int]:
        text = params.prompt
        if params.chat:
            text = self.base.tokenizer.apply_chat_template(
                [{"role": "user", "content": params.prompt}], add_generation_prompt=True, tokenize=False
            )
        ids = self.encode_text(text, limit, "prompt")
        if len(ids) + params.max_new_tokens > self.max_positions:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the base model's "
                f"{self.max_positions} positions"
            )
        return ids

    # -- batches --------------------------------------------------------------------------------------------------

    def _pad(self, sequences: Sequence[Sequence[int]], offset: int) -> tuple[torch.Tensor, ...]:
        """Left-pad so every row's last token is at -1; positions count real tokens only, after the prefix."""
        width = max(len(s) for s in sequences)
        device = self.base.device
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long, device=device)
            mask[row, width - len(sequence):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + offset
        return ids, mask, positions

    def _prefix_cache(self, adapter: LoadedAdapter | None, batch: int) -> DynamicCache | None:
        if adapter is None or adapter.prefix is None:
            return DynamicCache()
        return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in adapter.prefix])

    def _backbone(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None
    ) -> torch.Tensor:
        """Last-position hidden state of each row."""
        output = self.base.model.base_model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        return output.last_hidden_state[:, -1]

    def _with_prefix_mask(self, adapter: LoadedAdapter | None, mask: torch.Tensor) -> torch.Tensor:
        virtual = 0 if adapter is None else adapter.num_virtual_tokens
        if not virtual:
            return mask
        return torch.cat([mask.new_ones(mask.shape[0], virtual), mask], dim=1)

    def classify(self, adapter: LoadedAdapter, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """Class probabilities per input: the adapter's head on the last real token's hidden state."""
        assert adapter.head is not None
        with torch.inference_mode(), self._adapter_scope(adapter):
            ids, mask, positions = self._pad(inputs, adapter.num_virtual_tokens)
            cache = self._prefix_cache(adapter, len(inputs))
            hidden = self._backbone(ids, self._with_prefix_mask(adapter, mask), positions, cache)
            logits = adapter.head(hidden).float()
            return torch.softmax(logits, dim=-1).tolist()

    def generate(self, adapter: LoadedAdapter | None, jobs: Sequence[GenerationJob]) -> list[Generation]:
        """Decode a batch to completion; finished rows leave the batch so the rest run on fewer rows."""
        rows = [_Row(job=job, generator=_generator(job.params.seed, self.base.device)) for job in jobs]
        virtual = 0 if adapter is None else adapter.num_virtual_tokens
        lm_head = self.base.model.get_output_embeddings()
        with torch.inference_mode(), self._adapter_scope(adapter):
            ids, mask, positions = self._pad([job.prompt_ids for job in jobs], virtual)
            cache = self._prefix_cache(adapter, len(jobs))
            mask = self._with_prefix_mask(adapter, mask)
            active = list(range(len(rows)))
            while True:
                logits = lm_head(self._backbone(ids, mask, positions, cache)).float()
                tokens = self._sample(logits, [rows[i] for i in active])
                still = [slot for slot, i in enumerate(active) if not self._advance(rows[i], tokens[slot])]
                if not still:
                    break
                positions = positions[:, -1:] + 1
                if len(still) < len(active):
                    keep = torch.tensor(still, device=self.base.device)
                    cache.batch_select_indices(keep)
                    mask, positions = mask[keep], positions[keep]
                    tokens = [tokens[slot] for slot in still]
                    active = [active[slot] for slot in still]
                ids = torch.tensor(tokens, device=self.base.device).unsqueeze(1)
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        return [
            Generation(
                text=row.text,
                generated_tokens=len(row.generated),
                prompt_tokens=len(row.job.prompt_ids),
                finish_reason=row.finish_reason or "length",
            )
            for row in rows
        ]

    def _sample(self, logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        tokens: list[int] = []
        for index, row in enumerate(rows):
            params = row.job.params
            if params.temperature <= 0.0:
                tokens.append(greedy[index])
                continue
            probs = torch.softmax(logits[index] / params.temperature, dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # Keep the smallest head of the distribution whose mass reaches top_p (always the top token).
                outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens.append(int(torch.multinomial(probs, 1, generator=row.generator)))
        return tokens

    def _advance(self, row: _Row, token: int) -> bool:
        """Append a token to a row; True when the row is finished."""
        params = row.job.params
        if row.job.cancelled.is_set():
            row.finish_reason = "cancelled"
            return True
        if token in self.eos_token_ids:
            row.generated.append(token)
            row.finish_reason = "eos"
            return True
        row.generated.append(token)
        text = self.base.tokenizer.decode(
            [t for t in row.generated if t not in self.eos_token_ids], skip_special_tokens=True
        )
        cut = min((text.find(stop) for stop in params.stop if stop and stop in text), default=-1)
        if cut >= 0:
            row.text = text[:cut]
            row.finish_reason = "stop"
            return True
        row.text = text
        if len(row.generated) >= params.max_new_tokens:
            row.finish_reason = "length"
            return True
        return False


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
