"""Turning an adapter folder into what the runner needs, on the one shared base model.

LoRA adapters are injected into a single PEFT ``PeftModel`` that wraps the base in place (PEFT cannot hold LoRA and
prefix adapters in one model, and injection changes the base's modules, so there is one LoRA host). Prefix adapters
never touch the model: their past key/values are computed once here. Classification heads are kept apart as small
linear layers and applied to the backbone's pooled hidden state, so no second copy of the base is ever made.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig
from peft.tuners.lora import LoraLayer
from peft.utils import AuxiliaryTrainingWrapper, set_peft_model_state_dict
from peft.utils.other import _prepare_prompt_learning_config
from safetensors.torch import load_file

from service.domain import AdapterInfo, AdapterKind, Task
from service.errors import AdapterInvalid
from service.model.adalora import read_entries
from service.model.compat import peft_internal_deprecations_silenced
from service.model.families.base import HEAD_KEY, head_outputs
from service.model.ia3 import Vectors, read_vectors
from service.model.loading import BaseModel
from service.model.lora_direct import direct_entries
from service.model.prompt_tuning import load_virtual_tokens
from service.model.vocabulary import VOCABULARY_MODULES, VocabularyOverride, split_vocabulary, to_device

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
HEAD_MODULES = ("score", "classifier")


@dataclass
class LoadedAdapter:
    """An adapter resident in the model, ready to serve."""

    info: AdapterInfo
    head: torch.nn.Module | None = None
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (key, value): [1, kv_heads, P, dim]
    peft_name: str | None = None  # its name inside the LoRA host
    vocabulary: VocabularyOverride | None = None  # its own embeddings / output head rows, if it saved any
    virtual_tokens: torch.Tensor | None = None  # prompt / P-tuning: [P, hidden] embeddings before its tokens
    ia3: Vectors | None = None  # IA3: scaling vectors by module path (held by the runner's IA3 pool)
    pool_name: str | None = None  # its slot name in the runner's IA3 pool
    # Plain LoRA and AdaLoRA: (base layer, A, scaled B) handed to the gathered pool at load (slot name ``peft_name``)
    pool_entries: list[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]] | None = None
    # LoRA that PEFT must host: (config, weights) for the host, added on the model thread at install
    host_weights: tuple[dict, dict[str, torch.Tensor]] | None = None

    @property
    def prompt_length(self) -> int:
        return 0 if self.virtual_tokens is None else self.virtual_tokens.shape[0]

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prefix is None else self.prefix[0][0].shape[2]

    @property
    def resident_bytes(self) -> int:
        tensors: list[torch.Tensor] = []
        if self.head is not None:
            tensors += list(self.head.parameters())
        if self.prefix is not None:
            tensors += [t for pair in self.prefix for t in pair]
        if self.virtual_tokens is not None:
            tensors.append(self.virtual_tokens)
        if self.ia3 is not None:
            tensors += [vector for vector, _ in self.ia3.values()]
        vocabulary = self.vocabulary.nbytes if self.vocabulary is not None else 0
        # LoRA tensors are counted by their file, which also holds the vocabulary matrices counted here.
        lora = max(0, self.info.size_bytes - vocabulary) if self.peft_name else 0
        return sum(t.numel() * t.element_size() for t in tensors) + vocabulary + lora


def read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load safetensors weights only: pickle formats can run code and are never read."""
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterInvalid(f"{path.name}: {WEIGHTS_FILE} is missing")
    try:
        return load_file(str(weights_path))
    except Exception as error:  # safetensors raises several types for corrupt files
        raise AdapterInvalid(f"{path.name}: {WEIGHTS_FILE} cannot be read: {error}") from error


