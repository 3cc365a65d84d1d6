"""Iteration-level (continuous) batching for generation.

Rows join the running batch at the next step (their prompt is prefilled and their KV cache merged in, left-padded)
and leave it when they finish, so short requests never wait for long ones. Each row keeps its own adapter: LoRA
rows are routed per row, prefix rows carry their prefix in their part of the cache. Runs on the model thread only.

A step that fails is taken back (the cache, mask and rows as they were) and retried one adapter's rows at a time:
the rows whose own group fails get a ``FailedEvent`` naming their adapter, every other row goes on with its KV cache.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch

from service.model.adapters import LoadedAdapter
from service.model.buckets import length_buckets
from service.model.events import Admission, Event, FailedEvent, seeded, token_events
from service.model.events import RowState as _Sequence
from service.model.kv_cache import KVCache, stack_right_aligned
from service.model.runner import ModelRunner

logger = logging.getLogger(__name__)


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

    def step(self, admitted: Sequence[Admission] = ()) -> list[Event]:
        """One decode step for the running rows, then prefill of the admitted ones; returns what happened."""
        events: list[Event] = []
        with torch.inference_mode():
            if self._rows:
                self._decode_isolating(events)
            # Prompts are prefilled in passes of similar lengths, so short prompts are not padded to long ones.
            for bucket in length_buckets([len(job.prompt_ids) for _, _, job in admitted], max(1, len(admitted))):
                self._admit_isolating([admitted[index] for index in bucket], events)
        return events

    # -- fault isolation ------------------------------------------------------------------------------------------

    def _decode_isolating(self, events: list[Event]) -> None:
        snapshot, mark = _Snapshot.of(self), len(events)
        try:
            self._decode(events)
            return
        except Exception as error:
            del events[mark:]
            snapshot.restore(self)
            groups = _by_adapter(row.adapter for row in self._rows)
            logger.warning("decode step of %d rows failed (%r); retrying %d adapter groups apart",
                           len(self._rows), error, len(groups))
            if len(groups) == 1:
                events += [FailedEvent(row.handle, row.adapter, error) for row in self._rows]
                self._select([])
                return
        parts = [self._take(indices) for indices in groups]
        self._select([])
        for part in parts:
            mark = len(events)
            try:
                part._decode(events)
            except Exception as error:
                del events[mark:]
                events += [FailedEvent(row.handle, row.adapter, error) for row in part._rows]
                continue
            self._absorb(part)

    def _admit_isolating(self, admitted: Sequence[Admission], events: list[Event]) -> None:
        mark = len(events)
        try:
            self._admit(admitted, events)
            return
        except Exception as error:
            del events[mark:]
            groups = _by_adapter(adapter for _, adapter, _ in admitted)
            logger.warning("prefill of %d rows failed (%r); retrying %d adapter groups apart",
                           len(admitted), error, len(groups))
            if len(groups) == 1:
                events += [FailedEvent(handle, adapter, error) for handle, adapter, _ in admitted]
                return
        for indices in groups:
            group = [admitted[index] for index in indices]
            mark = len(events)
            try:
                self._admit(group, events)
            except Exception as error:
                del events[mark:]
                events += [FailedEvent(handle, adapter, error) for handle, adapter, _ in group]

    def _take(self, indices: Sequence[int]) -> GenerationEngine:
        """A new engine holding a copy of these rows' state (the cache rows copied out)."""
        part = GenerationEngine(self._runner)
        index = torch.tensor(indices, device=self._runner.base.device)
        assert self._cache is not None and self._mask is not None and self._positions is not None
        part._rows = [self._rows[i] for i in indices]
        part._next = [self._next[i] for i in indices]
        part._mask, part._positions = self._mask[index], self._positions[index]
        entries = [(keys[index], values[index]) for keys, values in self._cache.entries()]
        part._cache = stack_right_aligned([entries], part._mask.shape[1])
        return part

    def _absorb(self, part: GenerationEngine) -> None:
        """Take another engine's rows and state in after this one's."""
        if not part._rows:
            return
        if not self._rows:
            self._cache, self._mask, self._positions = part._cache, part._mask, part._positions
        else:
            self._cache, self._mask = _merge(self._cache, self._mask, part._cache, part._mask)
            self._positions = torch.cat([self._positions, part._positions])
        self._rows += part._rows
        self._next += part._next

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

    def _admit(self, admitted: Sequence[Admission], events: list[Event]) -> None:
        runner = self._runner
        rows = [_Sequence(handle=handle, adapter=adapter, job=job, generator=generator)
                for (handle, adapter, job), generator in seeded(admitted, runner.base.device, events)]
        if not rows:
            return
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
        tokens = runner.sample(logits, [(row.job.params, row.generator) for row in rows])
        for row, token in zip(rows, tokens):
            row.finish_reason = runner.advance(row, token)
            token_events(row, events)

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


@dataclass
class _Snapshot:
    """What a decode step changes before it can fail, to take the step back."""

    mask: torch.Tensor
    positions: torch.Tensor
    next: list[int]
    cache_lengths: list[int]
    rows: list[tuple[int, str, int, str | None, int, int]]  # per row: tokens, text, emitted, finish, offsets
    generators: list[torch.Tensor | None]  # seeded rows' sampler states, so a retried step draws the same tokens

    @classmethod
    def of(cls, engine: GenerationEngine) -> _Snapshot:
        assert engine._cache is not None and engine._mask is not None and engine._positions is not None
        return cls(
            mask=engine._mask, positions=engine._positions, next=list(engine._next),
            cache_lengths=[layer.keys.shape[2] for layer in engine._cache.layers],
            rows=[(len(r.generated), r.text, r.emitted, r.finish_reason, r.prefix_offset, r.read_offset)
                  for r in engine._rows],
            generators=[None if r.generator is None else r.generator.get_state() for r in engine._rows],
        )

    def restore(self, engine: GenerationEngine) -> None:
        engine._mask, engine._positions, engine._next = self.mask, self.positions, self.next
        assert engine._cache is not None
        for layer, length in zip(engine._cache.layers, self.cache_lengths):
            # Views of the same buffers: the next append writes over whatever the failed step left past them.
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        for row, (generated, text, emitted, finish_reason, prefix_offset, read_offset), state in zip(
                engine._rows, self.rows, self.generators):
            del row.generated[generated:]
            row.text, row.emitted, row.finish_reason = text, emitted, finish_reason
            row.prefix_offset, row.read_offset = prefix_offset, read_offset
            if state is not None:
                row.generator.set_state(state)


def _by_adapter(adapters: Iterable[LoadedAdapter | None]) -> list[list[int]]:
    """Row indices grouped by adapter (the base rows together), in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for index, adapter in enumerate(adapters):
        groups.setdefault(id(adapter), []).append(index)
    return list(groups.values())


def _merge(
    cache_a: KVCache, mask_a: torch.Tensor, cache_b: KVCache, mask_b: torch.Tensor
) -> tuple[KVCache, torch.Tensor]:
    """Stack two batches' caches, left-padding the shorter so every row's newest entry stays at the end."""
    width = max(mask_a.shape[1], mask_b.shape[1])

    def pad(mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))

    return stack_right_aligned([cache_a.entries(), cache_b.entries()], width), torch.cat([pad(mask_a), pad(mask_b)])
