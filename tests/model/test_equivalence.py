"""The runner's answers equal plain PEFT's for the same adapter and input, for every adapter kind, and differ from
the base's: equality alone would pass if both the service and the PEFT reference silently dropped the adapter (as
PEFT 0.21.2's prefix tuning does on transformers 5.24)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

from service.domain import GenerationParams
from service.model.adapters import LoadedAdapter
from service.model.generation import generate
from service.model.loading import load_base_model
from service.model.owned.slot_cache import CacheLimits
from service.model.runner import GenerationJob, ModelRunner
from service.settings import Settings
from service.store.store import AdapterStore
from tests.conftest import TINY_ID

TEXTS = [
    "hello world",
    "this is a much longer sentence with many more tokens than the first one, to make padding matter",
    "x",
    "Numbers 1 2 3 and symbols !? mixed in",
]
CLASSIFIERS = ["lora-cls", "lora-cls3", "prefix-cls", "prefix-proj-cls", "prompt-cls", "ptuning-cls", "ia3-cls",
               "adalora-cls"]
GENERATORS = ["lora-gen", "lora-gen-mlp", "prefix-gen", "prefix-proj-gen", "prompt-gen", "prompt-text-gen",
              "ptuning-mlp-gen", "ptuning-lstm-gen", "ia3-gen", "ia3-attn-gen", "adalora-gen"]


def _peft_classify(base: Path, adapter: Path, num_labels: int, text: str, tokenizer) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits, -1)[0]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classification_matches_peft(name: str, runner: ModelRunner, store: AdapterStore, tiny_base: Path,
                                     tiny_adapters: dict[str, Path]) -> None:
    info = store.get(name)
    adapter = runner.load(info)
    tokenizer = runner.base.tokenizer
    ours = runner.classify([adapter] * len(TEXTS), [tokenizer(t)["input_ids"] for t in TEXTS])  # one padded batch
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=len(info.labels)), tiny_adapters[name]
    ).eval()
    for text, probabilities in zip(TEXTS, ours):
        with torch.no_grad():
            expected = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits, -1)[0]
        assert torch.allclose(torch.tensor(probabilities), expected, atol=1e-4), (name, text)
    runner.unload(adapter)


@pytest.mark.parametrize("name", ["lora-tok", "prompt-tok", "prefix-tok", "ia3-tok"])
def test_token_classification_matches_peft_and_acts(name: str, runner: ModelRunner, store: AdapterStore,
                                                    tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    info = store.get(name)
    adapter = runner.load(info)
    tokenizer = runner.base.tokenizer
    inputs = [tokenizer(t)["input_ids"] for t in TEXTS]
    ours = runner.classify_tokens([adapter] * len(TEXTS), inputs)
    bare = runner.classify_tokens([LoadedAdapter(info=info, head=adapter.head)] * len(TEXTS), inputs)
    model = PeftModel.from_pretrained(
        AutoModelForTokenClassification.from_pretrained(tiny_base, num_labels=len(info.labels)), tiny_adapters[name]
    ).eval()
    for text, probabilities, on_base in zip(TEXTS, ours, bare):
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0, adapter.prompt_length:]
        assert torch.allclose(torch.tensor(probabilities), torch.softmax(logits, -1), atol=1e-4), (name, text)
        assert (torch.tensor(probabilities) - torch.tensor(on_base)).abs().max() > 1e-3, (name, text)
    runner.unload(adapter)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_changes_the_base_answer(name: str, runner: ModelRunner, store: AdapterStore) -> None:
    """The adapter's LoRA or prefix acts, not only its head: the same head on the bare base answers otherwise."""
    adapter = runner.load(store.get(name))
    head_only = LoadedAdapter(info=adapter.info, head=adapter.head)
    inputs = [runner.base.tokenizer(t)["input_ids"] for t in TEXTS]
    with_adapter = torch.tensor(runner.classify([adapter] * len(TEXTS), inputs))
    base_with_head = torch.tensor(runner.classify([head_only] * len(TEXTS), inputs))
    runner.unload(adapter)
    for text, ours, base in zip(TEXTS, with_adapter, base_with_head):
        assert (ours - base).abs().max() > 1e-3, (name, text, ours, base)


def _greedy_texts(runner: ModelRunner, adapter: LoadedAdapter | None, lengths: list[int]) -> list[str]:
    tokenizer = runner.base.tokenizer
    jobs = [GenerationJob(GenerationParams(prompt=t, max_new_tokens=n), tokenizer(t)["input_ids"])
            for t, n in zip(TEXTS, lengths)]
    return [g.text for g in generate(runner, [adapter] * len(jobs), jobs)]


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_changes_the_base_answer(name: str, runner: ModelRunner, store: AdapterStore) -> None:
    adapter = runner.load(store.get(name))
    lengths = [8] * len(TEXTS)
    ours = _greedy_texts(runner, adapter, lengths)
    runner.unload(adapter)
    base = _greedy_texts(runner, None, lengths)
    changed = [text for text, a, b in zip(TEXTS, ours, base) if a != b]
    assert len(changed) >= len(TEXTS) - 1, (name, ours, base)


@pytest.fixture(scope="module")
def static_decode_runner(tiny_base: Path) -> ModelRunner:
    """Decode steps in static shapes (what CUDA graphs replay), run eagerly here."""
    loaded = load_base_model(Settings(base_model=str(tiny_base), base_model_aliases=[TINY_ID]))
    return ModelRunner(loaded, limits=CacheLimits(decode_graphs="on"))


@pytest.mark.parametrize("decode", ["dynamic", "static"])
@pytest.mark.parametrize("name", GENERATORS + [None])
def test_greedy_generation_matches_peft(name: str | None, decode: str, runner: ModelRunner,
                                        static_decode_runner: ModelRunner, store: AdapterStore,
                                        tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    runner = static_decode_runner if decode == "static" else runner
    adapter = None if name is None else runner.load(store.get(name))
    tokenizer = runner.base.tokenizer
    lengths = [3, 12, 7, 16]
    jobs = [GenerationJob(GenerationParams(prompt=t, max_new_tokens=n), tokenizer(t)["input_ids"])
            for t, n in zip(TEXTS, lengths)]
    ours = generate(runner, [adapter] * len(jobs), jobs)  # one batch, rows of different prompt and output lengths
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    if name is not None:
        model = PeftModel.from_pretrained(model, tiny_adapters[name])
    model.eval()
    for text, n, generation in zip(TEXTS, lengths, ours):
        encoded = tokenizer(text, return_tensors="pt")
        output = model.generate(**encoded, max_new_tokens=n, do_sample=False)
        new = output[0][encoded["input_ids"].shape[1]:]
        assert generation.text == tokenizer.decode(new, skip_special_tokens=True), (name, text)
        assert generation.generated_tokens == len(new)
    if adapter is not None:
        runner.unload(adapter)


def test_lora_and_prefix_coexist_without_leaking(runner: ModelRunner, store: AdapterStore) -> None:
    """Prefix rows run with LoRA off even while a LoRA adapter is resident and was last active."""
    tokenizer = runner.base.tokenizer
    prefix = runner.load(store.get("prefix-gen"))
    job = [GenerationJob(GenerationParams(prompt="hello", max_new_tokens=8), tokenizer("hello")["input_ids"])]
    alone = generate(runner, [prefix], job)[0].text
    lora = runner.load(store.get("lora-gen"))
    generate(runner, [lora], job)
    assert generate(runner, [prefix], job)[0].text == alone
    base_alone = generate(runner, [None], job)[0].text
    runner.unload(lora)
    assert generate(runner, [None], job)[0].text == base_alone
    runner.unload(prefix)
