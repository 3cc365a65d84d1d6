"""Checking an adapter against the base model from its config and safetensors header, before it reaches the model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from service.domain import AdapterInfo, AdapterKind
from service.errors import AdapterInvalid
from service.model.adapters import check_lora_config, prefix_refusal
from service.model.ia3 import is_feedforward
from service.model.loading import BaseModel
from service.store.safetensors_header import TensorSpec, read_header
from service.store.store import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, head_spec

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.[^.]+)?(?:\.weight)?$")


_ADALORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_E)(?:\.[^.]+)?$")
_IA3_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.ia3_l(?:\.[^.]+)?$")


class BaseShapes:
    """The base's module shapes, read once, for checking adapters without touching the model."""

    def __init__(self, base: BaseModel) -> None:
        config = base.model.config
        self.family = base.family
        self.hidden_size: int = config.hidden_size
        self.layers: int = config.num_hidden_layers
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.prefix_width: int = self.layers * 2 * kv_heads * head_dim
        self.linear: dict[str, tuple[int, int]] = {}
        self.embedding: dict[str, tuple[int, int]] = {}
        self.module_names: set[str] = set()
        for name, module in base.model.named_modules():
            # A LoRA host wraps modules in place; report the original module paths and shapes.
            name = re.sub(r"\.base_layer$", "", name)
            if ".lora_" in name or ".modules_to_save" in name or ".original_module" in name:
                continue
            self.module_names.add(name)
            base_layer = getattr(module, "base_layer", module)
            if isinstance(base_layer, torch.nn.Linear):
                self.linear[name] = (base_layer.in_features, base_layer.out_features)
            elif isinstance(base_layer, torch.nn.Embedding):
                self.embedding[name] = (base_layer.num_embeddings, base_layer.embedding_dim)


def check_adapter(
    info: AdapterInfo, shapes: BaseShapes, max_rank: int, max_virtual_tokens: int, max_tensors: int = 10_000
) -> None:
    """Refuse an adapter that does not fit the base, naming the problem."""
    path = Path(info.path)
    config = json.loads((path / CONFIG_FILE).read_text())
    tensors = {shapes.family.local_key(key): spec
               for key, spec in read_header(path / WEIGHTS_FILE, info.name, max_tensors).items()}
    head = head_spec(tensors)
    if head is not None and (len(head.shape) != 2 or head.shape[1] != shapes.hidden_size):
        raise AdapterInvalid(
            f"{info.name}: classification head has shape {head.shape}; this base needs (num_labels, "
            f"{shapes.hidden_size})"
        )
    if info.kind is AdapterKind.LORA:
        _check_lora(info.name, config, tensors, shapes, max_rank)
    elif info.kind is AdapterKind.PREFIX_TUNING:
        if not shapes.family.serves_prefix_tuning:
            raise prefix_refusal(info.name, shapes.family.name)
        _check_prefix(info.name, config, tensors, shapes, max_virtual_tokens)
    elif info.kind is AdapterKind.IA3:
        _check_ia3(info.name, config, tensors, shapes)
    elif info.kind is AdapterKind.ADALORA:
        _check_adalora(info.name, config, tensors, shapes, max_rank)
    else:
        _check_prompt(info.name, config, tensors, shapes, max_virtual_tokens)


def _check_lora(name: str, config: dict, tensors: dict[str, TensorSpec], shapes: BaseShapes, max_rank: int) -> None:
    ranks = [config.get("r", 0)] + list((config.get("rank_pattern") or {}).values())
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise AdapterInvalid(f"{name}: LoRA rank must be a positive integer")
    if max(ranks) > max_rank:
        raise AdapterInvalid(f"{name}: LoRA rank {max(ranks)} exceeds this service's limit of {max_rank}")
    check_lora_config(name, config)
    _check_targets(name, config.get("target_modules"), shapes)
    found = 0
    for key, spec in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        found += 1
        module, part = match["module"], match["part"]
        if module not in shapes.module_names:
            raise AdapterInvalid(f"{name}: targets module {module!r}, which this base does not have")
        _check_lora_shape(name, key, module, part, spec, shapes, max_rank)
    if not found:
        raise AdapterInvalid(f"{name}: the weights hold no LoRA tensors (lora_A / lora_B)")


def _check_targets(name: str, targets: object, shapes: BaseShapes) -> None:
    """PEFT's matching: a list names module suffixes, a string is a regex the full module name must match."""
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise AdapterInvalid(f"{name}: target_modules regex {targets!r} is invalid: {error}") from error
        if not any(pattern.fullmatch(module) for module in shapes.module_names):
            raise AdapterInvalid(f"{name}: target_modules regex {targets!r} matches no module of this base")
    elif isinstance(targets, list):
        missing = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in shapes.module_names)]
        if missing:
            raise AdapterInvalid(f"{name}: target_modules {missing} match no module of this base")


def _check_lora_shape(
    name: str, key: str, module: str, part: str, spec: TensorSpec, shapes: BaseShapes, max_rank: int
) -> None:
    if module in shapes.linear:
        in_features, out_features = shapes.linear[module]
        expected = {"lora_A": ("r", in_features), "lora_B": (out_features, "r")}.get(part)
    elif module in shapes.embedding:
        vocab, dim = shapes.embedding[module]
        expected = {"lora_embedding_A": ("r", vocab), "lora_embedding_B": (dim, "r")}.get(part)
    else:
        raise AdapterInvalid(f"{name}: module {module!r} is not a layer LoRA can adapt here")
    if expected is None or len(spec.shape) != 2:
        raise AdapterInvalid(f"{name}: tensor {key} has shape {spec.shape}, which does not fit {module}")
    for want, got in zip(expected, spec.shape):
        if (want == "r" and not 0 < got <= max_rank) or (want != "r" and want != got):
            shown = tuple("r" if w == "r" else w for w in expected)
            raise AdapterInvalid(f"{name}: tensor {key} has shape {spec.shape}; {module} needs {shown}")


