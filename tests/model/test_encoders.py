"""BERT and RoBERTa bases: every adapter kind the service serves on encoders, for sequence and token
classification, equal to plain PEFT in one padded mixed batch, and changing the base's answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from service.model.adapters import LoadedAdapter
from service.model.loading import load_base_model
from service.model.runner import ModelRunner
from service.model.validation import BaseShapes, check_adapter
from service.settings import Settings
from service.store.store import AdapterStore
from tests.encoders import ENCODER_IDS, NER_LABELS, make_encoder_adapter, make_encoder_base

TEXTS = ["John lives in Paris", "a longer sentence about nothing in particular, with commas", "x"]
KINDS = ["lora", "prompt", "ptuning", "ia3", "adalora"]
FAMILIES = ["bert", "roberta"]


@pytest.fixture(scope="module", params=FAMILIES)
def encoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            embedded_folder: Path) -> tuple[str, Path, Path]:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = make_encoder_base(family, root / "base", embedded_folder)
    store = root / "store"
    for index, kind in enumerate(KINDS):
        for task in ("cls", "tok"):
            make_encoder_adapter(base, family, store / f"{kind}-{task}", kind, task, seed=index)
    return family, base, store


@pytest.fixture(scope="module")
def encoder_runner(encoder: tuple[str, Path, Path]) -> tuple[ModelRunner, AdapterStore]:
    family, base, store = encoder
    loaded = load_base_model(Settings(base_model=str(base), base_model_aliases=[ENCODER_IDS[family]]))
    assert loaded.family.name == family
    return ModelRunner(loaded), AdapterStore(store, loaded.names_base)


def _reference(base: Path, adapter: Path, task: str, text: str, tokenizer, virtual: int) -> torch.Tensor:
    auto = AutoModelForSequenceClassification if task == "cls" else AutoModelForTokenClassification
    labels = 3 if task == "cls" else len(NER_LABELS)
    model = PeftModel.from_pretrained(auto.from_pretrained(base, num_labels=labels), adapter).eval()
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
    probabilities = torch.softmax(logits, -1)
    return probabilities if task == "cls" else probabilities[virtual:]  # PEFT scores the virtual tokens too


@pytest.mark.parametrize("task", ["cls", "tok"])
def test_every_kind_matches_peft_in_one_mixed_batch(task: str, encoder: tuple[str, Path, Path],
                                                    encoder_runner: tuple[ModelRunner, AdapterStore]) -> None:
    family, base, store_path = encoder
    runner, store = encoder_runner
    tokenizer = runner.base.tokenizer
    adapters = {}
    for kind in KINDS:
        info = store.get(f"{kind}-{task}")
        check_adapter(info, BaseShapes(runner.base), 64, 64)
        adapters[kind] = runner.load(info)
    rows = [(kind, text) for kind in KINDS for text in TEXTS]
    run = runner.classify if task == "cls" else runner.classify_tokens
    got = run([adapters[k] for k, _ in rows], [tokenizer(t)["input_ids"] for _, t in rows])
    heads_only = [LoadedAdapter(info=adapters[k].info, head=adapters[k].head) for k, _ in rows]
    bare = run(heads_only, [tokenizer(t)["input_ids"] for _, t in rows])
    for (kind, text), ours, on_base in zip(rows, got, bare):
        expected = _reference(base, store_path / f"{kind}-{task}", task, text, tokenizer,
                              adapters[kind].prompt_length)
        assert torch.allclose(torch.tensor(ours), expected, atol=1e-4), (family, kind, task, text)
        assert (torch.tensor(ours) - torch.tensor(on_base)).abs().max() > 1e-3, (family, kind, task, "acts")
    for adapter in adapters.values():
        runner.unload(adapter)
