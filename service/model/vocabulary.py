"""An adapter's own token embeddings and output head: ``modules_to_save`` on ``embed_tokens`` / ``lm_head`` (a
whole matrix per adapter) and ``trainable_token_indices`` (a few rows).

PEFT would wrap the shared base's modules for these, and its wrappers fail mixed batches (and keep failing while
such an adapter stays resident). Here they never touch the base: a row of such an adapter gets its input embeddings
looked up in its own matrix (or its own rows) and its logits from its own head, other rows are untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from service.errors import AdapterInvalid

_FULL_EMBEDDING = re.compile(r"^base_model\.model\.(?:.+\.)?embed_tokens\.weight$")
_FULL_HEAD = re.compile(r"^base_model\.model\.(?:.+\.)?lm_head\.weight$")
_TOKEN_DELTA = re.compile(r"^base_model\.model\.(?:.+\.)?(?P<module>embed_tokens|lm_head)\.token_adapter\."
                          r"trainable_tokens_delta$")
_SAVED_BASE_LAYER = re.compile(r"^base_model\.model\.(?:.+\.)?(?P<module>embed_tokens|lm_head)\.base_layer\.weight$")
VOCABULARY_MODULES = ("embed_tokens", "lm_head")


@dataclass
class Rows:
    """Replacement rows of a [vocab, dim] matrix."""

    indices: torch.Tensor  # [n] token ids
    values: torch.Tensor  # [n, dim]


@dataclass
class VocabularyOverride:
    input_matrix: torch.Tensor | None = None
    input_rows: Rows | None = None
    output_matrix: torch.Tensor | None = None
    output_rows: Rows | None = None

    @property
    def changes_input(self) -> bool:
        return self.input_matrix is not None or self.input_rows is not None

    @property
    def changes_output(self) -> bool:
        return self.output_matrix is not None or self.output_rows is not None

    @property
    def nbytes(self) -> int:
        tensors = [self.input_matrix, self.output_matrix] + [
            t for rows in (self.input_rows, self.output_rows) if rows is not None for t in (rows.indices, rows.values)
        ]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def embed(self, ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """This adapter's input embeddings for ``ids`` [seq], given the base's ``embeddings`` [seq, dim]."""
        if self.input_matrix is not None:
            return torch.nn.functional.embedding(ids, self.input_matrix)
        assert self.input_rows is not None
        return _replace_rows(ids, embeddings, self.input_rows)

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """This adapter's logits from ``hidden`` [..., dim], given the base's ``logits`` [..., vocab]."""
        if self.output_matrix is not None:
            return hidden @ self.output_matrix.T
        assert self.output_rows is not None
        logits = logits.clone()
        logits[..., self.output_rows.indices] = hidden @ self.output_rows.values.T
        return logits


def _replace_rows(ids: torch.Tensor, embeddings: torch.Tensor, rows: Rows) -> torch.Tensor:
    # position of each id among the replaced ones, or -1
    lookup = torch.full((int(max(ids.max(), rows.indices.max())) + 1,), -1, dtype=torch.long, device=ids.device)
    lookup[rows.indices] = torch.arange(len(rows.indices), device=ids.device)
    where = lookup[ids]
    replaced = where >= 0
    if not replaced.any():
        return embeddings
    embeddings = embeddings.clone()
    embeddings[replaced] = rows.values[where[replaced]].to(embeddings.dtype)
    return embeddings


def token_indices(config: dict, name: str) -> list[int] | None:
    """``trainable_token_indices`` as a list (PEFT takes a list for embed_tokens or ``{module: list}``)."""
    value = config.get("trainable_token_indices")
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = [m for m in value if m not in VOCABULARY_MODULES]
        if unknown or len(value) != 1:
            raise AdapterInvalid(
                f"{name}: trainable_token_indices on {list(value)} is not served; only on embed_tokens")
        value = next(iter(value.values()))
    if not isinstance(value, list) or not all(isinstance(i, int) and i >= 0 for i in value):
        raise AdapterInvalid(f"{name}: trainable_token_indices must be a list of token ids")
    return value


def split_vocabulary(
    weights: dict[str, torch.Tensor], config: dict, name: str, embedding: torch.Tensor, output: torch.Tensor,
    tied: bool,
) -> tuple[VocabularyOverride | None, dict[str, torch.Tensor]]:
    """Take the vocabulary parts out of an adapter's weights; the rest is LoRA for PEFT.

    ``embedding`` / ``output`` are the base's input embedding and output head matrices; ``tied`` whether they are
    one (then PEFT's trainable tokens act on the output too).
    """
    override = VocabularyOverride()
    rest: dict[str, torch.Tensor] = {}
    vocab, dim = embedding.shape
    indices = token_indices(config, name)
    for key, tensor in weights.items():
        if saved := _SAVED_BASE_LAYER.match(key):
            # PEFT saves the vocabulary layer it wrapped for LoRA; it must be the base's own, else the vocabulary
            # (or the base) changed.
            own = embedding if saved["module"] == "embed_tokens" else output
            if tensor.shape != own.shape:
                raise _resized(name, tuple(tensor.shape), tuple(own.shape))
            if not torch.equal(tensor.to(own), own):
                raise AdapterInvalid(f"{name}: its saved {saved['module']} differs from this base's: it was trained on "
                                     "another base or with that layer changed; retrain on the served base")
        elif _FULL_EMBEDDING.match(key):
            _check_matrix(name, "embed_tokens", tensor, vocab, dim)
            override.input_matrix = tensor
        elif _FULL_HEAD.match(key):
            _check_matrix(name, "lm_head", tensor, vocab, dim)
            override.output_matrix = tensor
        elif match := _TOKEN_DELTA.match(key):
            if indices is None or tensor.shape != (len(indices), dim):
                raise AdapterInvalid(f"{name}: {key} has shape {tuple(tensor.shape)}; trainable_token_indices "
                                     f"names {None if indices is None else len(indices)} tokens of width {dim}")
            if max(indices, default=0) >= vocab:
                raise _resized(name, (max(indices) + 1, dim), (vocab, dim))
            rows = Rows(torch.tensor(indices, dtype=torch.long), tensor)
            if match["module"] == "lm_head":
                override.output_rows = rows
            else:
                override.input_rows = rows
                if tied:
                    override.output_rows = rows
        else:
            rest[key] = tensor
    if indices is not None and override.input_rows is None and override.output_rows is None:
        raise AdapterInvalid(f"{name}: trainable_token_indices is set but the weights hold no trainable_tokens_delta")
    has_any = override.changes_input or override.changes_output
    return (override if has_any else None), rest


def _check_matrix(name: str, module: str, tensor: torch.Tensor, vocab: int, dim: int) -> None:
    if tensor.dim() != 2 or tensor.shape[1] != dim:
        raise AdapterInvalid(f"{name}: its {module} has shape {tuple(tensor.shape)}; this base needs ({vocab}, {dim})")
    if tensor.shape[0] != vocab:
        raise _resized(name, tuple(tensor.shape), (vocab, dim))


def _resized(name: str, got: tuple[int, ...], base: tuple[int, int]) -> AdapterInvalid:
    return AdapterInvalid(
        f"{name}: saved with a resized vocabulary (its embedding is {got}, the base's is {base}): added tokens "
        "would need the adapter's own tokenizer, which this service does not serve. Train without "
        "resize_token_embeddings (reuse existing special tokens), or serve a base that has those tokens"
    )


def to_device(override: VocabularyOverride, device: torch.device, dtype: torch.dtype) -> VocabularyOverride:
    def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device=device, dtype=dtype)

    def move_rows(rows: Rows | None) -> Rows | None:
        return None if rows is None else Rows(rows.indices.to(device), rows.values.to(device=device, dtype=dtype))

    return VocabularyOverride(move(override.input_matrix), move_rows(override.input_rows),
                              move(override.output_matrix), move_rows(override.output_rows))
