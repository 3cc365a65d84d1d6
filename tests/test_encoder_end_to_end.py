"""The real embedded encoder (all-MiniLM-L6-v2, a BERT from PyPI) behind a real HTTP server on loopback, with the
demo adapters trained by scripts/train_encoder_demo_adapters.py: answers equal plain PEFT's and the pipeline's."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer, pipeline

from service.api.app import create_app
from service.model.loading import ENCODER_NAME, embedded_encoder_folder
from service.settings import Settings
from tests.servers import serve

pytestmark = pytest.mark.slow
STORE = Path(__file__).resolve().parent.parent / "adapters_store_minilm"
REVIEWS = ["I loved this movie, it was wonderful.", "Terrible service, I want my money back."]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("minilm") / "store"
    shutil.copytree(STORE, store)
    with serve(create_app(Settings(base_model=ENCODER_NAME, adapters_dir=store, max_wait_ms=20))) as url:
        yield url


def test_demo_sentiment_adapters_match_peft(server: str) -> None:
    folder = embedded_encoder_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for name in ("sentiment-lora", "sentiment-prompt"):
        got = httpx.post(f"{server}/v1/classify", json={"adapter": name, "inputs": REVIEWS}, timeout=60).json()
        assert [r["label"] for r in got["results"]] == ["positive", "negative"], name
        model = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2), STORE / name).eval()
        for text, result in zip(REVIEWS, got["results"]):
            with torch.no_grad():
                expected = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits, -1)[0]
            ours = torch.tensor([result["scores"]["negative"], result["scores"]["positive"]])
            assert torch.allclose(ours, expected, atol=1e-4), (name, text)


def test_demo_ner_adapter_finds_people_and_places_as_the_pipeline_does(server: str) -> None:
    text = "John Smith flew to New York"
    got = httpx.post(f"{server}/v1/classify_tokens", json={"adapter": "ner-lora", "inputs": text}, timeout=60).json()
    entities = [(e["label"], e["text"]) for e in got["results"][0]]
    assert entities == [("PER", "John Smith"), ("LOC", "New York")]
    folder = embedded_encoder_folder()
    model = AutoModelForTokenClassification.from_pretrained(folder, num_labels=5)
    model = PeftModel.from_pretrained(model, STORE / "ner-lora").merge_and_unload().eval()
    model.config.id2label = dict(enumerate(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]))
    reference = pipeline("token-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(folder),
                         aggregation_strategy="simple", device="cpu")(text)
    assert [(e["label"], e["start"], e["end"]) for e in got["results"][0]] == [
        (e["entity_group"], e["start"], e["end"]) for e in reference]
    for ours, theirs in zip(got["results"][0], reference):
        assert abs(ours["score"] - float(theirs["score"])) < 1e-3
    assert httpx.post(f"{server}/v1/generate", json={"prompt": "hi"}, timeout=30).status_code == 422
