"""Rows of different adapters and kinds in one forward pass give each row its single-request PEFT answer, and that
answer is not the base's (so a reference that silently dropped an adapter cannot make a test pass)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from service.domain import GenerationParams
from service.model.adapters import LoadedAdapter
from service.model.generation import generate
from service.model.runner import GenerationJob, ModelRunner
from service.store.store import AdapterStore

CLASSIFY_ROWS = [
    ("lora-cls", "hello world"),
    ("prefix-cls", "a much longer input that needs padding in the batch for sure"),
    ("lora-cls3", "x"),
    ("prefix-proj-cls", "symbols !? and 1 2 3"),
    ("lora-cls", "another one for the same adapter"),
    ("prompt-cls", "prompt tuning row with padding around it"),
    ("ptuning-cls", "p"),
    ("ia3-cls", "ia3 scales this row only"),
    ("adalora-cls", "adalora through the gathered pool"),
]
GENERATE_ROWS = [
    ("lora-gen", "hello world", 6),
    ("prefix-gen", "a much longer prompt so that the rows have different lengths", 12),
    (None, "base row", 9),
    ("lora-gen-mlp", "x marks", 4),
    ("prefix-proj-gen", "prefix with projection", 10),
    ("lora-gen", "same adapter twice", 8),
    ("prompt-gen", "prompt tuned row", 7),
    ("ptuning-lstm-gen", "an lstm p-tuning row that is a little longer", 9),
    ("prompt-text-gen", "y", 5),
    ("ia3-gen", "ia3 generation row", 8),
    ("ia3-attn-gen", "another ia3 adapter on other layers", 6),
    ("adalora-gen", "adalora row", 7),
]


@pytest.fixture(params=["gathered", "peft"])
def kernel(request: pytest.FixtureRequest, runner: ModelRunner) -> Iterator[str]:
    """Both ways of computing a mixed LoRA batch must give every row its own answer."""
    runner.lora_kernel = request.param
    yield request.param
    runner.lora_kernel = "gathered"


def test_mixed_classification_batch(kernel: str, runner: ModelRunner, store: AdapterStore, tiny_base: Path,
                                    tiny_adapters: dict[str, Path]) -> None:
    tokenizer = runner.base.tokenizer
    loaded = {name: runner.load(store.get(name)) for name, _ in CLASSIFY_ROWS}
    got = runner.classify([loaded[n] for n, _ in CLASSIFY_ROWS], [tokenizer(t)["input_ids"] for _, t in CLASSIFY_ROWS])
    for (name, text), probabilities in zip(CLASSIFY_ROWS, got):
        info = store.get(name)
        model = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=len(info.labels)),
            tiny_adapters[name],
        ).eval()
        with torch.no_grad():
            expected = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits, -1)[0]
        assert torch.allclose(torch.tensor(probabilities), expected, atol=1e-4), name
    heads_only = [LoadedAdapter(info=loaded[n].info, head=loaded[n].head) for n, _ in CLASSIFY_ROWS]
    on_base = runner.classify(heads_only, [tokenizer(t)["input_ids"] for _, t in CLASSIFY_ROWS])
    for (name, _), ours, base in zip(CLASSIFY_ROWS, got, on_base):
        assert (torch.tensor(ours) - torch.tensor(base)).abs().max() > 1e-3, name
    if kernel == "gathered":  # the stacked path serves every LoRA adapter of this batch
        assert runner.gathered.supports([a.peft_name for a in loaded.values() if a.peft_name])
    for adapter in loaded.values():
        runner.unload(adapter)


def test_mixed_generation_batch(kernel: str, runner: ModelRunner, store: AdapterStore, tiny_base: Path,
                                tiny_adapters: dict[str, Path]) -> None:
    tokenizer = runner.base.tokenizer
    loaded = {name: runner.load(store.get(name)) for name, _, _ in GENERATE_ROWS if name}
    jobs = [GenerationJob(GenerationParams(prompt=p, max_new_tokens=n), tokenizer(p)["input_ids"])
            for _, p, n in GENERATE_ROWS]
    got = generate(runner, [loaded.get(name) for name, _, _ in GENERATE_ROWS], jobs)
    on_base = generate(runner, [None] * len(jobs), jobs)
    for (name, _, _), generation, base in zip(GENERATE_ROWS, got, on_base):
        assert (generation.text == base.text) == (name is None), (name, generation.text)
    for (name, prompt, n), generation in zip(GENERATE_ROWS, got):
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        if name is not None:
            model = PeftModel.from_pretrained(model, tiny_adapters[name])
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.eval().generate(**encoded, max_new_tokens=n, do_sample=False)
        expected = tokenizer.decode(output[0][encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        assert generation.text == expected, name
    for adapter in loaded.values():
        runner.unload(adapter)


def test_rows_gathered_for_decode_steps_follow_a_slot_given_to_another_adapter(
    runner: ModelRunner, store: AdapterStore
) -> None:
    """Decode steps keep the rows' gathered LoRA weights; a slot freed and reused must never serve stale ones."""
    ids = runner.base.tokenizer("reuse the slot")["input_ids"]

    def logits(adapter: LoadedAdapter) -> torch.Tensor:
        with torch.inference_mode():
            batch_ids, mask, positions, cache = runner.start([adapter], [ids])
            with runner.lora_routing([adapter], repeated=True):
                return runner.logits(batch_ids, mask, positions, cache)

    first = runner.load(store.get("lora-gen"))
    logits(first)
    runner.unload(first)
    second = runner.load(store.get("lora-gen-mlp"))
    reused = logits(second)
    runner.lora_kernel = "peft"
    try:
        expected = logits(second)
    finally:
        runner.lora_kernel = "gathered"
        runner.unload(second)
    assert torch.allclose(reused, expected, atol=1e-5)
