"""The interface every model family implements."""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import PreTrainedModel

from service.errors import AdapterInvalid


class Family:
    """What the runner asks of an architecture. Subclasses fill in the differences."""

    name: str = "family"
    can_generate: bool = False
    pads_left: bool = True  # decoders left-pad (every row's last token at -1); encoders right-pad
    backbone_prefix: str = ""  # the backbone's attribute in task models (bert., roberta.), absent from the base here
    serves_prefix_tuning: bool = True

    def load(self, source: str, dtype: torch.dtype) -> PreTrainedModel:
        raise NotImplementedError

    def max_positions(self, config: Any) -> int:
        """Tokens a row may hold (prompt, virtual tokens and generated ones together)."""
        return getattr(config, "max_position_embeddings", None) or 1 << 30

    def backbone(self, model: PreTrainedModel) -> torch.nn.Module:
        """The module that maps token ids (or embeddings) to hidden states."""
        raise NotImplementedError

    def forward_kwargs(self, positions: torch.Tensor, cache: Any, cache_keyword: str) -> dict[str, Any]:
        """Extra arguments of a backbone call beyond inputs and attention mask."""
        return {}

    def sequence_features(self, output: Any) -> torch.Tensor:
        """What the sequence classification head reads, one vector per row."""
        raise NotImplementedError

    def sequence_head(self, params: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
        return linear_head(params, name)

    def token_head(self, params: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
        return linear_head(params, name)

    def local_key(self, key: str) -> str:
        """An adapter tensor's name as it would be on this service's base (task-model prefixes dropped)."""
        if self.backbone_prefix:
            return key.replace(f"base_model.model.{self.backbone_prefix}", "base_model.model.", 1)
        return key


def linear_head(params: dict[str, torch.Tensor], name: str) -> torch.nn.Linear:
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None or weight.dim() != 2 or set(params) - {"weight", "bias"}:
        raise AdapterInvalid(f"{name}: its head holds {sorted(params)}; this base's head is one linear layer")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head


def head_outputs(head: torch.nn.Module) -> int:
    """Number of labels a head scores (its last linear layer's outputs)."""
    return [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


HEAD_KEY = re.compile(
    r"^(?:base_model\.)?(?:model\.)?(?P<module>score|classifier)(?:\.modules_to_save\.[^.]+)?"
    r"\.(?P<param>(?:dense\.|out_proj\.)?(?:weight|bias))$"
)
