"""The LoRA variants people save are served exactly as plain PEFT serves them, alone and in mixed batches with the
base and other adapters, and change the base's answer; the ones that cannot be served are refused at load (which
an upload runs before publishing) with a message naming the feature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from service.domain import GenerationParams
from service.errors import AdapterInvalid
from service.model.adapters import check_lora_weights
from service.model.generation import generate
from service.model.runner import GenerationJob, ModelRunner
from service.model.validation import BaseShapes, check_adapter
from service.store.store import AdapterStore
from tests.variants import REFUSED, SERVED, make_variant

PROMPTS = ["hello world", "a longer prompt with more words in it", "x marks the spot"]


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    store = tmp_path_factory.mktemp("variants")
    for name, options in SERVED.items():
        make_variant(tiny_base, store / name, options)
    for name, (options, _) in REFUSED.items():
        make_variant(tiny_base, store / name, options)
    make_variant(tiny_base, store / "classifier-all-linear", {"target_modules": "all-linear"}, task="cls")
    make_variant(tiny_base, store / "resized-vocab", {"modules_to_save": ["embed_tokens", "lm_head"]},
                 resize_to=49160)
    return store


@pytest.fixture(scope="module")
def variant_store(variants: Path, runner: ModelRunner) -> AdapterStore:
    return AdapterStore(variants, runner.base.names_base)


def _jobs(runner: ModelRunner) -> list[GenerationJob]:
    tokenizer = runner.base.tokenizer
    return [GenerationJob(GenerationParams(prompt=p, max_new_tokens=6), tokenizer(p)["input_ids"]) for p in PROMPTS]


def _peft_greedy(tiny_base: Path, adapter: Path | None, runner: ModelRunner) -> list[str]:
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    tokenizer = runner.base.tokenizer
    texts = []
    for prompt in PROMPTS:
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=6, do_sample=False)
        texts.append(tokenizer.decode(output[0][encoded["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


@pytest.mark.parametrize("name", sorted(SERVED))
def test_variant_matches_peft_alone_and_mixed(name: str, runner: ModelRunner, variant_store: AdapterStore,
                                              store: AdapterStore, variants: Path, tiny_base: Path) -> None:
    info = variant_store.get(name)
    check_adapter(info, BaseShapes(runner.base), 256, 256)
    adapter = runner.load(info)
    neighbour = runner.load(store.get("lora-gen"))
    prefix = runner.load(store.get("prefix-gen"))
    try:
        expected = _peft_greedy(tiny_base, variants / name, runner)
        base = _peft_greedy(tiny_base, None, runner)
        assert expected != base, "the variant must change the base's answer"
        alone = [g.text for g in generate(runner, [adapter] * 3, _jobs(runner))]
        assert alone == expected
        jobs = _jobs(runner)
        mixed = generate(runner, [adapter, None, neighbour, prefix, adapter, adapter],
                         [jobs[0], jobs[1], jobs[2], jobs[0], jobs[1], jobs[2]])
        assert [mixed[0].text, mixed[4].text, mixed[5].text] == expected
        assert mixed[1].text == base[1]
        assert mixed[2].text == generate(runner, [neighbour], [jobs[2]])[0].text
        assert mixed[3].text == generate(runner, [prefix], [jobs[0]])[0].text
    finally:
        for loaded in (adapter, neighbour, prefix):
            runner.unload(loaded)


def test_all_linear_classifier_matches_peft(runner: ModelRunner, variant_store: AdapterStore, variants: Path,
                                            tiny_base: Path) -> None:
    adapter = runner.load(variant_store.get("classifier-all-linear"))
    tokenizer = runner.base.tokenizer
    ours = runner.classify([adapter] * len(PROMPTS), [tokenizer(p)["input_ids"] for p in PROMPTS])
    runner.unload(adapter)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3),
                                      variants / "classifier-all-linear").eval()
    for prompt, probabilities in zip(PROMPTS, ours):
        with torch.no_grad():
            expected = torch.softmax(model(**tokenizer(prompt, return_tensors="pt")).logits, -1)[0]
        assert torch.allclose(torch.tensor(probabilities), expected, atol=1e-4)


@pytest.mark.parametrize("name", sorted(REFUSED) + ["resized-vocab"])
def test_unservable_variants_are_refused_naming_the_feature(name: str, runner: ModelRunner,
                                                            variant_store: AdapterStore) -> None:
    words = REFUSED[name][1] if name in REFUSED else "resized vocabulary"
    with pytest.raises(AdapterInvalid, match=words):
        info = variant_store.get(name)
        check_adapter(info, BaseShapes(runner.base), 256, 256)
        runner.load(info)
    # nothing of it stayed behind: a mixed batch still answers as before
    assert runner.lora_host.peft_model is None or not [
        n for n in runner.lora_host.peft_model.peft_config if n not in runner.gathered]


def test_bias_training_on_a_base_with_biases_is_refused(tmp_path: Path) -> None:
    """bias='all' saves the base's own biases; loading them would change every tenant's answers."""
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, attention_bias=True)
    peft_model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
    peft_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert any(key.endswith("bias") for key in weights)
    with pytest.raises(AdapterInvalid, match="bias='none'"):
        check_lora_weights("biased", json.loads((tmp_path / "adapter_config.json").read_text()), weights)
