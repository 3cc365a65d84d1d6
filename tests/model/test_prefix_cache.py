"""Prompts that start the same way reuse the keys/values of earlier prefills (per adapter version), and give the
text a runner without that cache gives."""

from __future__ import annotations

import pytest

from service.domain import GenerationParams
from service.model.generation import generate
from service.model.loading import BaseModel
from service.model.owned.prefix_cache import BLOCK_TOKENS
from service.model.owned.slot_cache import CacheLimits
from service.model.runner import GenerationJob, ModelRunner
from service.store.store import AdapterStore

SHARED = ("Once upon a time in a kingdom by the sea there lived a princess who kept a lighthouse and a cat, "
          "and every night she counted the ships")


@pytest.fixture(scope="module")
def cached(tiny_loaded: BaseModel) -> ModelRunner:
    return ModelRunner(tiny_loaded, limits=CacheLimits(prefix_cache_bytes=64 * 1024**2))


def _texts(runner: ModelRunner, adapters: list, prompts: list[str], tokens: int = 8) -> list[str]:
    tokenizer = runner.base.tokenizer
    jobs = [GenerationJob(GenerationParams(prompt=p, max_new_tokens=tokens), tokenizer(p)["input_ids"])
            for p in prompts]
    return [g.text for g in generate(runner, adapters, jobs)]


def test_a_repeated_or_extended_prompt_skips_its_cached_blocks_with_the_same_text(cached: ModelRunner,
                                                                                  runner: ModelRunner) -> None:
    assert cached.owned is not None
    prefixes = cached.owned.prefixes
    prompts = [SHARED, SHARED + " until the morning came", "something else entirely"]
    expected = [_texts(runner, [None], [prompt])[0] for prompt in prompts]
    before = prefixes.hit_tokens
    assert _texts(cached, [None], prompts[:1]) == expected[:1]  # first time: computed, then kept
    assert prefixes.hit_tokens == before
    assert prefixes.nbytes > 0
    assert _texts(cached, [None], prompts[:1]) == expected[:1]
    length = len(cached.base.tokenizer(SHARED)["input_ids"])
    assert prefixes.hit_tokens - before == (length - 1) // BLOCK_TOKENS * BLOCK_TOKENS  # never the last input
    hits = prefixes.hit_tokens
    assert _texts(cached, [None, None], prompts[1:]) == expected[1:]  # beside a prompt with nothing cached
    assert prefixes.hit_tokens - hits >= BLOCK_TOKENS


@pytest.mark.parametrize("name", ["lora-gen", "prefix-gen", "prompt-gen", "ia3-gen"])
def test_an_adapter_row_reuses_only_its_own_adapters_blocks(cached: ModelRunner, runner: ModelRunner,
                                                            store: AdapterStore, name: str) -> None:
    """The base's blocks of a prompt are not an adapter's (its keys/values differ); its own are, on a repeat."""
    assert cached.owned is not None
    prefixes = cached.owned.prefixes
    plain = runner.load(store.get(name))
    expected = _texts(runner, [plain, None], [SHARED, SHARED])
    runner.unload(plain)
    adapter = cached.load(store.get(name))
    try:
        _texts(cached, [None], [SHARED])  # the base's blocks of the prompt, held
        before = prefixes.hit_tokens
        first = _texts(cached, [adapter], [SHARED])
        assert first == expected[:1]
        adapter_hits = prefixes.hit_tokens - before
        assert adapter_hits == 0
        assert _texts(cached, [adapter, None], [SHARED, SHARED]) == expected  # both repeats hit their own
        assert prefixes.hit_tokens > before
    finally:
        cached.unload(adapter)


def test_the_budget_bounds_what_is_kept(tiny_loaded: BaseModel) -> None:
    small = ModelRunner(tiny_loaded, limits=CacheLimits(prefix_cache_bytes=1))
    assert small.owned is not None and not small.owned.prefixes.enabled
    _texts(small, [None], [SHARED])
    assert small.owned.prefixes.nbytes == 0
    shape = small.owned.cache.shape
    two_blocks = 2 * BLOCK_TOKENS * shape.bytes_per_token(small.owned.cache.keys[0].dtype)
    bounded = ModelRunner(tiny_loaded, limits=CacheLimits(prefix_cache_bytes=two_blocks))
    assert bounded.owned is not None
    _texts(bounded, [None, None], [SHARED, "a different prompt that is long enough to fill a block or two of it"])
    assert 0 < bounded.owned.prefixes.nbytes <= two_blocks
