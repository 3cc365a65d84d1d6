"""Model families: what differs between architectures (how the base loads, pads, pools and holds its heads).

Each family is a module of its own; a new architecture is a new module registered here, not new branches elsewhere.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from service.model.families.base import Family
from service.model.families.decoder import BloomFamily, DecoderFamily
from service.model.families.encoder import BertFamily, RobertaFamily

_BY_MODEL_TYPE: dict[str, Family] = {
    "bert": BertFamily(),
    "roberta": RobertaFamily(),
    "xlm-roberta": RobertaFamily(),
    "bloom": BloomFamily(),
}
DECODER = DecoderFamily()


def family_for(config: PretrainedConfig) -> Family:
    """Encoders by model type; everything else as a decoder with a causal LM head (the Llama family is tested)."""
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", ""), DECODER)


__all__ = ["DECODER", "Family", "family_for"]
