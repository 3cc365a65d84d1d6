"""Iteration-level (continuous) batching for generation.

Rows join the running batch at the next step (their prompt is prefilled and their KV cache merged in, left-padded)
and leave it when they finish, so short requests never wait for long ones. Each row keeps its own adapter: LoRA
rows are routed per row, prefix rows carry their prefix in their part of the cache. Runs on the model thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from service.domain import Generation
from service.model.adapters import LoadedAdapter
from service.model.buckets import length_buckets
from service.model.kv_cache import KVCache, stack_right_aligned
from service.model.runner import GenerationJob, ModelRunner


@dataclass(frozen=True)
class TokenEvent:
    """New text for a streaming client (held back while it could still become a stop string)."""

    handle: Hashable
    text: str


@dataclass(frozen=True)
class DoneEvent:
    handle: Hashable
    generation: Generation


Event = TokenEvent | DoneEvent


@dataclass
class _Sequence:
    handle: Hashable
    adapter: LoadedAdapter | None
    job: GenerationJob
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None


class GenerationEngine:
    """The running generation batch: its rows, their KV cache, attention mask and next positions."""

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self._rows: list[_Sequence] = []
        self._cache: KVCache | None = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None  # [rows, 1]: the position of each row's next input
        self._next: list[int] = []  # each row's last sampled token, its next input

    @property
    def active(self) -> int:
        return len(self._rows)

    def adapters_in_use(self) -> list[LoadedAdapter]:
        return [row.adapter for row in self._rows if row.adapter is not None]

    def abort(self) -> list[Hashable]:
        """Drop every row (after a failed step); returns their handles."""
        handles = [row.handle for row in self._rows]
        self._select([])
        return handles

    def step(self, admitted: Sequence[tuple[Hashable, LoadedAdapter | None, GenerationJob]] = ()) -> list[Event]:
        """One decode step for the running rows, then prefill of the admitted ones; returns what happened."""
        events: list[Event] = []
        with torch.inference_mode():
            if self._rows:
                self._decode(events)
            # Prompts are prefilled in passes of similar lengths, so short prompts are not padded to long ones.
            for bucket in length_buckets([len(job.prompt_ids) for _, _, job in admitted], max(1, len(admitted))):
                self._admit([admitted[index] for index in bucket], events)
        return events

    def _decode(self, events: list[Event]) -> None:
        runner = self._runner
        ids = torch.tensor(self._next, device=runner.base.device).unsqueeze(1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        with runner.lora_routing([row.adapter for row in self._rows], repeated=True):
            logits = runner.logits(ids, self._mask, self._positions, self._cache)
        self._positions = self._positions + 1
        self._advance_all(logits, self._rows, events)
        self._next = [row.generated[-1] if row.generated else 0 for row in self._rows]
        keep = [index for index, row in enumerate(self._rows) if row.finish_reason is None]
        if len(keep) < len(self._rows):
            self._select(keep)

    def _admit(self, admitted: Sequence[tuple[Hashable, LoadedAdapter | None, GenerationJob]],
               events: list[Event]) -> None:
        runner = self._runner
        rows = [
            _Sequence(handle=handle, adapter=adapter, job=job, generator=_generator(job.params.seed, runner))
            for handle, adapter, job in admitted
        ]
        adapters = [row.adapter for row in rows]
        ids, mask, positions, cache = runner.start(adapters, [row.job.prompt_ids for row in rows])
        with runner.lora_routing(adapters):
            logits = runner.logits(ids, mask, positions, cache)
        self._advance_all(logits, rows, events)
        keep = [index for index, row in enumerate(rows) if row.finish_reason is None]
        if not keep:
            return
        index = torch.tensor(keep, device=runner.base.device)
        if len(keep) < len(rows):
            cache.batch_select_indices(index)
        mask, positions = mask[index], positions[index, -1:] + 1
        rows = [rows[i] for i in keep]
        if not self._rows:
            self._cache, self._mask, self._positions = cache, mask, positions
        else:
            self._cache, self._mask = _merge(self._cache, self._mask, cache, mask)
            self._positions = torch.cat([self._positions, positions])
        self._rows += rows
        self._next += [row.generated[-1] for row in rows]

    def _advance_all(self, logits: torch.Tensor, rows: list[_Sequence], events: list[Event]) -> None:
        runner = self._runner
        tokens = runner.sample(logits.float(), [(row.job.params, row.generator) for row in rows])
        for row, token in zip(rows, tokens):
            row.finish_reason = runner.advance(row, token)
            self._next_token_events(row, events)

    def _next_token_events(self, row: _Sequence, events: list[Event]) -> None:
        if row.finish_reason is not None:
            if len(row.text) > row.emitted:
                events.append(TokenEvent(row.handle, row.text[row.emitted:]))
            events.append(DoneEvent(row.handle, Generation(
                text=row.text, generated_tokens=len(row.generated), prompt_tokens=len(row.job.prompt_ids),
                finish_reason=row.finish_reason,
            )))
            return
        # Text that could still turn out to begin a stop string is held back until it cannot.
        holdback = max((len(stop) - 1 for stop in row.job.params.stop), default=0)
        # A trailing replacement character is an incomplete multi-byte token; wait for the rest of it.
        safe = len(row.text.rstrip("\ufffd")) - holdback
        if safe > row.emitted:
            events.append(TokenEvent(row.handle, row.text[row.emitted:safe]))
            row.emitted = safe

    def _select(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._next = [], []
            self._cache = self._mask = self._positions = None
            return
        index = torch.tensor(keep, device=self._runner.base.device)
        self._cache.batch_select_indices(index)
        self._mask, self._positions = self._mask[index], self._positions[index]
        self._rows = [self._rows[i] for i in keep]
        self._next = [self._next[i] for i in keep]
        # Columns no remaining row attends to (left padding of rows that left) cost attention; drop them.
        unused = int((self._mask.sum(0) == 0).long().cumprod(0).sum())
        if unused:
            self._mask = self._mask[:, unused:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]


def _merge(
    cache_a: KVCache, mask_a: torch.Tensor, cache_b: KVCache, mask_b: torch.Tensor
) -> tuple[KVCache, torch.Tensor]:
    """Stack two batches' caches, left-padding the shorter so every row's newest entry stays at the end."""
    width = max(mask_a.shape[1], mask_b.shape[1])

    def pad(mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))

    return stack_right_aligned([cache_a.entries(), cache_b.entries()], width), torch.cat([pad(mask_a), pad(mask_b)])


def _generator(seed: int | None, runner: ModelRunner) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=runner.base.device)
    generator.manual_seed(seed)
    return generator


def generate(
    runner: ModelRunner,
    adapters: Sequence[LoadedAdapter | None],
    jobs: Sequence[GenerationJob],
    on_text: Callable[[int, str], None] | None = None,
) -> list[Generation]:
    """Run jobs to completion as one batch (rows admitted together, leaving as they finish); ``on_text`` gets
    (job index, new text) as it is generated."""
    engine = GenerationEngine(runner)
    done: dict[Hashable, Generation] = {}
    events = engine.step(list(zip(range(len(jobs)), adapters, jobs)))
    while True:
        for event in events:
            if isinstance(event, DoneEvent):
                done[event.handle] = event.generation
            elif on_text is not None:
                on_text(event.handle, event.text)
        if not engine.active:
            break
        events = engine.step()
    return [done[index] for index in range(len(jobs))]
