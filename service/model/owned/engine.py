"""Continuous batching on the owned forward: slots, admission by cache space, chunked prefill inside decode steps.

Every step is one forward pass over a flat batch: one token for each running row, then chunks of prompts being
prefilled, as many prompt tokens as the step's token budget leaves (``max_batch_tokens``), so a long prompt is
spread over several steps and never stalls the rows that are streaming. A request joins when the cache can hold
all it may grow to (its slot is claimed, a prefix adapter's keys/values written into it once); until then it
waits, in arrival order. Rows leave by releasing their slot; no other row's cache moves.

A step that fails writes nothing that counts (a row's length only grows after its step succeeds), so it is simply
run again one adapter's rows at a time: rows whose own group fails get a ``FailedEvent`` and leave, the others go on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.model.adapters import LoadedAdapter
from service.model.events import Admission, Event, FailedEvent, RowState, seeded, token_events
from service.model.owned.batch import Chunk, StepBatch
from service.model.owned.model import OwnedModel
from service.model.prompt_tuning import virtual_ids, virtual_index
from service.model.runner import GenerationJob, ModelRunner

logger = logging.getLogger(__name__)

_PREFILL_FLOOR = 96  # prompt tokens a step may carry however few rows decode
_PREFILL_MIN = 16  # prompt tokens a step carries even when the decode rows fill the token budget
_PREFILL_PER_DECODE_ROW = 6  # below the floor, prompt tokens a step carries per decode row
_BURST_RATIO = 2  # prompts' rows per decode row from which a step carries as many prompt tokens as its budget allows


@dataclass(eq=False)
class _Row(RowState):
    slot: int = -1
    inputs: list[int] | None = None  # the prompt as fed: virtual-token placeholders, then its ids
    fed: int = 0  # prompt inputs already in the cache
    start: int = 0  # cache position of the first input (after a prefix adapter's entries)

    @property
    def prefilling(self) -> bool:
        assert self.inputs is not None
        return self.fed < len(self.inputs)

    @property
    def next_position(self) -> int:
        """The position of the row's next decode input (its newest generated token)."""
        assert self.inputs is not None
        return self.start + len(self.inputs) + len(self.generated) - 1


def _adapter_key(adapter: LoadedAdapter | None) -> tuple[str, str] | None:
    """What a row's keys and values depend on besides its inputs: the adapter's name and content."""
    return None if adapter is None else (adapter.info.name, adapter.info.sha256)


def row_tokens(adapter: LoadedAdapter | None, job: GenerationJob) -> int:
    """Cache entries a request may need: prefix, virtual tokens, prompt and every new token."""
    virtual = 0 if adapter is None else adapter.num_virtual_tokens + adapter.prompt_length
    return virtual + len(job.prompt_ids) + job.params.max_new_tokens


