"""Generation across both engines: rows the owned forward serves run there, the others on the transformers path.

The worker steps this one object; each admitted row goes to the engine that computes its adapter exactly (an
adapter only PEFT's own layers can compute, a Bloom base ...), and both engines' events come back together.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from service.domain import Generation
from service.errors import InvalidRequest
from service.model.adapters import LoadedAdapter
from service.model.engine import GenerationEngine
from service.model.events import Admission, DoneEvent, Event, FailedEvent
from service.model.owned.engine import OwnedEngine
from service.model.runner import GenerationJob, ModelRunner


def too_large() -> InvalidRequest:
    return InvalidRequest(
        "this request may grow to more tokens (prompt, the adapter's virtual tokens and max_new_tokens) than the KV "
        "cache holds; lower max_new_tokens or the prompt, or raise SERVICE_KV_CACHE_BYTES")


class Engines:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.transformers = GenerationEngine(runner)
        self.owned = OwnedEngine(runner, runner.owned) if runner.owned is not None else None

    @property
    def active(self) -> int:
        return self.transformers.active + (self.owned.active if self.owned is not None else 0)

    def adapters_in_use(self) -> list[LoadedAdapter]:
        owned = self.owned.adapters_in_use() if self.owned is not None else []
        return self.transformers.adapters_in_use() + owned

    def abort(self) -> list[Hashable]:
        return self.transformers.abort() + (self.owned.abort() if self.owned is not None else [])

    def takes(self, adapter: LoadedAdapter | None) -> bool:
        """Whether the owned engine serves this adapter's rows."""
        return self.owned is not None and self.runner.owned.adapters.serves(adapter)

    def step(self, admitted: Sequence[Admission] = ()) -> list[Event]:
        """One step of both engines; an owned-path request its cache could never hold fails at once (400)."""
        owned: list[Admission] = []
        other: list[Admission] = []
        events: list[Event] = []
        for handle, adapter, job in admitted:
            if not self.takes(adapter):
                other.append((handle, adapter, job))
            elif self.owned.fits(adapter, job):
                owned.append((handle, adapter, job))
            else:
                events.append(FailedEvent(handle, adapter, too_large()))
        if self.owned is not None and (owned or self.owned.active):
            events += self.owned.step(owned)
        if other or self.transformers.active:
            events += self.transformers.step(other)
        return events


def generate(
    runner: ModelRunner,
    adapters: Sequence[LoadedAdapter | None],
    jobs: Sequence[GenerationJob],
    on_text: Callable[[int, str], None] | None = None,
    on_failure: Callable[[int, FailedEvent], None] | None = None,
) -> list[Generation | None]:
    """Run jobs to completion together (rows admitted at once, leaving as they finish); ``on_text`` gets (job index,
    new text) as it is generated. A row that fails goes to ``on_failure`` (its place in the result is then None);
    without it, the first failure is raised."""
    engines = Engines(runner)
    done: dict[Hashable, Generation] = {}
    events = engines.step(list(zip(range(len(jobs)), adapters, jobs)))
    while True:
        for event in events:
            if isinstance(event, DoneEvent):
                done[event.handle] = event.generation
            elif isinstance(event, FailedEvent):
                if on_failure is None:
                    raise event.error
                on_failure(event.handle, event)
            elif on_text is not None:
                on_text(event.handle, event.text)
        if not engines.active:
            break
        events = engines.step()
    return [done.get(index) for index in range(len(jobs))]
