"""Encoders (BERT, RoBERTa): right padding, absolute positions from the model, no generation.

Their heads are the architecture's own: BERT's ``classifier`` reads the pooler's output (the pooler is part of the
frozen base), RoBERTa's ``RobertaClassificationHead`` (dense, tanh, out_proj) reads the first token; token heads
are one ``classifier`` layer per token.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModel, PreTrainedModel

from service.errors import AdapterInvalid
from service.model.families.base import Family


class _Encoder(Family):
    can_generate = False
    pads_left = False
    serves_prefix_tuning = False

    def backbone(self, model: PreTrainedModel) -> torch.nn.Module:
        return model


class BertFamily(_Encoder):
    name = "bert"
    backbone_prefix = "bert."

    def load(self, source: str, dtype: torch.dtype) -> PreTrainedModel:
        return AutoModel.from_pretrained(source, dtype=dtype)  # with its pooler, which BERT classifiers read

    def sequence_features(self, output: Any) -> torch.Tensor:
        return output.pooler_output


class RobertaFamily(_Encoder):
    name = "roberta"
    backbone_prefix = "roberta."

    def load(self, source: str, dtype: torch.dtype) -> PreTrainedModel:
        return AutoModel.from_pretrained(source, dtype=dtype, add_pooling_layer=False)

    def sequence_features(self, output: Any) -> torch.Tensor:
        return output.last_hidden_state[:, 0]

    def max_positions(self, config: Any) -> int:
        # RoBERTa's positions start after its padding index: 514 embeddings hold 512 tokens.
        return config.max_position_embeddings - (config.pad_token_id or 0) - 1

    def sequence_head(self, params: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
        needed = {"dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}
        if set(params) != needed:
            raise AdapterInvalid(f"{name}: a RoBERTa classification head needs {sorted(needed)}; "
                                 f"found {sorted(params)}")
        dense, out = params["dense.weight"], params["out_proj.weight"]
        head = torch.nn.Sequential(torch.nn.Linear(dense.shape[1], dense.shape[0]), torch.nn.Tanh(),
                                   torch.nn.Linear(out.shape[1], out.shape[0]))
        with torch.no_grad():
            head[0].weight.copy_(dense)
            head[0].bias.copy_(params["dense.bias"])
            head[2].weight.copy_(out)
            head[2].bias.copy_(params["out_proj.bias"])
        return head
