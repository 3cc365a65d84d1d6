"""The service calls transformers and PEFT through their current APIs: no deprecation warnings from serving."""

from __future__ import annotations

import warnings

import torch

from service.domain import GenerationParams
from service.model.compat import cache_keyword
from service.model.generation import generate
from service.model.runner import GenerationJob, ModelRunner
from service.store.store import AdapterStore


class _NewStyle(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, cache: object = None, past_key_values: object = None) -> None: ...


class _OldStyle(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, past_key_values: object = None) -> None: ...


def test_cache_keyword_prefers_the_current_name() -> None:
    assert cache_keyword(_NewStyle()) == "cache"
    assert cache_keyword(_OldStyle()) == "past_key_values"


def test_installed_backbone_takes_the_keyword_chosen(runner: ModelRunner) -> None:
    import inspect

    backbone = runner.base.model.base_model
    assert cache_keyword(backbone) in inspect.signature(backbone.forward).parameters


def test_serving_every_kind_raises_no_deprecation_warning(runner: ModelRunner, store: AdapterStore) -> None:
    tokenizer = runner.base.tokenizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = {name: runner.load(store.get(name)) for name in
                  ("lora-cls", "prefix-cls", "lora-gen", "prefix-gen", "prefix-proj-gen")}
        runner.classify([loaded["lora-cls"], loaded["prefix-cls"]],
                        [tokenizer("one")["input_ids"], tokenizer("two words")["input_ids"]])
        jobs = [GenerationJob(GenerationParams(prompt=p, max_new_tokens=4), tokenizer(p)["input_ids"])
                for p in ("a", "b c", "d e f", "g")]
        generate(runner, [loaded["lora-gen"], loaded["prefix-gen"], None, loaded["prefix-proj-gen"]], jobs)
        for adapter in loaded.values():
            runner.unload(adapter)
    deprecations = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                    if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))]
    assert not deprecations, deprecations
