"""Decoder-only causal LMs (the Llama family: Llama, SmolLM2, Mistral, Qwen2 ...): left padding, the last real
token read by sequence heads (``score``), every token by token heads."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from service.model.families.base import Family


class DecoderFamily(Family):
    name = "decoder"
    can_generate = True
    pads_left = True
    serves_prefix_tuning = True

    def load(self, source: str, dtype: torch.dtype) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)

    def backbone(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.base_model

    def forward_kwargs(self, positions: torch.Tensor, cache: Any, cache_keyword: str) -> dict[str, Any]:
        return {"position_ids": positions, "use_cache": True, cache_keyword: cache}

    def sequence_features(self, output: Any) -> torch.Tensor:
        return output.last_hidden_state[:, -1]  # left-padded: every row's last real token


class BloomFamily(DecoderFamily):
    """Bloom: ALiBi instead of position ids (the model derives its biases from the attention mask, so left padding
    and prefix slots are accounted for by the mask alone); fused ``query_key_value``."""

    name = "bloom"

    def forward_kwargs(self, positions: torch.Tensor, cache: Any, cache_keyword: str) -> dict[str, Any]:
        return {"use_cache": True, cache_keyword: cache}