def _check_ia3(name: str, config: dict, tensors: dict[str, TensorSpec], shapes: BaseShapes) -> None:
    found = 0
    for key, spec in tensors.items():
        match = _IA3_KEY.match(key)
        if match is None:
            continue
        found += 1
        module = match["module"]
        if module not in shapes.linear:
            raise AdapterInvalid(f"{name}: IA3 targets {module!r}, which is not a linear layer of this base")
        in_features, out_features = shapes.linear[module]
        expected = (1, in_features) if is_feedforward(module, config.get("feedforward_modules")) else (out_features, 1)
        if spec.shape != expected:
            raise AdapterInvalid(f"{name}: tensor {key} has shape {spec.shape}; {module} needs {expected}")
    if not found:
        raise AdapterInvalid(f"{name}: the weights hold no IA3 vectors (ia3_l)")


def _check_adalora(name: str, config: dict, tensors: dict[str, TensorSpec], shapes: BaseShapes, max_rank: int) -> None:
    init_r = config.get("init_r")
    if not isinstance(init_r, int) or init_r <= 0:
        raise AdapterInvalid(f"{name}: AdaLoRA init_r must be a positive integer")
    if init_r > max_rank:
        raise AdapterInvalid(f"{name}: AdaLoRA init_r {init_r} exceeds this service's limit of {max_rank}")
    _check_targets(name, config.get("target_modules"), shapes)
    found = 0
    for key, spec in tensors.items():
        match = _ADALORA_KEY.match(key)
        if match is None:
            continue
        found += 1
        module, part = match["module"], match["part"]
        if module not in shapes.linear:
            raise AdapterInvalid(f"{name}: AdaLoRA targets {module!r}, which is not a linear layer of this base")
        in_features, out_features = shapes.linear[module]
        expected = {"lora_A": ("r", in_features), "lora_E": ("r", 1), "lora_B": (out_features, "r")}[part]
        if len(spec.shape) != 2 or any(w != "r" and w != g for w, g in zip(expected, spec.shape)) or \
                max(d for w, d in zip(expected, spec.shape) if w == "r") > init_r:
            raise AdapterInvalid(f"{name}: tensor {key} has shape {spec.shape}; {module} needs {expected} "
                                 f"with r <= init_r ({init_r})")
    if not found:
        raise AdapterInvalid(f"{name}: the weights hold no AdaLoRA tensors (lora_A / lora_E / lora_B)")


def _virtual_tokens(name: str, config: dict, max_virtual_tokens: int) -> int:
    virtual = config.get("num_virtual_tokens")
    if not isinstance(virtual, int) or virtual <= 0:
        raise AdapterInvalid(f"{name}: num_virtual_tokens must be a positive integer")
    if virtual > max_virtual_tokens:
        raise AdapterInvalid(
            f"{name}: num_virtual_tokens {virtual} exceeds this service's limit of {max_virtual_tokens}")
    return virtual


def _check_prompt(
    name: str, config: dict, tensors: dict[str, TensorSpec], shapes: BaseShapes, max_virtual_tokens: int
) -> None:
    """Prompt tuning and P-tuning save their virtual token embeddings (P-tuning's already through its encoder)."""
    virtual = _virtual_tokens(name, config, max_virtual_tokens)
    spec = tensors.get("prompt_embeddings")
    expected = (virtual, shapes.hidden_size)
    if spec is None or spec.shape != expected:
        got = None if spec is None else spec.shape
        raise AdapterInvalid(f"{name}: prompt_embeddings has shape {got}; this base needs {expected} "
                             "(num_virtual_tokens x hidden size)")


def _check_prefix(
    name: str, config: dict, tensors: dict[str, TensorSpec], shapes: BaseShapes, max_virtual_tokens: int
) -> None:
    virtual = _virtual_tokens(name, config, max_virtual_tokens)
    spec = tensors.get("prompt_embeddings")
    expected = (virtual, shapes.prefix_width)
    if spec is None or spec.shape != expected:
        got = None if spec is None else spec.shape
        raise AdapterInvalid(
            f"{name}: prompt_embeddings has shape {got}; this base needs {expected} "
            f"(num_virtual_tokens x layers*2*kv_heads*head_dim)"
        )


def check_tokenizer(info: AdapterInfo, base_tokenizer: PreTrainedTokenizerBase) -> None:
    """An adapter saved with its tokenizer is served with the base's: refuse it if that tokenizer's vocabulary
    differs (added tokens), since its requests would be tokenized and decoded wrongly."""
    path = Path(info.path)
    if not any((path / file).is_file() for file in TOKENIZER_FILES):
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as error:  # malformed tokenizer files raise many types
        raise AdapterInvalid(f"{info.name}: its tokenizer files cannot be read ({type(error).__name__}: {error}); "
                             "leave them out of the archive, or re-save them with tokenizer.save_pretrained") from error
    ours, base = tokenizer.get_vocab(), base_tokenizer.get_vocab()
    if ours != base:
        added = sorted(set(ours) - set(base), key=lambda token: ours[token])
        raise AdapterInvalid(
            f"{info.name}: its tokenizer differs from the base's ({len(ours)} tokens against {len(base)}; added: "
            f"{added[:5]}): requests for it would be tokenized with the base's vocabulary, which this service "
            "serves for every adapter. Train without added tokens (reuse existing special tokens), or leave the "
            "tokenizer out if it is the base's own"
        )
