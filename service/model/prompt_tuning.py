"""Prompt tuning and P-tuning: virtual token embeddings put before a row's own token embeddings.

Both save ``prompt_embeddings`` [num_virtual_tokens, hidden]: prompt tuning its learned embeddings, P-tuning the
output of its prompt encoder (MLP or LSTM), which PEFT computes once at save time; PEFT in inference mode uses the
saved tensor as is, and so does the service. The rows' virtual positions carry placeholder ids (negative, see
``VIRTUAL_ID``) that the runner's embedding step replaces with these vectors; they take attention mask 1 and
positions 0..P-1 before the real tokens, as PEFT's concatenation gives them.
"""

from __future__ import annotations

import torch

from service.errors import AdapterInvalid
from service.model.loading import BaseModel


def virtual_ids(count: int) -> list[int]:
    """Placeholder ids for a row's virtual tokens: -1, -2, ... (never a real token id)."""
    return [-(index + 1) for index in range(count)]


def virtual_index(ids: torch.Tensor) -> torch.Tensor:
    """The virtual token index of placeholder ids."""
    return -ids - 1


def load_virtual_tokens(config: dict, weights: dict[str, torch.Tensor], base: BaseModel, name: str) -> torch.Tensor:
    virtual = config.get("num_virtual_tokens")
    embeddings = weights.get("prompt_embeddings")
    hidden = base.model.config.hidden_size
    if embeddings is None or tuple(embeddings.shape) != (virtual, hidden):
        shape = None if embeddings is None else tuple(embeddings.shape)
        raise AdapterInvalid(f"{name}: prompt_embeddings has shape {shape}, this base needs ({virtual}, {hidden})")
    return embeddings.to(device=base.device, dtype=base.dtype)
