"""Decode steps in static shapes (what a CUDA graph replays), run eagerly on the CPU: the same greedy text as the
dynamic step for every adapter kind, with holes, joins and leaves, and set up again when a pool's tensors move."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.domain import GenerationParams
from service.model.events import DoneEvent, FailedEvent
from service.model.generation import Engines, generate
from service.model.loading import load_base_model
from service.model.owned import engine as engine_module
from service.model.owned.graphs import DecodeGraphs, _Key, batch_sizes, length_bucket
from service.model.owned.slot_cache import CacheLimits
from service.model.runner import GenerationJob, ModelRunner
from service.settings import Settings
from service.store.store import AdapterStore
from tests.conftest import TINY_ID

ROWS = [("lora-gen", "hello world", 6), ("prefix-gen", "a longer prompt for the prefix row", 9), (None, "base", 7),
        ("prompt-gen", "prompt tuned", 5), ("ia3-gen", "ia3 row", 6), ("adalora-gen", "adalora", 6),
        ("lora-gen-mlp", "mlp lora", 8), ("ptuning-mlp-gen", "p-tuned", 4)]


def _job(runner: ModelRunner, prompt: str, n: int) -> GenerationJob:
    return GenerationJob(GenerationParams(prompt=prompt, max_new_tokens=n), runner.base.tokenizer(prompt)["input_ids"])


def _runner(tiny_base: Path, graphs: str, cpu_kernels: bool = True) -> ModelRunner:
    loaded = load_base_model(Settings(base_model=str(tiny_base), base_model_aliases=[TINY_ID]))
    return ModelRunner(loaded, limits=CacheLimits(decode_graphs=graphs, cpu_kernels=cpu_kernels))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dynamic_runner(tiny_base: Path) -> ModelRunner:
    return _runner(tiny_base, "off")


def _graphs(runner: ModelRunner) -> DecodeGraphs:
    assert runner.owned is not None and runner.owned.decode_graphs is not None
    return runner.owned.decode_graphs


def test_buckets() -> None:
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_sizes(3) == [1, 2, 3] and batch_sizes(1) == [1] and batch_sizes(12) == [1, 2, 4, 8, 12]
    assert [length_bucket(n, 3328) for n in (1, 64, 65, 300, 3000)] == [64, 64, 128, 512, 3328]
    assert length_bucket(100, 80) == 80


def test_graphs_are_off_unless_asked_for(tiny_loaded: object) -> None:
    runner = ModelRunner(tiny_loaded)  # type: ignore[arg-type]
    assert runner.owned is not None and runner.owned.decode_graphs is None


@pytest.mark.parametrize("ops", ["fused kernels", "torch ops"])
def test_static_decode_steps_give_the_dynamic_steps_text_for_every_kind(tiny_base: Path, dynamic_runner: ModelRunner,
                                                                      store: AdapterStore, ops: str) -> None:
    runner = _runner(tiny_base, "on", cpu_kernels=ops == "fused kernels")
    texts = []
    for each in (runner, dynamic_runner):
        adapters = [each.load(store.get(name)) if name else None for name, _, _ in ROWS]
        assert all(each.owned is not None and each.owned.adapters.serves(a) for a in adapters)
        texts.append([g.text for g in generate(each, adapters, [_job(each, p, n) for _, p, n in ROWS])])
        for adapter in adapters:
            if adapter is not None:
                each.unload(adapter)
    assert texts[0] == texts[1]
    assert len(set(texts[0])) > 4  # the adapters act: their rows do not all say the base's words
    assert _graphs(runner).built >= 2  # several sizes as rows left


def test_rows_joining_and_leaving_around_holes(tiny_base: Path, dynamic_runner: ModelRunner,
                                               store: AdapterStore) -> None:
    """Rows of different lengths leave holes below the highest slot in use; rows that join mid-generation take
    them (prefilled on the dynamic step, then decoding in the static one). Each row's text is its text alone."""
    runner = _runner(tiny_base, "on")
    names = ["lora-gen", None, "prefix-gen", "ia3-gen", "lora-gen-mlp", None]
    lengths = [3, 12, 5, 10, 2, 9]
    expected = []
    for name, n in zip(names, lengths):
        adapter = dynamic_runner.load(store.get(name)) if name else None
        expected.append(generate(dynamic_runner, [adapter], [_job(dynamic_runner, f"row {name} says", n)])[0].text)
        if adapter is not None:
            dynamic_runner.unload(adapter)
    adapters = [runner.load(store.get(name)) if name else None for name in names]
    jobs = [_job(runner, f"row {name} says", n) for name, n in zip(names, lengths)]
    engines = Engines(runner)
    events = engines.step([(i, adapters[i], jobs[i]) for i in range(4)])
    for _ in range(4):
        events += engines.step()
    events += engines.step([(i, adapters[i], jobs[i]) for i in range(4, 6)])  # join after rows 0 and 2 left
    while engines.active:
        events += engines.step()
    done = {e.handle: e.generation.text for e in events if isinstance(e, DoneEvent)}
    assert done == dict(enumerate(expected))


