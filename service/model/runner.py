"""Model execution: padded batched forward passes for classification and generation on the shared base.

Everything here runs on one worker thread (the batcher's executor), so adapter loads never race a forward pass.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import jinja2
import torch

from service.domain import AdapterInfo, GenerationParams
from service.errors import InvalidRequest
from service.model.adapters import LoadedAdapter, LoraHost, prepare_adapter
from service.model.compat import cache_keyword
from service.model.gathered import GatheredLora
from service.model.ia3 import IA3Pool
from service.model.kv_cache import KVCache, stack_right_aligned
from service.model.loading import BaseModel
from service.model.owned.kernels import torch_threads
from service.model.owned.model import OwnedModel, build_owned
from service.model.owned.ops import top_logits
from service.model.owned.slot_cache import CacheLimits
from service.model.prompt_tuning import virtual_ids, virtual_index

_PREFETCHED_KEPT = 16  # adapters prepared ahead of their load, at most


@dataclass
class GenerationJob:
    """A generation request with its prompt already tokenized."""

    params: GenerationParams
    prompt_ids: list[int]
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when its client is gone


def _rows_by_adapter(adapters: Sequence[LoadedAdapter | None]) -> list[list[int]]:
    rows: dict[int, list[int]] = {}
    for row, adapter in enumerate(adapters):
        rows.setdefault(id(adapter), []).append(row)
    return list(rows.values())


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[int]


class DecodingRow(Protocol):
    """What ``advance`` needs of a sequence being decoded."""

    job: GenerationJob
    generated: list[int]
    text: str
    prefix_offset: int  # incremental detokenization: tokens decoded as context only
    read_offset: int  # tokens whose text is already in ``text``


class ModelRunner:
    """Owns the base model, the LoRA host and the resident adapters' tensors; runs batches."""

    def __init__(self, base: BaseModel, lora_kernel: str = "gathered", forward: str = "auto",
                 limits: CacheLimits = CacheLimits()) -> None:
        self.base = base
        self.lora_host = LoraHost(base)
        self.lora_kernel = lora_kernel  # "gathered" (stacked weights) or "peft" (PEFT's adapter_names loop)
        self.gathered = GatheredLora()
        self.ia3 = IA3Pool(base)
        self._adapter_numbers = itertools.count()  # next() on a count is atomic: prefetch threads share it
        self._prefetched: dict[tuple[str, str], LoadedAdapter] = {}  # (name, sha256) -> prepared off-thread
        self._prefetch_lock = threading.Lock()
        config = base.model.config
        self.max_positions: int = base.family.max_positions(config)
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id: int = base.tokenizer.pad_token_id
        self._cache_keyword = cache_keyword(base.model.base_model)
        self._routed: Sequence[LoadedAdapter | None] = ()  # the rows' adapters, within ``lora_routing``
        # The owned forward for generation where the architecture has one ("transformers": never).
        self.owned: OwnedModel | None = None
        if forward != "transformers":
            self.owned = build_owned(base, self.gathered, self.ia3, limits, self.max_positions)
            if forward == "owned" and self.owned is None:
                raise ValueError(f"SERVICE_FORWARD=owned, but this base ({base.model.config.model_type}) has no "
                                 "owned forward; use auto or transformers")

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.base.model, "generation_config", None), self.base.model.config,
                       self.base.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    # -- adapters -------------------------------------------------------------------------------------------------

    def prefetch(self, info: AdapterInfo) -> None:
        """Read and prepare an adapter ahead of its load, from any thread but the model's (a request's, while it
        waits for the batcher), so the model thread only writes it into the pools. Errors are left to the load."""
        key = (info.name, info.sha256)
        with self._prefetch_lock:
            if key in self._prefetched:
                return
        try:
            adapter = self._prepare(info)
        except Exception:
            return
        with self._prefetch_lock:
            self._prefetched[key] = adapter
            while len(self._prefetched) > _PREFETCHED_KEPT:
                self._prefetched.pop(next(iter(self._prefetched)))

    def load(self, info: AdapterInfo) -> LoadedAdapter:
        with self._prefetch_lock:
            adapter = self._prefetched.pop((info.name, info.sha256), None)
        with torch.no_grad():  # as in ``_prepare``
            if adapter is None:
                adapter = self._prepare(info)
            try:
                self._install(adapter)
            except Exception:
                self.unload(adapter)  # nothing of a half-loaded adapter may stay in the shared model
                raise
        return adapter

    def _prepare(self, info: AdapterInfo) -> LoadedAdapter:
        # no_grad rather than inference_mode: PEFT later flips requires_grad on these tensors when switching.
        with torch.no_grad():
            return prepare_adapter(info, self.base, f"adapter{next(self._adapter_numbers)}",
                                   direct_lora=self.lora_kernel == "gathered")

    def _install(self, adapter: LoadedAdapter) -> None:
        if adapter.host_weights is not None:
            config, weights = adapter.host_weights
            adapter.host_weights = None
            self.lora_host.add(adapter.peft_name, config, weights)
        if adapter.pool_entries is not None:
            self.gathered.add_entries(adapter.peft_name, adapter.pool_entries)
            adapter.pool_entries = None  # the pool holds its own copy
        elif adapter.peft_name is not None and self.lora_host.hosts(adapter.peft_name):
            self.gathered.add(self.lora_host.peft_model, adapter.peft_name)
        if adapter.ia3 is not None:
            self.ia3.add(adapter.pool_name, adapter.ia3)

    def unload(self, adapter: LoadedAdapter) -> None:
        if adapter.pool_name is not None:
            self.ia3.remove(adapter.pool_name)
        if adapter.peft_name is not None:
            self.gathered.remove(adapter.peft_name)
            self.lora_host.remove(adapter.peft_name)

    @contextmanager
    def lora_routing(self, adapters: Sequence[LoadedAdapter | None], repeated: bool = False) -> Iterator[None]:
        """Route each row through its own LoRA adapter, or none (base and prefix rows).

        PEFT's LoRA layers are off by default, so rows without LoRA cost nothing extra. Plain LoRA adapters are
        applied from stacked weights gathered per row; others (DoRA, extra modules_to_save, ...) switch PEFT's
        layers on for the batch: ``set_adapter`` for one adapter, per-row ``adapter_names`` for a mix. ``repeated``
        says the same rows will be routed again (decode steps), so per-row work may be kept for them.
        """
        self._routed = adapters
        try:
            with self._lora_rows(adapters, repeated), self.ia3.route([a.pool_name if a else None for a in adapters]):
                yield
        finally:
            self._routed = ()

    @contextmanager
    def _lora_rows(self, adapters: Sequence[LoadedAdapter | None], repeated: bool) -> Iterator[None]:
        """Rows of adapters in the gathered pool get their deltas from it; the others (LoRA on embeddings, or all
        PEFT adapters with ``lora_kernel="peft"``) through PEFT's own layers, switched on for this batch only."""
        names = [a.peft_name if a is not None and a.peft_name is not None else None for a in adapters]
        hosted = self.lora_host.peft_model.peft_config if self.lora_host.peft_model is not None else {}
        by_pool = [n if n in self.gathered and (self.lora_kernel == "gathered" or n not in hosted) else None
                   for n in names]
        by_peft = [n if n is not None and pooled is None else None for n, pooled in zip(names, by_pool)]
        with ExitStack() as stack:
            if any(by_pool):
                stack.enter_context(self.gathered.route(by_pool, repeated))
            if any(by_peft):
                peft_model = stack.enter_context(self.lora_host.switched_on())
                if len(set(names)) == 1:  # every row the same adapter: PEFT's plain path
                    peft_model.set_adapter(names[0])
                else:
                    stack.enter_context(self.lora_host.rows_routed([n or "__base__" for n in by_peft]))
            yield

    # -- tokenization ---------------------------------------------------------------------------------------------

    def _check_length(self, ids: list[int], limit: int, what: str, virtual: int) -> None:
        """Refuse before batching what the model could not take: an adapter's virtual tokens take positions too,
        and a row the model fails on would be charged to its adapter."""
        room = self.max_positions - virtual
        if not ids:
            raise InvalidRequest(f"{what} is empty after tokenization")
        if len(ids) > min(limit, room):
            reason = f" ({self.max_positions} positions less the adapter's {virtual} virtual tokens)" if (
                room < limit and virtual) else ""
            raise InvalidRequest(f"{what} has {len(ids)} tokens; the limit is {min(limit, room)}{reason}")

    def encode_text(self, text: str, limit: int, what: str = "input", virtual: int = 0) -> list[int]:
        ids = self.base.tokenizer(text)["input_ids"]
        self._check_length(ids, limit, what, virtual)
        return ids

    def encode_with_offsets(self, text: str, limit: int, what: str = "input", virtual: int = 0) -> Encoded:
        """Token ids with each token's character span and whether it is a special token (token classification)."""
        if not self.base.tokenizer.is_fast:
            raise InvalidRequest("token classification needs a fast tokenizer (character offsets); this base has none")
        encoded = self.base.tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        self._check_length(encoded["input_ids"], limit, what, virtual)
        return Encoded(encoded["input_ids"], [tuple(o) for o in encoded["offset_mapping"]],
                       encoded["special_tokens_mask"])

    def encode_prompt(self, params: GenerationParams, limit: int, virtual: int = 0) -> list[int]:
        ids = self.encode_text(self._prompt_text(params), limit, "prompt", virtual)
        if virtual + len(ids) + (params.max_new_tokens or 1) > self.max_positions:
            virtual_part = f" + the adapter's {virtual} virtual tokens" if virtual else ""
            wanted = f"max_new_tokens ({params.max_new_tokens})" if params.max_new_tokens else "one new token"
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + {wanted}{virtual_part} exceeds the base model's {self.max_positions} "
                "positions"
            )
        return ids

    def _prompt_text(self, params: GenerationParams) -> str:
        turns = [{"role": m.role, "content": m.content} for m in params.messages]
        if not turns and params.chat:
            turns = [{"role": "user", "content": params.prompt}]
        if not turns:
            return params.prompt
        if self.base.tokenizer.chat_template is None:
            raise InvalidRequest("the base model has no chat template; send a plain prompt instead")
        try:
            return self.base.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as error:  # the template's own refusal (roles out of order, say)
            raise InvalidRequest(f"the base's chat template refused these messages: {error}", "messages") from None

    # -- batches --------------------------------------------------------------------------------------------------

    def _pad(self, sequences: Sequence[Sequence[int]], offsets: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """Pad to one width: on the left for decoders (every row's last token at -1), on the right for encoders
        (their positions start at the first token); positions count real tokens only, after the row's prefix."""
        width = max(len(s) for s in sequences)
        device = self.base.device
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
        left = self.base.family.pads_left
        for row, sequence in enumerate(sequences):
            columns = slice(width - len(sequence), width) if left else slice(0, len(sequence))
            ids[row, columns] = torch.tensor(sequence, dtype=torch.long, device=device)
            mask[row, columns] = 1
        offset = torch.tensor(offsets, dtype=torch.long, device=device).unsqueeze(1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + offset
        return ids, mask, positions

    def _prefix_cache(self, adapters: Sequence[LoadedAdapter | None]) -> tuple[KVCache, torch.Tensor]:
        """The rows' prefixes as one cache, each left-padded to the longest, and the mask over those slots."""
        lengths = [0 if a is None else a.num_virtual_tokens for a in adapters]
        longest = max(lengths)
        batch = len(adapters)
        mask = torch.zeros((batch, longest), dtype=torch.long, device=self.base.device)
        if longest == 0:
            return KVCache(), mask
        first = next(a for a in adapters if a is not None and a.prefix is not None)
        for row, length in enumerate(lengths):
            mask[row, longest - length:] = 1 if length else 0
        if all(a is first for a in adapters):  # one prefix for all rows: one copy per layer
            return stack_right_aligned([[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                         for k, v in first.prefix]], longest), mask
        no_prefix = [(k[:, :, :0], v[:, :, :0]) for k, v in first.prefix]
        rows = [no_prefix if a is None or a.prefix is None else a.prefix for a in adapters]
        return stack_right_aligned(rows, longest), mask

    def _backbone(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: KVCache | None
    ) -> Any:
        """The backbone's output for the batch (rows of adapters with their own embeddings embedded by them)."""
        inputs: dict[str, torch.Tensor] = {"input_ids": ids}
        own = [(row, a.vocabulary) for row, a in enumerate(self._routed)
               if a is not None and a.vocabulary is not None and a.vocabulary.changes_input]
        virtual = ids < 0
        has_virtual = bool(virtual.any())
        if own or has_virtual:
            embeddings = self.base.model.get_input_embeddings()(ids.clamp(min=0))
            for row, vocabulary in own:
                embeddings[row] = vocabulary.embed(ids[row].clamp(min=0), embeddings[row])
            for row in virtual.any(dim=1).nonzero().flatten().tolist() if has_virtual else []:
                tokens = self._routed[row].virtual_tokens
                embeddings[row, virtual[row]] = tokens[virtual_index(ids[row, virtual[row]])].to(embeddings.dtype)
            inputs = {"inputs_embeds": embeddings}
        family = self.base.family
        return family.backbone(self.base.model)(
            **inputs, attention_mask=mask, **family.forward_kwargs(positions, cache, self._cache_keyword)
        )

    def start(
        self, adapters: Sequence[LoadedAdapter | None], sequences: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache]:
        """Padded ids, the mask over prefix slots and tokens, positions, and the prefix cache for a batch."""
        offsets = [0 if a is None else a.num_virtual_tokens for a in adapters]
        # Prompt / P-tuning rows: placeholders for their virtual tokens, embedded by ``_backbone``.
        sequences = [s if a is None or a.virtual_tokens is None else virtual_ids(a.prompt_length) + list(s)
                     for a, s in zip(adapters, sequences)]
        ids, mask, positions = self._pad(sequences, offsets)
        cache, prefix_mask = self._prefix_cache(adapters)
        return ids, torch.cat([prefix_mask, mask], dim=1), positions, cache

    def classify(
        self, adapters: Sequence[LoadedAdapter], inputs: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """Class probabilities per input: each row through its own adapter and its own head."""
        with torch.inference_mode(), self.lora_routing(adapters):
            ids, mask, positions, cache = self.start(adapters, inputs)
            features = self.base.family.sequence_features(self._backbone(ids, mask, positions, cache))
            probabilities: list[list[float]] = [[] for _ in adapters]
            for rows in _rows_by_adapter(adapters):
                head = adapters[rows[0]].head
                assert head is not None
                logits = head(features[rows]).float()
                for row, values in zip(rows, torch.softmax(logits, dim=-1).tolist()):
                    probabilities[row] = values
            return probabilities

    def classify_tokens(
        self, adapters: Sequence[LoadedAdapter], inputs: Sequence[Sequence[int]]
    ) -> list[list[list[float]]]:
        """Label probabilities of every input token (virtual tokens and padding left out), per input."""
        with torch.inference_mode(), self.lora_routing(adapters):
            ids, mask, positions, cache = self.start(adapters, inputs)
            hidden = self._backbone(ids, mask, positions, cache).last_hidden_state
            token_mask = mask[:, -ids.shape[1]:].bool() & (ids >= 0)  # the rows' own tokens, in order
            probabilities: list[list[list[float]]] = [[] for _ in adapters]
            for rows in _rows_by_adapter(adapters):
                head = adapters[rows[0]].head
                assert head is not None
                scores = torch.softmax(head(hidden[rows]).float(), dim=-1)
                for row, row_scores in zip(rows, scores):
                    probabilities[row] = row_scores[token_mask[row]].tolist()
            return probabilities

    def logits(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """Next-token logits of each row (its last position); the cache grows by the given ids."""
        hidden = self.base.family.sequence_features(self._backbone(ids, mask, positions, cache))
        logits = self.base.model.get_output_embeddings()(hidden)
        for row, adapter in enumerate(self._routed):
            if adapter is not None and adapter.vocabulary is not None and adapter.vocabulary.changes_output:
                logits[row] = adapter.vocabulary.logits(hidden[row], logits[row])
        return logits

    def sample(
        self, logits: torch.Tensor, rows: Sequence[tuple[GenerationParams, torch.Generator | None]]
    ) -> list[int]:
        """One token per row: greedy at temperature 0, else temperature and nucleus (top_p) sampling.

        Sampled rows are done together: one softmax, one sort for top-p, and the exponential race (argmax of p/E,
        E ~ Exp(1), which draws from p) with each seeded row's noise from its own generator, so a seed gives the
        same tokens whatever else shares the batch.
        """
        # One pass over the logits, in the model's dtype, gives the greedy tokens and the finiteness check: a row's
        # maximum is NaN if any of its logits is (max propagates NaN), and +inf if one is. (A float copy, a separate
        # isfinite pass and an argmax took 4x as long: about 13 of a 64-row bf16 step's ~70 ms.)
        top, tokens = top_logits(logits)
        if not bool(torch.isfinite(top).all()):
            # Raised so the step is retried one adapter's rows at a time and the adapter giving them is quarantined.
            raise FloatingPointError("the model gave non-finite logits (NaN or inf)")
        sampled = [index for index, (params, _) in enumerate(rows) if params.temperature > 0.0]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            with torch_threads():  # softmax and sort over the vocabulary: torch's ops on all the threads
                tokens[index] = self._sampled_tokens(logits, rows, sampled, index)
        return tokens.tolist()

    @staticmethod
    def _sampled_tokens(logits: torch.Tensor, rows: Sequence[tuple[GenerationParams, torch.Generator | None]],
                        sampled: list[int], index: torch.Tensor) -> torch.Tensor:
        """The tokens of the rows at ``sampled`` (all with a temperature; ``index`` holds them), drawn together."""
        temperature = torch.tensor([rows[i][0].temperature for i in sampled], device=logits.device)
        probs = torch.softmax(logits[index].float() / temperature[:, None], dim=-1)
        top_p = torch.tensor([rows[i][0].top_p for i in sampled], device=logits.device)
        if bool((top_p < 1.0).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest head of the distribution whose mass reaches top_p (always the top token).
            outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]
            probs = probs.scatter(1, order, sorted_probs.masked_fill(outside, 0.0))
        noise = torch.empty_like(probs).exponential_()
        for position, row in enumerate(sampled):
            generator = rows[row][1]
            if generator is not None:
                noise[position].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)

    def advance(self, row: DecodingRow, token: int) -> str | None:
        """Append a sampled token to a row; the finish reason once the row is done, else None.

        Text is decoded incrementally (only the newest tokens, with a little look-back so merges across token
        boundaries come out right), and stop strings are looked for only where the new text could complete one.
        """
        params = row.job.params
        if row.job.cancelled.is_set():
            return "cancelled"
        row.generated.append(token)
        if token in self.eos_token_ids:
            if row.read_offset < len(row.generated) - 1:  # text held back for a split character: give it as is
                row.text += self._new_text(row, final=True)
            return "eos"
        before = len(row.text)
        row.text += self._new_text(row, final=len(row.generated) >= params.max_new_tokens)
        longest = max((len(stop) for stop in params.stop if stop), default=0)
        if longest:
            window = max(0, before - longest + 1)
            cuts = [cut for cut in (row.text.find(stop, window) for stop in params.stop if stop) if cut >= 0]
            if cuts:
                row.text = row.text[:min(cuts)]
                return "stop"
        if len(row.generated) >= params.max_new_tokens:
            return "length"
        return None

    def _new_text(self, row: DecodingRow, final: bool) -> str:
        """Text of the row's tokens past ``read_offset``, once it is whole (no dangling multi-byte piece), as
        vLLM and TGI detokenize: decode from ``prefix_offset`` and drop what those earlier tokens alone give."""
        tokenizer = self.base.tokenizer
        ids = row.generated
        prefix = tokenizer.decode(ids[row.prefix_offset:row.read_offset], skip_special_tokens=True)
        full = tokenizer.decode(ids[row.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            row.prefix_offset, row.read_offset = row.read_offset, len(ids)
            return full[len(prefix):]
        return ""
