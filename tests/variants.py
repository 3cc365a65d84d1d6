"""LoRA variants people save, made with plain PEFT on the tiny base, every trainable tensor non-trivial."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from tests.conftest import TINY_ID

# name -> LoraConfig options (target_modules defaults to q_proj/v_proj)
SERVED = {
    "rslora": {"use_rslora": True},
    "all-linear": {"target_modules": "all-linear"},
    "regex-target": {"target_modules": r".*\.(q_proj|v_proj)"},
    "lora-embed": {"target_modules": ["embed_tokens", "q_proj"]},
    "lora-lm-head": {"target_modules": ["lm_head", "v_proj"]},
    "save-lm-head": {"modules_to_save": ["lm_head"]},
    "save-embed": {"modules_to_save": ["embed_tokens"]},
    "token-indices": {"trainable_token_indices": [5, 17, 100, 1000]},
    "bias-lora-only": {"bias": "lora_only"},
    "layers-subset": {"layers_to_transform": [1], "layers_pattern": "layers"},
    "rank-alpha-patterns": {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 32}},
    "fan-in-fan-out": {"fan_in_fan_out": True},
    "dropout": {"lora_dropout": 0.3},
}
REFUSED = {  # name -> (options, words the refusal must contain)
    "dora": ({"use_dora": True}, "DoRA"),
    "save-norm": ({"modules_to_save": ["norm"]}, "modules_to_save"),
}


def make_variant(base: Path, out: Path, options: dict, task: str = "gen", seed: int = 3,
                 resize_to: int | None = None) -> Path:
    if task == "cls":
        model = LlamaForSequenceClassification.from_pretrained(base, num_labels=3)
        model.config.pad_token_id = model.config.pad_token_id or 2
    else:
        model = LlamaForCausalLM.from_pretrained(base)
    if resize_to is not None:
        model.resize_token_embeddings(resize_to)
    options = {"target_modules": ["q_proj", "v_proj"], **options}
    config = LoraConfig(task_type=TaskType.SEQ_CLS if task == "cls" else TaskType.CAUSAL_LM, r=4, lora_alpha=8,
                        **options)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:  # LoRA B starts at zero, saved modules as copies: make them all act
                parameter.add_(torch.randn_like(parameter) * 0.2)
    peft_model.peft_config["default"].base_model_name_or_path = TINY_ID
    peft_model.save_pretrained(out)
    if task == "cls":
        (out / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    return out
