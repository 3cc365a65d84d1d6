"""What one owned forward step computes: a flat batch of decode tokens, then prompt chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Chunk:
    """A piece of one row's prompt in this step: ``length`` tokens from cache position ``start``, at ``offset`` in
    the flat batch."""

    slot: int
    start: int
    length: int
    offset: int
    _mask: torch.Tensor | None = None

    def mask(self, device: torch.device) -> torch.Tensor:
        """Causal over the chunk, after every earlier entry of the row (prefix, earlier chunks); made once a step."""
        if self._mask is None:
            rows = torch.arange(self.length, device=device)[:, None] + self.start
            self._mask = torch.arange(self.start + self.length, device=device)[None, :] <= rows
        return self._mask


@dataclass
class StepBatch:
    embeddings: torch.Tensor  # [tokens, hidden]
    positions: torch.Tensor  # [tokens]
    decode_slots: torch.Tensor  # [decode rows]: their cache slots, ascending; their tokens come first
    chunks: list[Chunk]

    @property
    def decode_rows(self) -> int:
        return self.decode_slots.shape[0]