def test_a_step_run_twice_gives_the_same_state_and_cache(tiny_base: Path, store: AdapterStore) -> None:
    """A capture runs the step once to warm up, then the replay runs it again on the same buffers: the second run
    must see the same inputs (the residual stream is not the input buffer) and write the same keys/values."""
    runner = _runner(tiny_base, "on", cpu_kernels=False)
    graphs = _graphs(runner)
    adapter = runner.load(store.get("lora-gen"))
    engines = Engines(runner)
    engines.step([(0, adapter, _job(runner, "warm up the rows", 20)), (1, None, _job(runner, "and this one", 20))])
    for _ in range(3):
        engines.step()
    assert runner.owned is not None
    cache = runner.owned.cache
    lora, ia3 = runner.owned.adapters.pool_slots([adapter, None])
    embeddings = torch.randn(2, runner.owned.forward.embed.shape[1])
    positions = [row.next_position for row in engines.owned._rows]
    graphs(embeddings, [0, 1], positions, lora, ia3)  # fills the buffers
    length = length_bucket(max(positions) + 1, cache.shape.slot_tokens)
    step = graphs._step(_Key(2, length, True, False))
    with torch.inference_mode():
        first = step()
        keys = [k[:2, :, :length].clone() for k in cache.keys]  # what the step reads (zeroed past the rows)
        second = step()
    assert torch.equal(first, second)
    assert all(torch.equal(k[:2, :, :length], kept) for k, kept in zip(cache.keys, keys))
    engines.owned.abort()


def test_a_pool_whose_tensors_move_drops_the_steps(tiny_base: Path, dynamic_runner: ModelRunner,
                                                   store: AdapterStore) -> None:
    """A graph reads the pool tensors it was captured over: an adapter written into existing stacks keeps the
    steps, one that adds a module's stack (or a larger rank) drops them all. (On a CPU the eager step reads the
    pools afresh each time, so only the bookkeeping shows here.)"""
    runner = _runner(tiny_base, "on")
    graphs = _graphs(runner)
    first = runner.load(store.get("lora-gen"))
    generate(runner, [first], [_job(runner, "the same prompt", 6)])
    built = graphs.built
    generate(runner, [first], [_job(runner, "the same prompt", 6)])
    assert graphs.built == built and graphs.dropped == 0  # same keys, same pools: reused
    second = runner.load(store.get("lora-gen-mlp"))  # LoRA on modules the pool had no stack for
    mine = generate(runner, [first, second], [_job(runner, "the same prompt", 6)] * 2)
    assert graphs.dropped == 1
    theirs_adapters = [dynamic_runner.load(store.get(n)) for n in ("lora-gen", "lora-gen-mlp")]
    theirs = generate(dynamic_runner, theirs_adapters, [_job(dynamic_runner, "the same prompt", 6)] * 2)
    for adapter in theirs_adapters:
        dynamic_runner.unload(adapter)
    assert [g.text for g in mine] == [g.text for g in theirs]


