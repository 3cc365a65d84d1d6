"""The owned path's model: forward, slot cache and adapter routing, built for a base when its architecture has one."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from service.model.gathered import GatheredLora
from service.model.ia3 import IA3Pool
from service.model.loading import BaseModel
from service.model.owned.graphs import DecodeGraphs
from service.model.owned.kernels import kernel_threads
from service.model.owned.llama import LlamaForward, unsupported_reason
from service.model.owned.matmul import choose_packing
from service.model.owned.ops import KernelOps
from service.model.owned.prefix_cache import PrefixCache
from service.model.owned.routing import OwnedAdapters
from service.model.owned.slot_cache import CacheLimits, CacheShape, SlotCache

logger = logging.getLogger(__name__)


@dataclass
class OwnedModel:
    """What the owned path needs: the forward, its cache and the adapter routing."""

    forward: LlamaForward
    cache: SlotCache
    adapters: OwnedAdapters
    max_batch_tokens: int
    prefixes: PrefixCache
    decode_graphs: DecodeGraphs | None = None  # decode steps in static shapes (CUDA graphs on a GPU)

    def step_threads(self) -> contextlib.AbstractContextManager[None]:
        """The threading a step runs under: the kernels' team alone where they do all of it."""
        return kernel_threads() if self.forward.kernels_only else contextlib.nullcontext()


def build_owned(base: BaseModel, gathered: GatheredLora, ia3: IA3Pool, limits: CacheLimits,
                max_positions: int) -> OwnedModel | None:
    """The owned path for this base, or None (with the reason logged) when its architecture has none."""
    if not base.family.can_generate or base.family.name != "decoder":
        return None
    reason = unsupported_reason(base.model)
    if reason is not None:
        logger.info("generation uses the transformers forward: the owned one does not cover %s", reason)
        return None
    packing = choose_packing(base.dtype, base.device, allow_kernel=limits.cpu_kernels and limits.kernel_matmul)
    forward = LlamaForward(base.model, packing=packing, use_kernels=limits.cpu_kernels)
    shape = CacheShape.sized(limits, len(forward.layers), forward.kv_heads, forward.head_dim, max_positions,
                             forward.dtype)
    cache = SlotCache(shape, forward.dtype, base.device)
    logger.info("owned forward (%s weights, %s): %d slots of %d tokens, cache budget %d tokens (%.0f MiB)",
                f"{packing.value}-packed" if forward.layers[0].qkv.packed else "dense",
                "fused CPU kernels" if isinstance(forward.ops, KernelOps) else "torch ops", shape.slots,
                shape.slot_tokens, shape.budget_tokens, cache.nbytes_budget() / 2**20)
    adapters = OwnedAdapters(forward, gathered, ia3, shape.slots)
    graphs = None
    if limits.decode_graphs == "on":
        graphs = DecodeGraphs(forward, cache, adapters, capture=base.device.type == "cuda")
        logger.info("decode steps in static shapes by batch size (%s)",
                    "CUDA graphs" if base.device.type == "cuda" else "run eagerly: no CUDA graphs on a CPU")
    return OwnedModel(forward, cache, adapters, limits.max_batch_tokens, PrefixCache(cache, limits.prefix_cache_bytes),
                      graphs)
