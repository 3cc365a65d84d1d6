"""AdaLoRA, served as plain LoRA through the gathered pool (no PEFT wrapper).

AdaLoRA saves an SVD-shaped update per layer: ``lora_A`` [r, in], ``lora_E`` [r, 1] (the singular values) and
``lora_B`` [out, r], already cut to the ranks its budget kept (``rank_pattern``). PEFT computes
``x @ (A * E)^T @ B^T * scaling / (ranknum + 1e-5)``, with ``scaling`` = ``lora_alpha`` (or r when it is 0) and
``ranknum`` the initial rank ``init_r`` (kept when the layers are cut to the rank pattern). That is LoRA with
A' = A * E and B' = B * scaling / (ranknum + 1e-5).
"""

from __future__ import annotations

import re

import torch

from service.errors import AdapterInvalid
from service.model.loading import BaseModel

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_E)(?:\.[^.]+)?(?:\.weight)?$")
_EPSILON = 1e-5  # PEFT's, added to ranknum


def read_entries(
    config: dict, weights: dict[str, torch.Tensor], base: BaseModel, name: str
) -> list[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]]:
    """Per adapted linear layer of the base: (layer, A', B') ready for the gathered pool."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterInvalid(f"{name}: unexpected tensor {key} in an AdaLoRA adapter")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    init_r = config.get("init_r") or config.get("r")
    alpha = config.get("lora_alpha") or 0
    if not isinstance(init_r, int) or init_r <= 0:
        raise AdapterInvalid(f"{name}: AdaLoRA init_r must be a positive integer")
    entries = []
    for module_path, tensors in parts.items():
        if set(tensors) != {"lora_A", "lora_B", "lora_E"}:
            raise AdapterInvalid(f"{name}: {module_path} needs lora_A, lora_E and lora_B; found {sorted(tensors)}")
        a, e, b = tensors["lora_A"], tensors["lora_E"], tensors["lora_B"]
        rank = a.shape[0]
        if rank == 0:
            continue  # the budget cut this layer to rank 0: it adds nothing
        layer = base.linear_layer(module_path, name, "AdaLoRA")
        if a.shape != (rank, layer.in_features) or e.shape != (rank, 1) or b.shape != (layer.out_features, rank):
            raise AdapterInvalid(
                f"{name}: {module_path} has lora_A {tuple(a.shape)}, lora_E {tuple(e.shape)}, lora_B {tuple(b.shape)}; "
                f"this base needs (r, {layer.in_features}), (r, 1), ({layer.out_features}, r)"
            )
        scaling = alpha if alpha > 0 else float(rank)
        dtype = layer.weight.dtype
        entries.append((layer, (a * e).to(dtype), (b * (scaling / (init_r + _EPSILON))).to(dtype)))
    if not entries:
        raise AdapterInvalid(f"{name}: the weights hold no AdaLoRA update (lora_A / lora_E / lora_B)")
    return entries
