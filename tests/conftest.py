"""Shared fixtures: a tiny random Llama with the real tokenizer, and real PEFT adapters of every kind saved on it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a hub; PEFT's save probes one otherwise
# Equivalence with plain PEFT is checked in float32 (the reference's dtype); "auto" may pick bf16 on this CPU.
os.environ.setdefault("SERVICE_DTYPE", "float32")

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
)

from service.model.loading import embedded_model_folder
from service.settings import Settings

TINY_ID = "tests/tiny-llama"


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    """The embedded SmolLM2 converted once (shared with the user's cache so CI converts at most once)."""
    return embedded_model_folder(Settings().cache_dir)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, embedded_folder: Path) -> Path:
    """A tiny random Llama (2 layers, GQA) saved as a plain HF folder with SmolLM2's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tokenizer = AutoTokenizer.from_pretrained(embedded_folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
        initializer_range=0.3,  # large enough that greedy outputs vary, so decoding bugs cannot hide
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.name_or_path = TINY_ID
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


AdapterMaker = Callable[..., Path]


def _save(model, config, out: Path, base_id: str, labels: list[str] | None, seed: int) -> Path:
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    prompt_learning = isinstance(config, (PromptTuningConfig, PromptEncoderConfig))
    with torch.no_grad():
        # Random prefixes and heads are non-trivial already; give LoRA a non-zero B too.
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "score" in name or "lora_E" in name:
                parameter.normal_(0.0, 0.2 if "lora_E" not in name else 1.0)
            elif "lora_A" in name and isinstance(config, AdaLoraConfig):
                parameter.normal_(0.0, 0.5)  # AdaLoRA starts A near zero
            elif "ia3_l" in name:
                parameter.normal_(1.0, 0.5)  # PEFT starts them at one (no change)
            elif prompt_learning and "prompt_encoder" in name and parameter.dim() == 2:
                parameter.add_(torch.randn_like(parameter))  # virtual tokens far enough from the init to act
    peft_model.peft_config["default"].base_model_name_or_path = base_id
    if isinstance(config, AdaLoraConfig) and config.target_r < config.init_r:
        # What AdaLoRA's budget leaves after training: some singular values dropped per layer (saved cut).
        peft_model.peft_config["default"].rank_pattern = {
            name.removeprefix("base_model.model."): [i % 2 == 0 or i < config.target_r for i in range(config.init_r)]
            for name, _ in peft_model.named_parameters() if "lora_E" in name
        }
    peft_model.save_pretrained(out)
    if labels is not None:
        (out / "labels.json").write_text(json.dumps(labels))
    return out


def make_adapter(
    base: Path, out: Path, kind: str, task: str, *, base_id: str = TINY_ID, labels: list[str] | None = None,
    num_labels: int = 2, seed: int = 1, **options,
) -> Path:
    """Save a real PEFT adapter (``kind`` 'lora' | 'prefix', ``task`` 'cls' | 'gen') as a user would."""
    if task == "cls":
        model = LlamaForSequenceClassification.from_pretrained(base, num_labels=num_labels)
        model.config.pad_token_id = model.config.pad_token_id or 2
        task_type = TaskType.SEQ_CLS
    elif task == "tok":
        model = LlamaForTokenClassification.from_pretrained(base, num_labels=num_labels)
        task_type = TaskType.TOKEN_CLS
    else:
        model = LlamaForCausalLM.from_pretrained(base)
        task_type = TaskType.CAUSAL_LM
    if kind == "lora":
        options.setdefault("target_modules", ["q_proj", "v_proj"])
        config = LoraConfig(task_type=task_type, r=options.pop("r", 4), lora_alpha=8, **options)
    elif kind == "adalora":
        options.setdefault("target_modules", ["q_proj", "v_proj"])
        config = AdaLoraConfig(task_type=task_type, init_r=6, target_r=3, total_step=100, lora_alpha=8, **options)
    elif kind == "ia3":
        config = IA3Config(task_type=task_type, **options)
    elif kind == "prompt":
        config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=options.pop("num_virtual_tokens", 5),
                                    **options)
    elif kind == "ptuning":
        config = PromptEncoderConfig(task_type=task_type, num_virtual_tokens=options.pop("num_virtual_tokens", 4),
                                     encoder_hidden_size=16, **options)
    else:
        config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=options.pop("num_virtual_tokens", 4),
                                    **options)
    return _save(model, config, out, base_id, labels, seed)


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    """One adapter of every served kind on the tiny base, in a store folder."""
    store = tmp_path_factory.mktemp("store")
    specs = {
        "lora-cls": ("lora", "cls", {"labels": ["negative", "positive"]}),
        "lora-cls3": ("lora", "cls", {"num_labels": 3, "r": 8, "target_modules": ["q_proj", "k_proj", "o_proj"]}),
        "lora-gen": ("lora", "gen", {"r": 8}),
        "lora-gen-mlp": ("lora", "gen", {"target_modules": ["gate_proj", "down_proj"], "seed": 7}),
        "prefix-cls": ("prefix", "cls", {"labels": ["a", "b"]}),
        "prefix-gen": ("prefix", "gen", {"num_virtual_tokens": 6}),
        "prefix-proj-gen": ("prefix", "gen", {"prefix_projection": True, "encoder_hidden_size": 32, "seed": 3}),
        "prefix-proj-cls": ("prefix", "cls", {"prefix_projection": True, "encoder_hidden_size": 16,
                                              "num_virtual_tokens": 3}),
        "prompt-gen": ("prompt", "gen", {"seed": 5}),
        "prompt-text-gen": ("prompt", "gen", {"prompt_tuning_init": PromptTuningInit.TEXT, "num_virtual_tokens": 4,
                                              "prompt_tuning_init_text": "Answer briefly:", "tokenizer_name_or_path":
                                              "__tiny_base__", "seed": 6}),
        "prompt-cls": ("prompt", "cls", {"labels": ["no", "yes"], "seed": 8}),
        "ptuning-mlp-gen": ("ptuning", "gen", {"seed": 9}),
        "ptuning-lstm-gen": ("ptuning", "gen", {"encoder_reparameterization_type":
                                                PromptEncoderReparameterizationType.LSTM, "seed": 10}),
        "ptuning-cls": ("ptuning", "cls", {"labels": ["x", "y"], "seed": 11}),
        "ia3-gen": ("ia3", "gen", {"seed": 12}),
        "ia3-attn-gen": ("ia3", "gen", {"target_modules": ["q_proj", "o_proj", "up_proj"],
                                        "feedforward_modules": ["up_proj"], "seed": 13}),
        "ia3-cls": ("ia3", "cls", {"labels": ["neg", "pos"], "seed": 14}),
        "adalora-gen": ("adalora", "gen", {"seed": 15}),
        "adalora-cls": ("adalora", "cls", {"labels": ["p", "q", "r"], "num_labels": 3, "seed": 16}),
        "lora-tok": ("lora", "tok", {"labels": ["O", "B-PER", "I-PER"], "num_labels": 3, "seed": 17}),
        "prompt-tok": ("prompt", "tok", {"labels": ["O", "B-X", "I-X"], "num_labels": 3, "seed": 18}),
        "prefix-tok": ("prefix", "tok", {"labels": ["O", "B-X", "I-X"], "num_labels": 3, "seed": 19}),
        "ia3-tok": ("ia3", "tok", {"labels": ["O", "B-X", "I-X"], "num_labels": 3, "seed": 20}),
    }
    for _, _, options in specs.values():
        if options.get("tokenizer_name_or_path") == "__tiny_base__":
            options["tokenizer_name_or_path"] = str(tiny_base)
    return {
        name: make_adapter(tiny_base, store / name, kind, task, **options)
        for name, (kind, task, options) in specs.items()
    }


@pytest.fixture(scope="session")
def tiny_store(tiny_adapters: dict[str, Path]) -> Path:
    return next(iter(tiny_adapters.values())).parent
