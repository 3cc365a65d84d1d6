"""A forward failure is its adapter's alone: the step is taken back and retried without it, and every other row,
running or joining, finishes with its single-request answer (its KV cache kept)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from service.domain import AdapterInfo, AdapterKind, GenerationParams, Task
from service.model.adapters import LoadedAdapter
from service.model.engine import GenerationEngine
from service.model.events import DoneEvent, FailedEvent
from service.model.generation import generate
from service.model.runner import GenerationJob, ModelRunner
from service.store.store import AdapterStore

ROWS = [("lora-gen", "the first request runs long", 14), ("prefix-gen", "a prefix row", 12), (None, "base row", 10),
        ("lora-gen-mlp", "the one that breaks", 12), ("prefix-proj-gen", "projected prefix", 9)]


def _job(runner: ModelRunner, prompt: str, n: int) -> GenerationJob:
    return GenerationJob(GenerationParams(prompt=prompt, max_new_tokens=n), runner.base.tokenizer(prompt)["input_ids"])


def break_lora(runner: ModelRunner, adapter: LoadedAdapter) -> None:
    """A real fault in one adapter's forward: its PEFT LoRA A matrices get a shape no input fits."""
    for module in runner.lora_host.peft_model.modules():
        if hasattr(module, "lora_A") and adapter.peft_name in module.lora_A:
            linear = module.lora_A[adapter.peft_name]
            linear.weight = torch.nn.Parameter(torch.zeros(linear.weight.shape[0], linear.weight.shape[1] + 1),
                                               requires_grad=False)


def break_prefix(adapter: LoadedAdapter) -> None:
    """A real fault in a prefix adapter: its key/values lose a dimension of the head size."""
    adapter.prefix = [(k[..., :-1], v[..., :-1]) for k, v in adapter.prefix]


@pytest.fixture
def peft_kernel(runner: ModelRunner) -> Iterator[None]:
    runner.lora_kernel = "peft"  # the per-adapter PEFT path, where one adapter's broken weights fail its rows only
    yield
    runner.lora_kernel = "gathered"


def test_a_row_failing_mid_decode_leaves_the_others_running(runner: ModelRunner, store: AdapterStore,
                                                           peft_kernel: None) -> None:
    loaded = {name: runner.load(store.get(name)) for name, _, _ in ROWS if name}
    expected = {i: generate(runner, [loaded.get(name)], [_job(runner, p, n)])[0].text
                for i, (name, p, n) in enumerate(ROWS)}
    engine = GenerationEngine(runner)
    events = engine.step([(i, loaded.get(name), _job(runner, p, n)) for i, (name, p, n) in enumerate(ROWS)])
    events += engine.step()
    break_lora(runner, loaded["lora-gen-mlp"])  # between steps: its rows are running, with a KV cache
    while engine.active:
        events += engine.step()
    done = {e.handle: e.generation.text for e in events if isinstance(e, DoneEvent)}
    failed = [e for e in events if isinstance(e, FailedEvent)]
    assert [(e.handle, e.adapter) for e in failed] == [(3, loaded["lora-gen-mlp"])]
    assert done == {i: text for i, text in expected.items() if i != 3}
    for adapter in loaded.values():
        runner.unload(adapter)


def test_a_joining_row_that_fails_prefill_fails_alone(runner: ModelRunner, store: AdapterStore) -> None:
    loaded = {name: runner.load(store.get(name)) for name, _, _ in ROWS if name}
    expected = {i: generate(runner, [loaded.get(name)], [_job(runner, p, n)])[0].text
                for i, (name, p, n) in enumerate(ROWS)}
    break_prefix(loaded["prefix-proj-gen"])
    engine = GenerationEngine(runner)
    events = engine.step([(i, loaded.get(name), _job(runner, p, n)) for i, (name, p, n) in enumerate(ROWS[:2])])
    events += engine.step([(i, loaded.get(name), _job(runner, p, n)) for i, (name, p, n) in enumerate(ROWS) if i >= 2])
    while engine.active:
        events += engine.step()
    done = {e.handle: e.generation.text for e in events if isinstance(e, DoneEvent)}
    assert [e.handle for e in events if isinstance(e, FailedEvent)] == [4]
    assert done == {i: text for i, text in expected.items() if i != 4}
    for adapter in loaded.values():
        runner.unload(adapter)


def test_generate_raises_a_row_failure_unless_asked_to_report_it(runner: ModelRunner, store: AdapterStore) -> None:
    adapter = runner.load(store.get("prefix-gen"))
    break_prefix(adapter)
    jobs = [_job(runner, "one", 3), _job(runner, "two", 3)]
    with pytest.raises(RuntimeError):
        generate(runner, [adapter, None], jobs)
    reported: list[int] = []
    results = generate(runner, [adapter, None], jobs, on_failure=lambda row, event: reported.append(row))
    assert reported == [0] and results[0] is None and results[1] is not None
    runner.unload(adapter)


def test_a_pool_insert_that_fails_halfway_leaves_nothing_for_the_next_adapter(runner: ModelRunner) -> None:
    """A bad shape on the second layer must not leave the first layer's delta in the slot the next adapter gets."""
    layers = [runner.base.model.get_submodule(f"model.layers.{i}.self_attn.q_proj") for i in (0, 1)]
    width = layers[0].in_features
    good = (layers[0], torch.ones(2, width), torch.ones(layers[0].out_features, 2))
    bad = (layers[1], torch.ones(2, width + 1), torch.ones(layers[1].out_features, 2))
    with pytest.raises(RuntimeError):
        runner.gathered.add_entries("half", [good, bad])
    assert "half" not in runner.gathered
    only_second = (layers[1], torch.zeros(2, width), torch.zeros(layers[1].out_features, 2))
    runner.gathered.add_entries("next", [only_second])
    tokenizer = runner.base.tokenizer
    job = [GenerationJob(GenerationParams(prompt="hello", max_new_tokens=5), tokenizer("hello")["input_ids"])]
    info = AdapterInfo(name="next", kind=AdapterKind.LORA, task=Task.GENERATION, path="", rank=2,
                       num_virtual_tokens=None, labels=None, size_bytes=0, sha256="0" * 64,
                       base_model_name_or_path=None)
    zero_delta = LoadedAdapter(info=info, peft_name="next")
    assert generate(runner, [zero_delta], job)[0].text == generate(runner, [None], job)[0].text
    runner.gathered.remove("next")
