"""A Bloom base (ALiBi, fused query_key_value): LoRA, prefix tuning, prompt tuning and IA3 equal to plain PEFT
alone and in one mixed batch with base rows, for generation and sequence classification, and acting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
)

from service.domain import GenerationParams
from service.model.generation import generate
from service.model.loading import load_base_model
from service.model.runner import GenerationJob, ModelRunner
from service.model.validation import BaseShapes, check_adapter
from service.settings import Settings
from service.store.store import AdapterStore

BLOOM_ID = "tests/tiny-bloom"
PROMPTS = ["hello world", "a longer prompt for the bloom model to continue", "x y"]
CONFIGS = {
    "lora": lambda task: LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=["query_key_value"]),
    "prefix": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=4),
    "prompt": lambda task: PromptTuningConfig(task_type=task, num_virtual_tokens=3),
    "ia3": lambda task: IA3Config(task_type=task),
}


@pytest.fixture(scope="module")
def bloom(tmp_path_factory: pytest.TempPathFactory, embedded_folder: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bloom")
    tokenizer = AutoTokenizer.from_pretrained(embedded_folder)
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, initializer_range=0.3)
    torch.manual_seed(0)
    model = BloomForCausalLM(config)
    model.config.name_or_path = BLOOM_ID
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for index, (kind, make) in enumerate(CONFIGS.items()):
        for task in ("gen", "cls"):
            if task == "gen":
                base_model = BloomForCausalLM.from_pretrained(root / "base")
            else:
                base_model = AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=2)
            torch.manual_seed(index)
            peft_model = get_peft_model(base_model, make(TaskType.CAUSAL_LM if task == "gen" else TaskType.SEQ_CLS))
            with torch.no_grad():
                for name, parameter in peft_model.named_parameters():
                    if parameter.requires_grad:
                        scale = 0.5 if "ia3" in name else 1.0 if "prompt" in name else 0.3
                        parameter.add_(torch.randn_like(parameter) * scale)
            peft_model.peft_config["default"].base_model_name_or_path = BLOOM_ID
            peft_model.save_pretrained(root / "store" / f"{kind}-{task}")
    return root / "base", root / "store"


@pytest.fixture(scope="module")
def bloom_runner(bloom: tuple[Path, Path]) -> tuple[ModelRunner, AdapterStore]:
    base, store = bloom
    loaded = load_base_model(Settings(base_model=str(base), base_model_aliases=[BLOOM_ID]))
    assert loaded.family.name == "bloom"
    return ModelRunner(loaded), AdapterStore(store, loaded.names_base)


def _jobs(runner: ModelRunner) -> list[GenerationJob]:
    return [GenerationJob(GenerationParams(prompt=p, max_new_tokens=6), runner.base.tokenizer(p)["input_ids"])
            for p in PROMPTS]


def _peft_texts(base: Path, adapter: Path | None, tokenizer) -> list[str]:
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    texts = []
    for prompt in PROMPTS:
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.eval().generate(**encoded, max_new_tokens=6, do_sample=False)
        texts.append(tokenizer.decode(output[0][encoded["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def test_generation_of_every_kind_matches_peft_mixed_with_base_rows(
    bloom: tuple[Path, Path], bloom_runner: tuple[ModelRunner, AdapterStore]
) -> None:
    base, store_path = bloom
    runner, store = bloom_runner
    tokenizer = runner.base.tokenizer
    adapters = {}
    for kind in CONFIGS:
        info = store.get(f"{kind}-gen")
        check_adapter(info, BaseShapes(runner.base), 64, 64)
        adapters[kind] = runner.load(info)
    base_texts = _peft_texts(base, None, tokenizer)
    rows = [(kind, index) for kind in [*CONFIGS, None] for index in range(len(PROMPTS))]
    jobs = _jobs(runner)
    got = generate(runner, [adapters.get(kind) for kind, _ in rows], [jobs[i] for _, i in rows])
    expected = {kind: _peft_texts(base, store_path / f"{kind}-gen", tokenizer) for kind in CONFIGS}
    for (kind, index), generation in zip(rows, got):
        want = base_texts[index] if kind is None else expected[kind][index]
        assert generation.text == want, (kind, PROMPTS[index])
    for kind in CONFIGS:
        assert expected[kind] != base_texts, kind
    for adapter in adapters.values():
        runner.unload(adapter)


def test_classification_of_every_kind_matches_peft(bloom: tuple[Path, Path],
                                                   bloom_runner: tuple[ModelRunner, AdapterStore]) -> None:
    base, store_path = bloom
    runner, store = bloom_runner
    tokenizer = runner.base.tokenizer
    adapters = {kind: runner.load(store.get(f"{kind}-cls")) for kind in CONFIGS}
    rows = [(kind, prompt) for kind in CONFIGS for prompt in PROMPTS]
    got = runner.classify([adapters[k] for k, _ in rows], [tokenizer(p)["input_ids"] for _, p in rows])
    for (kind, prompt), probabilities in zip(rows, got):
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
        model.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(model, store_path / f"{kind}-cls").eval()
        with torch.no_grad():
            expected = torch.softmax(model(**tokenizer(prompt, return_tensors="pt")).logits, -1)[0]
        assert torch.allclose(torch.tensor(probabilities), expected, atol=1e-4), (kind, prompt)
    for adapter in adapters.values():
        runner.unload(adapter)