def split_head(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate a task head (``score`` / ``classifier`` in modules_to_save) from the other weights; the head's
    parameters by their name inside it (``weight``, ``dense.weight`` ...)."""
    head: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        match = HEAD_KEY.match(key)
        if match:
            head[match["param"]] = tensor
        else:
            rest[key] = tensor
    return head, rest


def build_head(head_weights: dict[str, torch.Tensor], base: BaseModel, task: Task, name: str) -> torch.nn.Module:
    """The architecture's own head for the task, with the adapter's weights."""
    family = base.family
    head = (family.sequence_head if task is Task.CLASSIFICATION else family.token_head)(head_weights, name)
    first = next(m for m in head.modules() if isinstance(m, torch.nn.Linear))
    hidden = base.model.config.hidden_size
    if first.in_features != hidden:
        raise AdapterInvalid(
            f"{name}: its head reads {first.in_features} features; this base's hidden size is {hidden}")
    return head.to(device=base.device, dtype=base.dtype).eval().requires_grad_(False)


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as error:
        raise AdapterInvalid(f"{path.name}: {CONFIG_FILE} cannot be read: {error}") from error
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{path.name}: {CONFIG_FILE} must hold a JSON object")
    return config


def compute_prefix(
    config_dict: dict, weights: dict[str, torch.Tensor], base: BaseModel, name: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer past key/values a prefix adapter puts before every input, computed once.

    Mirrors ``PeftModel.get_prompt`` for a loaded (inference-mode) adapter: the saved ``prompt_embeddings`` already
    hold the projected prefix when ``prefix_projection`` was used, so no MLP runs here.
    """
    fields = {k: v for k, v in config_dict.items() if k in PrefixTuningConfig.__dataclass_fields__}
    try:
        config = PrefixTuningConfig(**fields)
        _prepare_prompt_learning_config(config, base.model.config)
    except (TypeError, ValueError) as error:
        raise AdapterInvalid(f"{name}: prefix tuning config is invalid: {error}") from error
    embeddings = weights.get("prompt_embeddings")
    layers = base.model.config.num_hidden_layers
    expected = (config.num_virtual_tokens, layers * 2 * config.token_dim)
    if embeddings is None or tuple(embeddings.shape) != expected:
        shape = None if embeddings is None else tuple(embeddings.shape)
        raise AdapterInvalid(f"{name}: prompt_embeddings has shape {shape}, this base needs {expected}")
    kv_heads = getattr(base.model.config, "num_key_value_heads", None) or base.model.config.num_attention_heads
    head_dim = config.token_dim // config.num_attention_heads
    model_head_dim = getattr(base.model.config, "head_dim", None) or (
        base.model.config.hidden_size // base.model.config.num_attention_heads
    )
    if config.num_layers != layers or config.num_attention_heads != kv_heads or head_dim != model_head_dim:
        raise AdapterInvalid(
            f"{name}: prefix was made for {config.num_layers} layers x {config.num_attention_heads} kv heads x "
            f"{head_dim} dims; this base has {layers} x {kv_heads} x {model_head_dim}"
        )
    past = embeddings.to(device=base.device, dtype=base.dtype).view(
        1, config.num_virtual_tokens, layers * 2, config.num_attention_heads, head_dim
    )
    per_layer = past.permute([2, 0, 3, 1, 4]).split(2)  # layers x [2, 1, heads, P, dim]
    return [(kv[0].contiguous(), kv[1].contiguous()) for kv in per_layer]


class LoraHost:
    """The single PEFT LoRA model wrapped around the base; adapters are added and removed by name."""

    def __init__(self, base: BaseModel) -> None:
        self._base = base
        self.peft_model: PeftModel | None = None

    def add(self, name: str, config_dict: dict, weights: dict[str, torch.Tensor]) -> None:
        fields = {k: v for k, v in config_dict.items() if k in LoraConfig.__dataclass_fields__}
        # Heads and vocabulary parts are served apart from the LoRA host (see ``check_lora_weights``).
        # init_lora_weights: PiSSA, OLoRA and the like rewrite the base layer's weights when initialising; the
        # saved A and B replace the initial ones anyway, and the shared base must never change.
        fields.update(modules_to_save=None, trainable_token_indices=None, inference_mode=True, task_type=None,
                      init_lora_weights=True)
        try:
            config = LoraConfig(**fields)
        except (TypeError, ValueError) as error:
            raise AdapterInvalid(f"{name}: LoRA config is invalid: {error}") from error
        try:
            with peft_internal_deprecations_silenced():
                if self.peft_model is None:
                    self.peft_model = PeftModel(self._base.model, config, adapter_name=name)
                else:
                    self.peft_model.add_adapter(name, config)
        except (ValueError, RuntimeError, KeyError) as error:
            self._discard(name)
            raise AdapterInvalid(f"{name}: cannot apply LoRA to this base: {error}") from error
        try:
            result = set_peft_model_state_dict(self.peft_model, weights, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as error:
            self._discard(name)
            raise AdapterInvalid(f"{name}: weights do not fit this base: {error}") from error
        unexpected = [k for k in result.unexpected_keys if "lora_" in k or "modules_to_save" in k]
        if unexpected:
            self._discard(name)
            raise AdapterInvalid(f"{name}: weights name modules this base lacks: {unexpected[:3]}")
        self.peft_model.requires_grad_(False)
        self.peft_model.eval()
        self._switch_off()

    def remove(self, name: str) -> None:
        self._discard(name)

    def hosts(self, name: str) -> bool:
        return self.peft_model is not None and name in self.peft_model.peft_config

    def _discard(self, name: str) -> None:
        if self.peft_model is not None and name in self.peft_model.peft_config:
            self.peft_model.delete_adapter(name)
            self._switch_off()

    def _switch_off(self) -> None:
        # PEFT's LoRA layers stay off between batches: switching them per batch walks every adapter of every
        # layer (requires_grad bookkeeping), which with many resident adapters costs more than the forward.
        if self.peft_model is not None and self.peft_model.peft_config:
            self.peft_model.base_model.disable_adapter_layers()

    @contextmanager
    def rows_routed(self, row_names: list[str]) -> Iterator[None]:
        """Each row through its own PEFT adapter (``__base__``: none), as PEFT's ``adapter_names`` does.

        PEFT's own context for this leaves its hooks in place when the forward raises, so one failed batch made
        every later mixed batch fail; these hooks are removed whatever happens.
        """
        assert self.peft_model is not None

        def inject(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            kwargs["adapter_names"] = row_names
            return args, kwargs

        handles = [
            module.register_forward_pre_hook(inject, with_kwargs=True)
            for module in self.peft_model.modules() if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def switched_on(self) -> Iterator[PeftModel]:
        """PEFT's own LoRA layers on, for batches the gathered path cannot serve."""
        assert self.peft_model is not None
        self.peft_model.base_model.enable_adapter_layers()
        try:
            yield self.peft_model
        finally:
            self._switch_off()


def prefix_refusal(name: str, family: str) -> AdapterInvalid:
    return AdapterInvalid(
        f"{name}: prefix tuning on a {family} base is not served: PEFT 0.21.2 itself fails on it with transformers 5, "
        "so there is no reference to match; prompt tuning, P-tuning, LoRA, AdaLoRA and IA3 are served on it"
    )


def check_lora_config(name: str, config: dict) -> None:
    """Refuse LoRA features that cannot share a batch with other adapters, saying what to change."""
    if config.get("use_dora"):
        raise AdapterInvalid(
            f"{name}: DoRA (use_dora=true) is not served: its magnitude vectors rescale whole weight matrices per "
            "adapter, which PEFT cannot mix with other adapters in one batch. Retrain with use_dora=false, or merge "
            "it into a model of its own (merge_and_unload)"
        )
    others = [m for m in (config.get("modules_to_save") or []) if m not in HEAD_MODULES + VOCABULARY_MODULES]
    if others:
        raise AdapterInvalid(
            f"{name}: modules_to_save on {others} is not served (only the classification head, embed_tokens and "
            "lm_head are): a whole copy of a shared layer per adapter cannot share a batch. Retrain with LoRA on "
            "those modules (target_modules) instead"
        )


def check_lora_weights(name: str, config: dict, weights: dict[str, torch.Tensor]) -> None:
    """Refuse what would copy or change a shared module: PEFT's per-adapter copies of whole layers
    (``modules_to_save``) break mixed batches, and non-LoRA tensors would be loaded into the base itself."""
    check_lora_config(name, config)
    foreign = [k for k in weights if "lora_" not in k]
    if foreign:
        raise AdapterInvalid(
            f"{name}: the weights hold {foreign[:3]}, which would overwrite the shared base model's parameters "
            "(bias='all' or 'lora_only' trains the base's biases): retrain with bias='none'"
        )


def prepare_adapter(info: AdapterInfo, base: BaseModel, peft_name: str, direct_lora: bool = True) -> LoadedAdapter:
    """Read and check an adapter folder and compute everything it needs (prefix key/values, head, pool entries:
    plain LoRA straight for the pool with ``direct_lora``), touching nothing shared: it may run off the model
    thread. The runner's ``install`` then puts it into the pools (and PEFT's host, for LoRA only PEFT computes)."""
    path = Path(info.path)
    config_dict = read_config(path)
    weights = {base.family.local_key(key): tensor for key, tensor in read_adapter_weights(path).items()}
    head_weights, weights = split_head(weights)
    head = build_head(head_weights, base, info.task, info.name) if info.task is not Task.GENERATION else None
    if head is not None and info.labels is not None and len(info.labels) != head_outputs(head):
        raise AdapterInvalid(
            f"{info.name}: labels.json names {len(info.labels)} labels but the head has {head_outputs(head)} outputs"
        )
    if info.kind is AdapterKind.PREFIX_TUNING and not base.family.serves_prefix_tuning:
        raise prefix_refusal(info.name, base.family.name)
    if info.kind is AdapterKind.PREFIX_TUNING:
        prefix = compute_prefix(config_dict, weights, base, info.name)
        return LoadedAdapter(info=info, head=head, prefix=prefix)
    if info.kind in (AdapterKind.PROMPT_TUNING, AdapterKind.P_TUNING):
        virtual_tokens = load_virtual_tokens(config_dict, weights, base, info.name)
        return LoadedAdapter(info=info, head=head, virtual_tokens=virtual_tokens)
    if info.kind is AdapterKind.ADALORA:
        return LoadedAdapter(info=info, head=head, peft_name=peft_name,
                             pool_entries=read_entries(config_dict, weights, base, info.name))
    if info.kind is AdapterKind.IA3:
        return LoadedAdapter(info=info, head=head, ia3=read_vectors(config_dict, weights, base, info.name),
                             pool_name=peft_name)
    embedding = base.model.get_input_embeddings()
    embedding = getattr(embedding, "base_layer", embedding).weight  # under a LoRA host, the original module's
    tied = bool(getattr(base.model.config, "tie_word_embeddings", False))
    output = base.model.get_output_embeddings() or base.model.get_input_embeddings()  # encoders have no LM head
    output = getattr(output, "base_layer", output).weight
    vocabulary, weights = split_vocabulary(weights, config_dict, info.name, embedding, output, tied)
    check_lora_weights(info.name, config_dict, weights)
    if vocabulary is not None:
        vocabulary = to_device(vocabulary, base.device, base.dtype)
    entries = direct_entries(config_dict, weights, base, info.name) if direct_lora else None
    if entries is not None:
        return LoadedAdapter(info=info, head=head, peft_name=peft_name, vocabulary=vocabulary, pool_entries=entries)
    return LoadedAdapter(info=info, head=head, peft_name=peft_name, vocabulary=vocabulary,
                         host_weights=(config_dict, weights))
