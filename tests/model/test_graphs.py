"""Decode steps in static shapes (what a CUDA graph replays), run eagerly on the CPU: the same greedy text as the
dynamic step for every adapter kind, with holes, joins and leaves, and set up again when a pool's tensors move."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.domain import GenerationParams
from service.model.events import DoneEvent
from service.model.generation import Engines, generate
from service.model.loading import load_base_model
from service.model.owned.graphs import DecodeGraphs, batch_sizes, length_bucket
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


def test_graphs_are_off_on_a_cpu_unless_asked_for(dynamic_runner: ModelRunner, tiny_base: Path) -> None:
    assert dynamic_runner.owned is not None and dynamic_runner.owned.decode_graphs is None
    auto = _runner(tiny_base, "auto")
    assert auto.owned is not None and auto.owned.decode_graphs is None


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


def test_a_pool_whose_tensors_move_sets_the_steps_up_again(tiny_base: Path, dynamic_runner: ModelRunner,
                                                           store: AdapterStore) -> None:
    runner = _runner(tiny_base, "on")
    graphs = _graphs(runner)
    first = runner.load(store.get("lora-gen"))
    job = _job(runner, "the same prompt", 6)
    generate(runner, [first], [job])
    built = graphs.built
    generate(runner, [first], [_job(runner, "the same prompt", 6)])
    assert graphs.built == built  # same key, same pools: reused
    second = runner.load(store.get("lora-gen-mlp"))  # LoRA on modules the pool had no stack for
    mine = generate(runner, [first, second], [_job(runner, "the same prompt", 6)] * 2)
    assert graphs.built > built
    theirs_adapters = [dynamic_runner.load(store.get(n)) for n in ("lora-gen", "lora-gen-mlp")]
    theirs = generate(dynamic_runner, theirs_adapters, [_job(dynamic_runner, "the same prompt", 6)] * 2)
    for adapter in theirs_adapters:
        dynamic_runner.unload(adapter)
    assert [g.text for g in mine] == [g.text for g in theirs]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (none here: unverified)")
def test_decode_steps_are_captured_and_replayed_on_cuda(tiny_base: Path, store: AdapterStore) -> None:
    loaded = load_base_model(Settings(base_model=str(tiny_base), base_model_aliases=[TINY_ID], device="cuda"))
    runner = ModelRunner(loaded, limits=CacheLimits(decode_graphs="auto"))
    graphs = _graphs(runner)
    adapter = runner.load(store.get("lora-gen"))
    texts = [g.text for g in generate(runner, [adapter, None], [_job(runner, "hello", 8)] * 2)]
    assert graphs.built >= 1 and all(texts)
