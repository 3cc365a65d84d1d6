"""Continuous batching: rows joining mid-generation, of any adapter kind, get their single-request answers, on
both engines (the transformers one and the owned one, with prompts whole or chunked over many steps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from service.domain import GenerationParams
from service.errors import InvalidRequest
from service.model.engine import GenerationEngine
from service.model.events import DoneEvent, FailedEvent, TokenEvent
from service.model.generation import generate
from service.model.owned.engine import OwnedEngine
from service.model.runner import GenerationJob, ModelRunner
from service.store.store import AdapterStore

PLAN = [  # (step at which it joins, adapter, prompt, max_new_tokens)
    (0, "lora-gen", "the first long request", 20),
    (0, None, "base", 5),
    (2, "prefix-gen", "joins at step two with a longer prompt than most", 8),
    (3, "lora-gen-mlp", "x", 12),
    (3, "prefix-proj-gen", "prefix with projection", 6),
    (7, "lora-gen", "late", 4),
    (9, None, "after the base row left", 6),
    (4, "prompt-gen", "a prompt tuned row joins", 7),
    (6, "ptuning-mlp-gen", "p-tuning joins late", 5),
    (2, "ia3-gen", "ia3 joins", 6),
    (5, "adalora-gen", "adalora joins", 6),
]


Engine = GenerationEngine | OwnedEngine


@pytest.fixture(params=["transformers", "owned", "owned-chunked"])
def make_engine(request: pytest.FixtureRequest, runner: ModelRunner) -> Iterator[Callable[[], Engine]]:
    """``owned-chunked``: 3 tokens a step, so prompts are prefilled over several steps between decode rows."""
    assert runner.owned is not None
    budget = runner.owned.max_batch_tokens
    if request.param == "owned-chunked":
        runner.owned.max_batch_tokens = 3
    yield (lambda: GenerationEngine(runner)) if request.param == "transformers" else (
        lambda: OwnedEngine(runner, runner.owned))
    runner.owned.max_batch_tokens = budget


def _job(runner: ModelRunner, prompt: str, n: int, stop: tuple[str, ...] = ()) -> GenerationJob:
    return GenerationJob(GenerationParams(prompt=prompt, max_new_tokens=n, stop=stop),
                         runner.base.tokenizer(prompt)["input_ids"])


def test_rows_joining_mid_generation_match_single_requests(runner: ModelRunner, store: AdapterStore,
                                                          make_engine: Callable[[], Engine]) -> None:
    adapters = {name: runner.load(store.get(name)) for _, name, _, _ in PLAN if name}
    expected = [generate(runner, [adapters.get(name)], [_job(runner, p, n)])[0] for _, name, p, n in PLAN]
    engine = make_engine()
    done: dict[int, object] = {}
    streamed: dict[int, str] = {}
    step = 0
    while len(done) < len(PLAN):
        joining = [(i, adapters.get(name), _job(runner, p, n)) for i, (at, name, p, n) in enumerate(PLAN) if at == step]
        for event in engine.step(joining):
            if isinstance(event, DoneEvent):
                done[event.handle] = event.generation
            elif isinstance(event, TokenEvent):
                streamed[event.handle] = streamed.get(event.handle, "") + event.text
        step += 1
        assert step < 100
    for index, generation in enumerate(expected):
        assert done[index].text == generation.text, PLAN[index]
        assert done[index].generated_tokens == generation.generated_tokens
        assert streamed.get(index, "") == generation.text  # the stream adds up to the final text
    assert engine.active == 0
    for adapter in adapters.values():
        runner.unload(adapter)


def test_stream_never_shows_a_stop_string(runner: ModelRunner, make_engine: Callable[[], Engine]) -> None:
    full = generate(runner, [None], [_job(runner, "Hello", 16)])[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    engine = make_engine()
    events = engine.step([(0, None, _job(runner, "Hello", 16, stop=(stop,)))])
    while engine.active:
        events += engine.step()
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent))
    final = next(e.generation for e in events if isinstance(e, DoneEvent))
    assert final.finish_reason == "stop" and stop not in streamed and streamed == final.text


def test_cancelled_row_is_dropped_at_the_next_step(runner: ModelRunner, make_engine: Callable[[], Engine]) -> None:
    engine = make_engine()
    keep, drop = _job(runner, "keep going", 10), _job(runner, "cancel me", 50)
    engine.step([(0, None, keep), (1, None, drop)])
    drop.cancelled.set()
    events = engine.step()
    assert any(isinstance(e, DoneEvent) and e.handle == 1 and e.generation.finish_reason == "cancelled"
               for e in events)
    assert engine.active == 1


def test_a_seed_that_cannot_seed_a_sampler_fails_its_row_alone(runner: ModelRunner,
                                                               make_engine: Callable[[], Engine]) -> None:
    engine = make_engine()
    good = _job(runner, "keep going", 4)
    bad = GenerationJob(GenerationParams(prompt="x", max_new_tokens=4, temperature=1.0, seed=2**70),
                        runner.base.tokenizer("x")["input_ids"])
    events = engine.step([(0, None, good), (1, None, bad)])
    failed = [e for e in events if isinstance(e, FailedEvent)]
    assert [e.handle for e in failed] == [1] and isinstance(failed[0].error, InvalidRequest)
    while engine.active:
        events += engine.step()
    assert any(isinstance(e, DoneEvent) and e.handle == 0 for e in events)
