"""Plain LoRA read straight into the gathered pool: no PEFT model, no module injection.

Injecting an adapter into PEFT's model walks and wraps the base's modules (about 200 ms on the embedded model),
while serving a plain LoRA needs only its A and scaled B per linear layer. An adapter that uses anything beyond
that (DoRA, fan-in-fan-out, LoRA biases, rank or alpha patterns, LoRA on embeddings, ...) returns None here and is
hosted by PEFT as before.
"""

from __future__ import annotations

import math
import re

import torch

from service.errors import AdapterInvalid
from service.model.loading import BaseModel

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
# Config fields that change how LoRA computes (or which modules it wraps) beyond A and scaled B on linears.
_NEEDS_PEFT = ("use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern", "layer_replication",
               "target_parameters", "use_qalora", "megatron_config", "arrow_config", "alora_invocation_tokens")


def direct_entries(
    config: dict, weights: dict[str, torch.Tensor], base: BaseModel, name: str
) -> list[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]] | None:
    """Per adapted linear layer (layer, A [r, in], B * scaling [out, r]), or None when PEFT must host it."""
    if any(config.get(field) for field in _NEEDS_PEFT) or config.get("bias", "none") != "none":
        return None
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)):
        return None  # PEFT's own checks word the error
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            return None
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    entries = []
    for module_path, tensors in parts.items():
        if set(tensors) != {"lora_A", "lora_B"}:
            raise AdapterInvalid(f"{name}: {module_path} needs lora_A and lora_B; found {sorted(tensors)}")
        layer = base.linear_layer(module_path, name, "LoRA")
        a, b = tensors["lora_A"], tensors["lora_B"]
        if a.shape != (rank, layer.in_features) or b.shape != (layer.out_features, rank):
            raise AdapterInvalid(
                f"{name}: {module_path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; with r={rank} this "
                f"base needs ({rank}, {layer.in_features}) and ({layer.out_features}, {rank})"
            )
        dtype = layer.weight.dtype
        entries.append((layer, a.to(device=layer.weight.device, dtype=dtype),
                        (b.to(torch.float32) * scaling).to(device=layer.weight.device, dtype=dtype)))
    return entries or None