class OwnedEngine:
    def __init__(self, runner: ModelRunner, owned: OwnedModel) -> None:
        self._runner = runner
        self._owned = owned
        self._rows: list[_Row] = []  # in admission order
        self._waiting: list[_Row] = []  # admitted by the batcher, not yet given a slot

    @property
    def active(self) -> int:
        return len(self._rows) + len(self._waiting)

    def adapters_in_use(self) -> list[LoadedAdapter]:
        return [row.adapter for row in self._rows + self._waiting if row.adapter is not None]

    def fits(self, adapter: LoadedAdapter | None, job: GenerationJob) -> bool:
        return self._owned.cache.fits_ever(row_tokens(adapter, job))

    def abort(self) -> list:
        handles = [row.handle for row in self._rows + self._waiting]
        for row in self._rows:
            self._owned.cache.release(row.slot)
        self._rows, self._waiting = [], []
        return handles

    def step(self, admitted: Sequence[Admission] = ()) -> list[Event]:
        events: list[Event] = []
        device = self._runner.base.device
        self._waiting += [_Row(handle=handle, adapter=adapter, job=job, generator=generator)
                          for (handle, adapter, job), generator in seeded(admitted, device, events)]
        with torch.inference_mode(), self._owned.step_threads():
            self._drop_cancelled(events)
            self._claim_slots(events)
            if self._rows:
                self._run_isolating(self._plan(), events)
        return events

    # -- scheduling -----------------------------------------------------------------------------------------------

    def _drop_cancelled(self, events: list[Event]) -> None:
        for rows in (self._rows, self._waiting):
            for row in [row for row in rows if row.job.cancelled.is_set()]:
                row.finish_reason = "cancelled"
                token_events(row, events)
                self._leave(row)

    def _claim_slots(self, events: list[Event]) -> None:
        """Give waiting rows a slot, in arrival order, while the cache has room (the first that does not fit
        waits, and so do those behind it)."""
        cache = self._owned.cache
        while self._waiting:
            row = self._waiting[0]
            slot = cache.claim(row_tokens(row.adapter, row.job))
            if slot is None:
                return
            self._waiting.pop(0)
            adapter = row.adapter
            row.slot = slot
            self._owned.adapters.admit(slot, adapter)
            row.inputs = list(row.job.prompt_ids)
            if adapter is not None and adapter.virtual_tokens is not None:
                row.inputs = virtual_ids(adapter.prompt_length) + row.inputs
            self._rows.append(row)
            if adapter is not None and adapter.prefix is not None:
                try:
                    cache.write_prefix(slot, adapter.prefix)
                except Exception as error:  # a prefix that does not fit this base's cache: its rows fail alone
                    self._fail([row], error, events)
                    continue
                row.start = adapter.num_virtual_tokens
            row.fed = self._owned.prefixes.restore(_adapter_key(adapter), row.inputs, slot, row.start)

    def _plan(self) -> tuple[list[_Row], list[tuple[_Row, int]]]:
        """The step's decode rows (by slot) and prompt chunks (row, tokens) within the token budget."""
        decode = sorted((row for row in self._rows if not row.prefilling), key=lambda row: row.slot)
        budget = max(self._owned.max_batch_tokens - len(decode), min(_PREFILL_MIN, self._owned.max_batch_tokens))
        if decode:
            joining = [row for row in self._rows if row.prefilling]
            left = sum(len(row.inputs) - row.fed for row in joining if row.inputs is not None)
            budget = self._prompt_budget(budget, len(decode), len(joining), left)
        chunks: list[tuple[_Row, int]] = []
        for row in self._rows:
            if not row.prefilling:
                continue
            if budget <= 0 and (decode or chunks):
                break
            assert row.inputs is not None
            count = min(len(row.inputs) - row.fed, max(budget, 1))
            chunks.append((row, count))
            budget -= count
        return decode, chunks

    @staticmethod
    def _prompt_budget(budget: int, decode: int, prefilling: int, left: int) -> int:
        """Prompt tokens a step may carry (of ``budget``) beside ``decode`` streaming rows, with ``prefilling``
        rows' prompts to go, ``left`` tokens in all.

        Every streaming row waits for the whole step, so its prompt tokens set their inter-token gap. Where the
        prompts' rows are at least as many as the streaming ones (a wave of requests joining), the cap is the decode
        rows or the floor: with the fused kernels a 64-row step carrying ~100 prompt tokens costs under twice a
        plain one (server A/B at 64 streams, two runs each: floor 64 gave TTFT p99 1.3-1.5 s and ITL p99/p50
        1.5-1.6; 96 gave 0.76-0.80 s and 1.96-2.07; 128 gave 0.81-1.07 s and 1.9-2.3). Fewer rows joining many
        streaming ones (the steady state) get six tokens per streaming row under that floor. Three (on the Intel
        machine, at 16 rows, 96 prompt tokens made a step 2.5x a plain one, 48 made it 1.6x) starved long
        prompts: 16 streams of ~230-token prompts on the AMD EPYC, two A/B rounds, six against three gave
        321-341 against 294-295 tok/s, TTFT p99 1.15-1.19 against 1.39-1.40 s and ITL p99 / p50 1.45-1.61
        against 2.00-2.28, with the benchmark's short prompts even (they join in waves, the case below). Where
        the prompts' rows outnumber the streaming ones twice over (``_BURST_RATIO``) and all their prompts fit in
        this step, there is no cap:
        a few rows' one long gap costs less than every joining row's first token waiting behind a trickle (at 16
        streams the rows that start first then held the rest of their wave to a couple of prompts a step, TTFT
        p99 0.5-0.8 s). A long prompt never fits, so it is always spread over steps."""
        if prefilling >= _BURST_RATIO * decode and left <= budget:
            return budget
        if prefilling >= decode:
            return min(budget, max(decode, _PREFILL_FLOOR))
        return min(budget, max(decode, _PREFILL_MIN, min(_PREFILL_FLOOR, _PREFILL_PER_DECODE_ROW * decode)))

    # -- fault isolation ------------------------------------------------------------------------------------------

    def _run_isolating(self, plan: tuple[list[_Row], list[tuple[_Row, int]]], events: list[Event]) -> None:
        try:
            self._run(plan, events)
            return
        except Exception as error:
            decode, chunks = plan
            groups: dict[int, tuple[list[_Row], list[tuple[_Row, int]]]] = {}
            for row in decode:
                groups.setdefault(id(row.adapter), ([], []))[0].append(row)
            for row, count in chunks:
                groups.setdefault(id(row.adapter), ([], []))[1].append((row, count))
            logger.warning("step of %d rows failed (%r); retrying %d adapter groups apart",
                           len(decode) + len(chunks), error, len(groups))
            if len(groups) == 1:
                self._fail(decode + [row for row, _ in chunks], error, events)
                return
        for group in groups.values():
            try:
                self._run(group, events)
            except Exception as group_error:
                self._fail(group[0] + [row for row, _ in group[1]], group_error, events)

    def _fail(self, rows: list[_Row], error: Exception, events: list[Event]) -> None:
        for row in rows:
            if row.slot >= 0 and row.inputs is not None:  # what its failed step may have left half-written
                self._owned.cache.forget_written(row.slot, row.start + row.fed + max(len(row.generated) - 1, 0))
            events.append(FailedEvent(row.handle, row.adapter, error))
            self._leave(row)

    def _leave(self, row: _Row) -> None:
        if row.slot < 0:
            self._waiting = [other for other in self._waiting if other is not row]
            return
        self._rows = [other for other in self._rows if other is not row]
        self._owned.cache.release(row.slot)

    # -- one forward ----------------------------------------------------------------------------------------------

    def _run(self, plan: tuple[list[_Row], list[tuple[_Row, int]]], events: list[Event]) -> None:
        decode, chunks = plan
        owned, device = self._owned, self._runner.base.device
        ids: list[int] = [row.generated[-1] for row in decode]
        positions: list[int] = [row.next_position for row in decode]
        for row, position in zip(decode, positions):
            owned.cache.mark_written(row.slot, position + 1)
        batch_chunks: list[Chunk] = []
        wanted = list(range(len(decode)))
        finishing: list[_Row] = []
        offset = len(decode)
        for row, count in chunks:
            assert row.inputs is not None
            ids += row.inputs[row.fed:row.fed + count]
            first = row.start + row.fed
            positions += range(first, first + count)
            batch_chunks.append(Chunk(row.slot, first, count, offset))
            owned.cache.mark_written(row.slot, first + count)
            if row.fed + count == len(row.inputs):
                wanted.append(offset + count - 1)
                finishing.append(row)
            offset += count
        rows = decode + [row for row, _ in chunks]
        counts = [1] * len(decode) + [count for _, count in chunks]
        embeddings = self._embed(torch.tensor(ids, device=device), rows, counts)
        slots = [row.slot for row in decode]
        if owned.decode_graphs is not None and not chunks and owned.decode_graphs.covers(slots):
            lora, ia3 = owned.adapters.pool_slots([row.adapter for row in decode])
            hidden = owned.decode_graphs(embeddings, slots, positions, lora, ia3)
        else:
            batch = StepBatch(embeddings, torch.tensor(positions, device=device),
                              torch.tensor(slots, dtype=torch.long, device=device), batch_chunks)
            step_adapters = owned.adapters.for_step([row.adapter for row in decode], slots,
                                                    [(row.adapter, count) for row, count in chunks])
            hidden = owned.forward(batch, owned.cache, step_adapters,
                                   torch.tensor(wanted, dtype=torch.long, device=device))
        sampling = decode + finishing
        tokens: list[int] = []
        if sampling:
            logits = owned.forward.logits(hidden)
            for index, row in enumerate(sampling):
                vocabulary = None if row.adapter is None else row.adapter.vocabulary
                if vocabulary is not None and vocabulary.changes_output:
                    logits[index] = vocabulary.logits(hidden[index], logits[index])
            tokens = self._runner.sample(logits, [(row.job.params, row.generator) for row in sampling])
        # Nothing of the step counts until here: a failure above leaves every row as it was, to be run again.
        for row, count in chunks:
            row.fed += count
        for row in finishing:
            assert row.inputs is not None
            owned.prefixes.store(_adapter_key(row.adapter), row.inputs, row.slot, row.start)
        for row, token in zip(sampling, tokens):
            row.finish_reason = self._runner.advance(row, token)
            token_events(row, events)
            if row.finish_reason is not None:
                self._leave(row)

    def _embed(self, ids: torch.Tensor, rows: list[_Row], counts: list[int]) -> torch.Tensor:
        """Input embeddings of the flat batch: the base's, a row's own vocabulary where it has one, and the
        adapter's virtual token embeddings at placeholder ids."""
        embeddings = F.embedding(ids.clamp(min=0), self._owned.forward.embed)
        offset = 0
        for row, count in zip(rows, counts):
            adapter = row.adapter
            if adapter is not None:
                span = slice(offset, offset + count)
                if adapter.vocabulary is not None and adapter.vocabulary.changes_input:
                    embeddings[span] = adapter.vocabulary.embed(ids[span].clamp(min=0), embeddings[span])
                if adapter.virtual_tokens is not None:
                    virtual = ids[span] < 0
                    if bool(virtual.any()):
                        part = embeddings[span]
                        part[virtual] = adapter.virtual_tokens[virtual_index(ids[span][virtual])].to(part.dtype)
            offset += count
        return embeddings
