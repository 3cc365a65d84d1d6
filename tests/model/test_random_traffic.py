"""Random traffic on the owned engine: requests of every generation kind arrive a few a step, prompts go in
chunks of a few tokens, some share long beginnings (prefix cache hits), some are cancelled, some sample with a
seed or stop at a string; each one that finishes must give the text it gives alone on a runner without the cache.
(36 seeds passed when this was written; six run here.)"""

from __future__ import annotations

import random

import pytest

from service.domain import GenerationParams
from service.model.events import DoneEvent, FailedEvent
from service.model.generation import Engines, generate
from service.model.loading import BaseModel
from service.model.owned.slot_cache import CacheLimits
from service.model.runner import GenerationJob, ModelRunner
from service.store.store import AdapterStore

FRAGMENTS = ["Once upon a time in a kingdom by the sea", " there lived a princess who kept a lighthouse",
             " and a cat", ", and every night she counted the ships", " until the morning came.",
             " The end", " of the story", " was near", " 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16"]
NAMES = [None, "lora-gen", "prefix-gen", "prompt-gen", "ia3-gen", "adalora-gen", "lora-gen-mlp",
         "prefix-proj-gen", "ptuning-mlp-gen", "prompt-text-gen"]


@pytest.mark.parametrize("seed,batch_tokens", [(seed, [2048, 24, 40, 7, 16, 17][seed]) for seed in range(6)])
def test_random_traffic_matches_each_alone(tiny_loaded: BaseModel, runner: ModelRunner, store: AdapterStore,
                                           seed: int, batch_tokens: int) -> None:
    rng = random.Random(seed)
    cached = ModelRunner(tiny_loaded, limits=CacheLimits(prefix_cache_bytes=8 * 1024**2, slots=6,
                                                         max_batch_tokens=batch_tokens))
    ref_adapters = {name: runner.load(store.get(name)) if name else None for name in NAMES}
    adapters = {name: cached.load(store.get(name)) if name else None for name in NAMES}
    tokenizer = tiny_loaded.tokenizer
    requests: list[tuple[str, str | None, int, dict]] = []
    for _ in range(40):
        preamble = rng.choice(["", FRAGMENTS[0] + FRAGMENTS[1] + FRAGMENTS[3], FRAGMENTS[8] + FRAGMENTS[8]])
        prompt = preamble + "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 4)))
        prompt = prompt or "hello"
        name = rng.choice(NAMES[:3]) if rng.random() < 0.6 else rng.choice(NAMES)
        tokens = rng.randint(1, 12)
        sampling = {} if rng.random() < 0.5 else {"temperature": 0.8, "top_p": rng.choice([1.0, 0.9]),
                                                 "seed": rng.randint(0, 99)}
        if rng.random() < 0.2:
            sampling["stop"] = [rng.choice(["e", "the", " a", "."])]
        requests.append((prompt, name, tokens, sampling))
    expected = []
    for prompt, name, tokens, sampling in requests:
        job = GenerationJob(GenerationParams(prompt=prompt, max_new_tokens=tokens, **sampling),
                            tokenizer(prompt)["input_ids"])
        expected.append(generate(runner, [ref_adapters[name]], [job])[0].text)
    engines = Engines(cached)
    jobs: dict[int, GenerationJob] = {}
    done: dict[int, str] = {}
    pending = list(range(len(requests)))
    cancelled: set[int] = set()
    steps = 0
    while pending or engines.active:
        admitted = []
        for _ in range(rng.randint(0, 3)):
            if pending:
                index = pending.pop(0)
                prompt, name, tokens, sampling = requests[index]
                job = GenerationJob(GenerationParams(prompt=prompt, max_new_tokens=tokens, **sampling),
                                    tokenizer(prompt)["input_ids"])
                jobs[index] = job
                admitted.append((index, adapters[name], job))
        for index, job in jobs.items():
            if index not in done and index not in cancelled and rng.random() < 0.01:
                job.cancelled.set()
                cancelled.add(index)
        for event in engines.step(admitted):
            if isinstance(event, DoneEvent):
                done[event.handle] = event.generation.text
            elif isinstance(event, FailedEvent):
                raise AssertionError(event.error)
        steps += 1
        assert steps < 5000
    checked = 0
    for index, text in done.items():
        if index in cancelled:
            continue
        assert text == expected[index], (index, requests[index])
        checked += 1
    assert checked > 10
    assert cached.owned is not None and cached.owned.prefixes.hit_tokens > 0
    for adapter in ref_adapters.values():
        if adapter is not None:
            runner.unload(adapter)
