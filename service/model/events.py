"""What a generation engine reports, and the state of one row being generated (shared by both engines)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from service.domain import Generation
from service.errors import InvalidRequest
from service.model.adapters import LoadedAdapter
from service.model.runner import GenerationJob


@dataclass(frozen=True)
class TokenEvent:
    """New text for a streaming client (held back while it could still become a stop string)."""

    handle: Hashable
    text: str


@dataclass(frozen=True)
class DoneEvent:
    handle: Hashable
    generation: Generation


@dataclass(frozen=True)
class FailedEvent:
    """A row whose own adapter's rows fail a step even alone (adapter None: the base rows did)."""

    handle: Hashable
    adapter: LoadedAdapter | None
    error: Exception


Event = TokenEvent | DoneEvent | FailedEvent
Admission = tuple[Hashable, LoadedAdapter | None, GenerationJob]


@dataclass
class RowState:
    handle: Hashable
    adapter: LoadedAdapter | None
    job: GenerationJob
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    prefix_offset: int = 0
    read_offset: int = 0


def token_events(row: RowState, events: list[Event]) -> None:
    """The events a row's newest token gives: new text that can no longer turn into a stop string, or its end."""
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


def new_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def seeded(admitted: Sequence[Admission], device: torch.device,
           events: list[Event]) -> list[tuple[Admission, torch.Generator | None]]:
    """Each admitted row with its sampler; a row whose seed cannot seed one fails alone, before it joins a step
    (the request side refuses such seeds; this keeps one that slipped through from failing its neighbours)."""
    rows: list[tuple[Admission, torch.Generator | None]] = []
    for handle, adapter, job in admitted:
        try:
            rows.append(((handle, adapter, job), new_generator(job.params.seed, device)))
        except (ValueError, RuntimeError, OverflowError) as error:
            events.append(FailedEvent(handle, adapter, InvalidRequest(f"seed {job.params.seed}: {error}", "seed")))
    return rows