def test_a_retried_group_leaves_other_rows_entries_alone(tiny_base: Path, dynamic_runner: ModelRunner,
                                                         store: AdapterStore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed step is run again one adapter group at a time; a decode-only group then takes the static step
    with the other rows (one mid-prefill, in a lower slot) as holes, whose writes must not touch their entries."""
    long_prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " * 3
    specs = [(None, "first row", 3), ("lora-gen", "second row", 30), (None, long_prompt, 10), (None, "fourth", 25)]
    expected = []
    for name, prompt, n in specs:
        adapter = dynamic_runner.load(store.get(name)) if name else None
        expected.append(generate(dynamic_runner, [adapter], [_job(dynamic_runner, prompt, n)])[0].text)
        if adapter is not None:
            dynamic_runner.unload(adapter)
    runner = _runner(tiny_base, "on", cpu_kernels=False)
    adapters = [runner.load(store.get(name)) if name else None for name, _, _ in specs]
    jobs = [_job(runner, prompt, n) for _, prompt, n in specs]
    run = engine_module.OwnedEngine._run
    failed: list[int] = []

    def failing_once_mid_prefill(self: engine_module.OwnedEngine, plan: tuple, events: list) -> None:
        decode, chunks = plan
        groups = {id(row.adapter) for row in decode} | {id(row.adapter) for row, _ in chunks}
        if len(failed) < 3 and any(row.fed > 0 for row, _ in chunks) and len(groups) > 1:
            failed.append(1)
            sample = self._runner.sample
            self._runner.sample = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("injected"))
            try:  # fails after the forward wrote the cache, before anything counts
                return run(self, plan, events)
            finally:
                self._runner.sample = sample
        return run(self, plan, events)

    monkeypatch.setattr(engine_module.OwnedEngine, "_run", failing_once_mid_prefill)
    engines = Engines(runner)
    events = engines.step([(i, adapters[i], jobs[i]) for i in (0, 1, 3)])
    while engines.owned._rows and engines.owned._rows[0].slot == 0:
        events += engines.step()
    events += engines.step([(2, adapters[2], jobs[2])])  # the long prompt joins in slot 0, below the LoRA row
    while engines.active:
        events += engines.step()
    assert failed
    assert {e.handle: e.generation.text for e in events if isinstance(e, DoneEvent)} == dict(enumerate(expected))


def test_cache_memory_holding_nan_is_never_read_unmasked(tiny_base: Path) -> None:
    """The cache is allocated empty (it may hold NaN bit patterns); the static step zeroes what it reads ahead."""
    texts = []
    for graphs in ("on", "off"):
        runner = _runner(tiny_base, graphs, cpu_kernels=False)
        assert runner.owned is not None
        for keys, values in zip(runner.owned.cache.keys, runner.owned.cache.values):
            keys.fill_(float("nan"))
            values.fill_(float("nan"))
        jobs = [_job(runner, p, n) for p, n in (("a", 3), ("bb cc", 9), ("dd", 6))]
        texts.append([g.text for g in generate(runner, [None] * 3, jobs)])
    assert texts[0] == texts[1]


def test_a_row_whose_adapter_breaks_mid_decode_fails_alone(tiny_base: Path, dynamic_runner: ModelRunner,
                                                           store: AdapterStore) -> None:
    """NaN written into one LoRA adapter's pool slot between decode steps: its row's logits go non-finite, the step
    is taken back and run again by adapter group, and only that row fails; the others finish as they would alone."""
    rows = [("lora-gen", "the row that breaks", 12), ("prefix-gen", "a prefix row", 10), (None, "a base row", 9),
            ("lora-gen-mlp", "another lora", 11)]
    expected = {}
    for index, (name, prompt, n) in enumerate(rows):
        adapter = dynamic_runner.load(store.get(name)) if name else None
        expected[index] = generate(dynamic_runner, [adapter], [_job(dynamic_runner, prompt, n)])[0].text
        if adapter is not None:
            dynamic_runner.unload(adapter)
    runner = _runner(tiny_base, "on")
    adapters = [runner.load(store.get(name)) if name else None for name, _, _ in rows]
    engines = Engines(runner)
    events = engines.step([(i, adapters[i], _job(runner, p, n)) for i, (_, p, n) in enumerate(rows)])
    for _ in range(3):
        events += engines.step()
    assert _graphs(runner).built >= 1
    gathered = runner.gathered
    slot = gathered.slots([adapters[0].peft_name])[0]  # type: ignore[union-attr]
    for module in runner.owned.forward.modules[0].values():  # type: ignore[union-attr]
        stack = gathered.stack(module)
        if stack is not None and stack.ranks[slot] > 0:
            stack.a[slot] = float("nan")
    while engines.active:
        events += engines.step()
    failed = [e.handle for e in events if isinstance(e, FailedEvent)]
    assert failed == [0]
    done = {e.handle: e.generation.text for e in events if isinstance(e, DoneEvent)}
    assert done == {i: text for i, text in expected.items() if i != 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (none here: unverified)")
def test_decode_steps_captured_on_cuda_give_the_dynamic_steps_text(tiny_base: Path, store: AdapterStore) -> None:
    texts = []
    for graphs in ("on", "off"):
        loaded = load_base_model(Settings(base_model=str(tiny_base), base_model_aliases=[TINY_ID], device="cuda"))
        runner = ModelRunner(loaded, limits=CacheLimits(decode_graphs=graphs))  # type: ignore[arg-type]
        adapters = [runner.load(store.get(name)) if name else None for name, _, _ in ROWS]
        texts.append([g.text for g in generate(runner, adapters, [_job(runner, p, n) for _, p, n in ROWS])])
        if graphs == "on":
            assert _graphs(runner).built >= 2 and _graphs(runner).failed_captures == 0
    assert texts[0] == texts[1]
