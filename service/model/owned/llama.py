"""The service's own forward pass for the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2 with its q/k/v bias).

Weights are taken from the loaded HF model once: q/k/v fused into one matrix, gate/up into another (prepacked in
bf16 on a CPU), and the HF modules made to compute through them (``matmul.py``), so the base sits in memory once
and the transformers path (PEFT, classification) still runs on the very same numbers. A step's tokens
are one flat batch [tokens, hidden]: the running rows' decode tokens first, then chunks of prompts being prefilled.
Every matmul runs on the whole flat batch; attention runs per group over the slot cache (one call for all decode
rows over a view of their slots, one per prompt chunk). Adapters act through ``StepAdapters``: per-row LoRA deltas
land in their slice of the fused projections, IA3 scales theirs; prefix and prompt tuning live in the cache and the
input embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel

from service.model.owned.batch import StepBatch
from service.model.owned.matmul import Matmul, Packing, fuse, head_logits, kernel_head_applies
from service.model.owned.ops import Attention, KernelOps, StepOps, step_ops
from service.model.owned.slot_cache import SlotCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The modules behind each matmul of a layer, in the order of their columns in its output.
_QKV, _O, _GATE_UP, _DOWN = ("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the owned forward cannot run this model (None: it can)."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} (owned: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in SUPPORTED_ROPE_TYPES:
        return f"rope type {rope!r}"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        return f"sliding window attention ({window})"
    return None


class StepAdapters(Protocol):
    """What the forward asks of the step's adapters, per layer and module (``None``: nothing to do)."""

    def adapt(self, layer: int, names: tuple[str, ...], x: torch.Tensor, output: torch.Tensor) -> None:
        """In place on ``output`` [tokens, out], the fused output of these modules for ``x`` [tokens, in]: each
        module's LoRA delta added to its columns, then its IA3 output scale."""

    def scale_input(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` [tokens, features], the input of this module, scaled by each token's IA3 vector (in place where
        the kernels run); ``x`` itself where no adapter scales it."""

    def touches(self, layer: int, names: tuple[str, ...]) -> bool:
        """Whether ``adapt`` may change the fused output of these modules of a layer."""


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: Matmul
    o: Matmul
    post_norm: torch.Tensor
    gate_up: Matmul
    down: Matmul


class LlamaForward:
    def __init__(self, model: PreTrainedModel, packing: Packing = Packing.DENSE, use_kernels: bool = False) -> None:
        config = model.config
        self.config = config
        self.heads: int = config.num_attention_heads
        self.kv_heads: int = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.ops: StepOps = step_ops(model.device, self.head_dim, self.kv_heads, self.heads // self.kv_heads,
                                     model.get_input_embeddings().weight.dtype, use_kernels)
        self.eps: float = config.rms_norm_eps
        backbone = model.model
        self.embed = backbone.embed_tokens.weight
        self.final_norm = backbone.norm.weight
        head = model.get_output_embeddings()
        self.lm_head = head.weight
        self.lm_head_bias = getattr(head, "bias", None)
        self.kernel_head = kernel_head_applies(self.lm_head, self.lm_head_bias, packing)
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        self.intermediate: int = config.intermediate_size
        # Each module's slice of its fused output (and which fused matmul produces it).
        self.slices = {
            "q_proj": slice(0, self.q_size),
            "k_proj": slice(self.q_size, self.q_size + self.kv_size),
            "v_proj": slice(self.q_size + self.kv_size, self.q_size + 2 * self.kv_size),
            "gate_proj": slice(0, self.intermediate),
            "up_proj": slice(self.intermediate, 2 * self.intermediate),
            "o_proj": slice(None),  # unfused: the whole output
            "down_proj": slice(None),
        }
        self.layers: list[_Layer] = []
        self.modules: list[dict[str, torch.nn.Linear]] = []  # the HF linears, by layer (adapter pools key on them)
        for layer in backbone.layers:
            attention, mlp = layer.self_attn, layer.mlp
            linears = {name: getattr(attention if name[0] in "qkvo" else mlp, name) for name in MODULES}
            linears = {name: getattr(module, "base_layer", module) for name, module in linears.items()}
            self.modules.append(linears)
            self.layers.append(_Layer(
                input_norm=layer.input_layernorm.weight,
                qkv=fuse([linears["q_proj"], linears["k_proj"], linears["v_proj"]], packing),
                o=fuse([linears["o_proj"]], packing),
                post_norm=layer.post_attention_layernorm.weight,
                gate_up=fuse([linears["gate_proj"], linears["up_proj"]], packing),
                down=fuse([linears["down_proj"]], packing),
            ))
        rotary = backbone.rotary_emb
        positions = torch.arange(config.max_position_embeddings, device=self.embed.device)
        freqs = positions[:, None].float() * rotary.inv_freq.to(device=self.embed.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        scaling = rotary.attention_scaling
        self.cos = (angles.cos() * scaling).to(self.embed.dtype)
        self.sin = (angles.sin() * scaling).to(self.embed.dtype)
        # Whether gate/up and SiLU-and-mul run as one kernel where no adapter changes gate/up (the kernels' own
        # SiLU, so the bits are the unfused pair's).
        self.fused_activation: bool = (isinstance(self.ops, KernelOps)
                                       and all(layer.gate_up.fuses_silu_mul for layer in self.layers))
        # Whether every matmul and step op of a step runs in the service's kernels (none in torch's own).
        self.kernels_only: bool = (isinstance(self.ops, KernelOps) and self.kernel_head
                                   and all(m.packing is Packing.KERNEL for layer in self.layers
                                           for m in (layer.qkv, layer.o, layer.gate_up, layer.down)))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def __call__(self, batch: StepBatch, cache: SlotCache, adapters: StepAdapters | None,
                 wanted: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden state of the flat tokens at ``wanted`` (indices), after writing every token's
        keys/values into its row's slot."""
        attend = self.ops.attention(batch, cache, self.heads)
        return self.layers_forward(batch.embeddings, batch.positions, attend, adapters)[wanted]

    def layers_forward(self, x: torch.Tensor, positions: torch.Tensor, attend: Attention,
                       adapters: StepAdapters | None) -> torch.Tensor:
        """The final-normed hidden state of every token of ``x`` [tokens, hidden] (used as the residual stream, in
        place), attending through ``attend``."""
        ops = self.ops
        tokens = x.shape[0]
        rotated = self.heads + self.kv_heads
        fused_activation = self.fused_activation
        h = ops.add_norm(x, None, self.layers[0].input_norm, self.eps)
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(h)
            if adapters is not None:
                adapters.adapt(index, _QKV, h, qkv)
            ops.rotate(qkv, rotated, self.head_dim, self.cos, self.sin, positions)
            q = qkv[:, :self.q_size].view(tokens, self.heads, self.head_dim)
            k = qkv[:, self.q_size:self.q_size + self.kv_size].view(tokens, self.kv_heads, self.head_dim)
            v = qkv[:, self.q_size + self.kv_size:].view(tokens, self.kv_heads, self.head_dim)
            attention = attend(index, q, k, v).reshape(tokens, self.q_size)
            o = layer.o(attention)
            if adapters is not None:
                adapters.adapt(index, _O, attention, o)
            h = ops.add_norm(x, o, layer.post_norm, self.eps)
            if fused_activation and (adapters is None or not adapters.touches(index, _GATE_UP)):
                act = layer.gate_up.silu_mul(h)
            else:
                gate_up = layer.gate_up(h)
                if adapters is not None:
                    adapters.adapt(index, _GATE_UP, h, gate_up)
                act = ops.silu_mul(gate_up)
            if adapters is not None:
                act = adapters.scale_input(index, "down_proj", act)
            down = layer.down(act)
            if adapters is not None:
                adapters.adapt(index, _DOWN, act, down)
            following = self.layers[index + 1].input_norm if index + 1 < len(self.layers) else self.final_norm
            h = ops.add_norm(x, down, following, self.eps)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.kernel_head:
            return head_logits(hidden, self.lm_head)
        return self.ops.logits(hidden, self.lm_head, self.lm_head_bias)
