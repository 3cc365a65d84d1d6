"""The owned forward: same answers as the transformers path, the base's weights held once, admission by the
cache's free space, and a fault in one row's adapter mid-prefill failing that row alone."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.domain import GenerationParams
from service.errors import InvalidRequest
from service.model.events import DoneEvent, FailedEvent, TokenEvent
from service.model.generation import Engines, generate
from service.model.loading import load_base_model
from service.model.owned.engine import OwnedEngine
from service.model.owned.ops import KernelOps, TorchOps
from service.model.owned.slot_cache import CacheLimits, CacheShape, SlotCache
from service.model.runner import GenerationJob, ModelRunner
from service.settings import Settings
from service.store.store import AdapterStore
from tests.conftest import TINY_ID, make_adapter

ROWS = [("lora-gen", "hello world", 6), ("prefix-gen", "a longer prompt for the prefix row", 9), (None, "base", 7),
        ("prompt-gen", "prompt tuned", 5), ("ia3-gen", "ia3 row", 6), ("ia3-attn-gen", "scales an input", 5),
        ("adalora-gen", "adalora", 6), ("lora-gen-mlp", "mlp lora", 8)]


def _job(runner: ModelRunner, prompt: str, n: int) -> GenerationJob:
    return GenerationJob(GenerationParams(prompt=prompt, max_new_tokens=n), runner.base.tokenizer(prompt)["input_ids"])


@pytest.fixture(scope="module")
def transformers_runner(tiny_base: Path) -> ModelRunner:
    loaded = load_base_model(Settings(base_model=str(tiny_base), base_model_aliases=[TINY_ID]))
    return ModelRunner(loaded, forward="transformers")


@pytest.fixture(scope="module")
def torch_ops_runner(tiny_base: Path) -> ModelRunner:
    loaded = load_base_model(Settings(base_model=str(tiny_base), base_model_aliases=[TINY_ID]))
    return ModelRunner(loaded, limits=CacheLimits(cpu_kernels=False))


@pytest.mark.parametrize("ops", ["fused kernels", "torch ops"])
def test_owned_and_transformers_paths_agree_on_a_mixed_batch(runner: ModelRunner, torch_ops_runner: ModelRunner,
                                                             transformers_runner: ModelRunner, store: AdapterStore,
                                                             ops: str) -> None:
    owned = runner if ops == "fused kernels" else torch_ops_runner
    assert owned.owned is not None and transformers_runner.owned is None
    expected = KernelOps if ops == "fused kernels" and shutil.which("c++") else TorchOps
    assert isinstance(owned.owned.forward.ops, expected)
    texts = []
    for each in (owned, transformers_runner):
        adapters = [each.load(store.get(name)) if name else None for name, _, _ in ROWS]
        texts.append([g.text for g in generate(each, adapters, [_job(each, p, n) for _, p, n in ROWS])])
        for adapter in adapters:
            if adapter is not None:
                each.unload(adapter)
    assert texts[0] == texts[1]


def test_rows_go_to_the_engine_that_computes_their_adapter(runner: ModelRunner, store: AdapterStore) -> None:
    engines = Engines(runner)
    owned = runner.load(store.get("ia3-gen"))  # scales k/v outputs and down_proj's input: owned
    other = runner.load(store.get("ia3-attn-gen"))  # scales up_proj's input, shared by the fused gate/up matmul
    try:
        assert engines.takes(None) and engines.takes(owned) and not engines.takes(other)
    finally:
        runner.unload(owned)
        runner.unload(other)


def test_base_weights_are_held_once(runner: ModelRunner) -> None:
    """The HF modules' weights are views into the owned forward's fused matrices, not copies."""
    assert runner.owned is not None
    forward = runner.owned.forward
    attention = runner.base.model.model.layers[0].self_attn
    q_proj = getattr(attention.q_proj, "base_layer", attention.q_proj)
    assert q_proj.weight.untyped_storage().data_ptr() == forward.layers[0].qkv.weight.untyped_storage().data_ptr()
    mlp = runner.base.model.model.layers[0].mlp
    up_proj = getattr(mlp.up_proj, "base_layer", mlp.up_proj)
    assert up_proj.weight.untyped_storage().data_ptr() == forward.layers[0].gate_up.weight.untyped_storage().data_ptr()


@pytest.fixture
def small_cache(runner: ModelRunner) -> Iterator[SlotCache]:
    """A cache with room for 40 tokens of rows at once."""
    assert runner.owned is not None
    kept = runner.owned.cache
    shape = kept.shape
    runner.owned.cache = SlotCache(CacheShape(layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                                              slots=8, slot_tokens=40, budget_tokens=40),
                                   kept.keys[0].dtype, runner.base.device)
    yield runner.owned.cache
    runner.owned.cache = kept


def test_requests_wait_for_cache_room_and_too_large_ones_never_fit(runner: ModelRunner,
                                                                   small_cache: SlotCache) -> None:
    jobs = [_job(runner, f"request number {i}", 12) for i in range(4)]  # about 16 tokens each: two fit at once
    expected = [generate(runner, [None], [job])[0].text for job in jobs]
    engine = OwnedEngine(runner, runner.owned)
    events = engine.step([(i, None, job) for i, job in enumerate(jobs)])
    most_running = 0
    while engine.active:
        most_running = max(most_running, small_cache.shape.slots - small_cache.free_slots)
        assert small_cache.reserved_tokens <= small_cache.shape.budget_tokens
        events += engine.step()
    assert most_running == 2
    done = {e.handle: e.generation.text for e in events if isinstance(e, DoneEvent)}
    assert done == dict(enumerate(expected))
    assert not engine.fits(None, _job(runner, "far too long for this cache", 39))


def test_a_fault_mid_prefill_fails_that_row_alone(runner: ModelRunner, store: AdapterStore) -> None:
    assert runner.owned is not None
    names = ["lora-gen", "prompt-gen", None]
    adapters = [runner.load(store.get(name)) if name else None for name in names]
    jobs = [_job(runner, "a prompt long enough to take several steps", 6) for _ in names]
    expected = [generate(runner, [adapter], [job])[0].text for adapter, job in zip(adapters, jobs)]
    budget, runner.owned.max_batch_tokens = runner.owned.max_batch_tokens, 4
    try:
        engine = OwnedEngine(runner, runner.owned)
        events = engine.step(list(zip(range(3), adapters, jobs)))
        good = adapters[1].virtual_tokens
        adapters[1].virtual_tokens = good[:, :-1]  # its embeddings no longer fit the base's hidden size
        while engine.active:
            events += engine.step()
        adapters[1].virtual_tokens = good
    finally:
        runner.owned.max_batch_tokens = budget
    assert [e.handle for e in events if isinstance(e, FailedEvent)] == [1]
    assert {e.handle: e.generation.text for e in events if isinstance(e, DoneEvent)} == {0: expected[0],
                                                                                          2: expected[2]}
    assert runner.owned.cache.free_slots == runner.owned.cache.shape.slots
    for adapter in adapters:
        if adapter is not None:
            runner.unload(adapter)


def test_prefix_keys_are_written_into_the_slot_once(runner: ModelRunner, store: AdapterStore) -> None:
    assert runner.owned is not None
    adapter = runner.load(store.get("prefix-gen"))
    engine = OwnedEngine(runner, runner.owned)
    engine.step([(0, adapter, _job(runner, "prefix", 4))])
    row = engine._rows[0]
    keys = runner.owned.cache.keys[0][row.slot, :, :adapter.num_virtual_tokens]
    assert torch.equal(keys, adapter.prefix[0][0][0])
    engine.abort()
    runner.unload(adapter)


def test_a_prefetched_adapter_loads_without_reading_its_files(runner: ModelRunner, store: AdapterStore,
                                                              tmp_path: Path) -> None:
    """Reading and preparing happen at prefetch (a request's thread); the model thread's load only installs."""
    job = _job(runner, "prefetched", 6)
    normal = runner.load(store.get("lora-gen"))
    expected = generate(runner, [normal], [job])[0].text
    runner.unload(normal)
    copy = tmp_path / "store"
    shutil.copytree(store.root / "lora-gen", copy / "lora-gen")
    info = AdapterStore(copy, runner.base.names_base).get("lora-gen")
    runner.prefetch(info)
    shutil.rmtree(copy / "lora-gen")
    adapter = runner.load(info)
    assert generate(runner, [adapter], [_job(runner, "prefetched", 6)])[0].text == expected
    runner.unload(adapter)


def test_ia3_input_and_output_scales_of_one_module_coexist(runner: ModelRunner, transformers_runner: ModelRunner,
                                                          store: AdapterStore, tiny_base: Path,
                                                          tmp_path: Path) -> None:
    """PEFT's Llama default scales down_proj's input; another adapter scaling its output must not hide that."""
    make_adapter(tiny_base, tmp_path / "ia3-down-out", "ia3", "gen", seed=21, target_modules=["down_proj"],
                 feedforward_modules=[])
    other_store = AdapterStore(tmp_path, runner.base.names_base)
    job = _job(runner, "scaled twice over", 8)
    alone = runner.load(store.get("ia3-gen"))
    expected = generate(runner, [alone], [job])[0].text
    other = runner.load(other_store.get("ia3-down-out"))
    try:
        assert generate(runner, [alone], [_job(runner, "scaled twice over", 8)])[0].text == expected
        reference = transformers_runner.load(store.get("ia3-gen"))
        assert generate(transformers_runner, [reference], [_job(runner, "scaled twice over", 8)])[0].text == expected
        transformers_runner.unload(reference)
    finally:
        runner.unload(other)
        runner.unload(alone)


def test_a_request_the_cache_can_never_hold_fails_instead_of_waiting(runner: ModelRunner,
                                                                     small_cache: SlotCache) -> None:
    with pytest.raises(InvalidRequest, match="KV cache"):
        generate(runner, [None], [_job(runner, "far too long for this cache", 39)])


def test_a_released_slot_is_zeroed_again_before_the_next_row_reads_it(small_cache: SlotCache) -> None:
    slot = small_cache.claim(10)
    assert slot is not None
    small_cache.mark_written(slot, 10)
    small_cache.keys[0][slot, :, :10] = float("nan")  # what a broken adapter's row may leave behind
    small_cache.release(slot)
    again = small_cache.claim(4)
    assert again == slot
    small_cache.mark_written(slot, 4)
    small_cache.ensure_finite(slot, slot + 1, 10)
    assert torch.isfinite(small_cache.keys[0][slot, :, 4:10]).all()


def test_non_finite_logits_fail_the_step(runner: ModelRunner) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for bad in (float("nan"), float("inf")):
            logits = torch.zeros(2, 8, dtype=dtype)
            logits[1, 3] = bad
            with pytest.raises(FloatingPointError):
                runner.sample(logits, [(GenerationParams(prompt="x"), None)] * 2)


def test_a_long_prompt_is_spread_over_steps_beside_streaming_rows(runner: ModelRunner) -> None:
    """Steady state: a row joining streaming ones brings at most six prompt tokens per streaming row (16 at least)
    into a step, so the streaming rows' steps stay short, and they decode a token every step meanwhile."""
    assert runner.owned is not None
    engine = OwnedEngine(runner, runner.owned)
    engine.step([(index, None, _job(runner, f"streaming row {index}", 200)) for index in range(4)])
    while any(row.prefilling for row in engine._rows):
        engine.step()
    long_prompt = _job(runner, " ".join(["word"] * 200), 2)
    assert len(long_prompt.prompt_ids) >= 160
    streaming = {row.handle: row for row in engine._rows}
    before = {handle: len(row.generated) for handle, row in streaming.items()}
    engine.step([(9, None, long_prompt)])
    steps = 1
    while any(row.handle == 9 and row.prefilling for row in engine._rows):
        engine.step()
        steps += 1
        assert steps < 100
    tokens = len(long_prompt.prompt_ids)
    assert -(-tokens // 24) <= steps <= -(-tokens // 24) + 1  # 24 prompt tokens a step beside 4 streaming rows
    running = [row for row in streaming.values() if row in engine._rows]
    assert running and all(len(row.generated) - before[row.handle] == steps for row in running)  # none stalled
    engine.abort()


def test_a_burst_of_short_prompts_joins_few_streaming_rows_in_one_step(runner: ModelRunner) -> None:
    """Joining rows outnumbering the streaming ones twice over, with prompts that fit one step, start together:
    the first to arrive do not hold the rest of their wave to a trickle."""
    assert runner.owned is not None
    engine = OwnedEngine(runner, runner.owned)
    engine.step([(0, None, _job(runner, "a streaming row", 200))])
    while any(row.prefilling for row in engine._rows):
        engine.step()
    burst = {index: _job(runner, " ".join(["short prompt"] * 8), 4) for index in range(1, 9)}
    assert sum(len(job.prompt_ids) for job in burst.values()) > 96  # past the cap a steady state would have
    events = engine.step([(index, None, job) for index, job in burst.items()])
    started = {event.handle for event in events if isinstance(event, TokenEvent)}
    assert set(burst) <= started
    engine.abort()
