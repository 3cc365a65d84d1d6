"""Tiny random BERT and RoBERTa bases (SmolLM2's fast tokenizer, for its character offsets) and real PEFT adapters
of every kind served on encoders, for sequence and token classification."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    RobertaConfig,
    RobertaModel,
)

ENCODER_IDS = {"bert": "tests/tiny-bert", "roberta": "tests/tiny-roberta"}
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def make_encoder_base(family: str, folder: Path, tokenizer_source: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    shared = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    torch.manual_seed(21)
    if family == "bert":
        model = BertModel(BertConfig(max_position_embeddings=128, **shared))
    else:
        model = RobertaModel(RobertaConfig(max_position_embeddings=128 + tokenizer.pad_token_id + 1, **shared))
    model.config.name_or_path = ENCODER_IDS[family]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _target_modules(family: str) -> list[str]:
    return ["query", "value"]


def make_encoder_adapter(base: Path, family: str, out: Path, kind: str, task: str, seed: int = 1) -> Path:
    """``kind``: lora | prompt | ptuning | ia3 | adalora; ``task``: cls | tok."""
    if task == "cls":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
        task_type, labels = TaskType.SEQ_CLS, ["neg", "neu", "pos"]
    else:
        model = AutoModelForTokenClassification.from_pretrained(base, num_labels=len(NER_LABELS))
        task_type, labels = TaskType.TOKEN_CLS, NER_LABELS
    config = {
        "lora": lambda: LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules=_target_modules(family)),
        "prompt": lambda: PromptTuningConfig(task_type=task_type, num_virtual_tokens=4),
        "ptuning": lambda: PromptEncoderConfig(task_type=task_type, num_virtual_tokens=3, encoder_hidden_size=16),
        "ia3": lambda: IA3Config(task_type=task_type),
        "adalora": lambda: AdaLoraConfig(task_type=task_type, init_r=4, target_r=2, total_step=10, lora_alpha=8,
                                         target_modules=_target_modules(family)),
    }[kind]()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if not parameter.requires_grad:
                continue
            if "ia3_l" in name:
                parameter.normal_(1.0, 0.5)
            elif "lora_" in name or "prompt_encoder" in name:
                parameter.add_(torch.randn_like(parameter) * (0.5 if "prompt_encoder" in name else 0.3))
            else:  # the task head
                parameter.add_(torch.randn_like(parameter) * 0.3)
    peft_model.peft_config["default"].base_model_name_or_path = ENCODER_IDS[family]
    peft_model.save_pretrained(out)
    (out / "labels.json").write_text(json.dumps(labels))
    return out
