"""An encoder base behind the real app: /v1/classify and /v1/classify_tokens as the transformers pipelines answer,
and the routes that an encoder cannot serve refused with the reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer, pipeline

from service.api.app import create_app
from service.store.archive import make_zip
from tests.api.conftest import ADMIN, tiny_settings, wait_ready
from tests.encoders import ENCODER_IDS, NER_LABELS, make_encoder_adapter, make_encoder_base

TEXTS = ["John Smith lives in New York", "nothing here", "Paris and Berlin"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory, embedded_folder: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bert-http")
    base = make_encoder_base("bert", root / "base", embedded_folder)
    store = root / "store"
    make_encoder_adapter(base, "bert", store / "ner", "lora", "tok", seed=3)
    make_encoder_adapter(base, "bert", store / "sentiment", "prompt", "cls", seed=4)
    return base, store


@pytest.fixture
def client(bert: tuple[Path, Path], tmp_path: Path) -> Iterator[TestClient]:
    base, store = bert
    settings = tiny_settings(store, base_model=str(base), base_model_aliases=[ENCODER_IDS["bert"]])
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.mark.parametrize("aggregation", ["none", "simple"])
def test_token_classification_answers_as_the_pipeline(aggregation: str, client: TestClient,
                                                      bert: tuple[Path, Path]) -> None:
    base, store = bert
    response = client.post("/v1/classify_tokens", json={"adapter": "ner", "inputs": TEXTS,
                                                         "aggregation": aggregation})
    assert response.status_code == 200, response.text
    model = AutoModelForTokenClassification.from_pretrained(base, num_labels=len(NER_LABELS))
    model = PeftModel.from_pretrained(model, store / "ner").merge_and_unload().eval()
    model.config.id2label = dict(enumerate(NER_LABELS))
    reference = pipeline("token-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(base),
                         aggregation_strategy=aggregation, device="cpu")
    found = 0
    for text, ours in zip(TEXTS, response.json()["results"]):
        expected = reference(text)
        key = "entity_group" if aggregation == "simple" else "entity"
        assert [(e["label"], e["start"], e["end"]) for e in ours] == [(e[key], e["start"], e["end"]) for e in expected]
        for entity, reference_entity in zip(ours, expected):
            assert entity["text"] == text[entity["start"]:entity["end"]]
            assert abs(entity["score"] - float(reference_entity["score"])) < 1e-4
        found += len(ours)
    assert found, "the random NER adapter labelled nothing: the comparison would be empty"
    assert client.get("/v1/adapters/ner").json()["task"] == "token_classification"


def test_routes_an_encoder_cannot_serve_say_why(client: TestClient, bert: tuple[Path, Path], tmp_path: Path) -> None:
    wrong = client.post("/v1/classify", json={"adapter": "ner", "inputs": "x"})
    assert wrong.status_code == 422 and "/v1/classify_tokens" in wrong.json()["message"]
    wrong = client.post("/v1/classify_tokens", json={"adapter": "sentiment", "inputs": "x"})
    assert wrong.status_code == 422 and "/v1/classify" in wrong.json()["message"]
    generate = client.post("/v1/generate", json={"prompt": "hi"})
    assert generate.status_code == 422 and "cannot generate" in generate.json()["message"]
    ok = client.post("/v1/classify", json={"adapter": "sentiment", "inputs": ["good", "bad"]})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2
    base, _ = bert
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    prefix = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4))
    prefix.peft_config["default"].base_model_name_or_path = ENCODER_IDS["bert"]
    prefix.save_pretrained(tmp_path / "prefix")
    archive = make_zip({p.name: p.read_bytes() for p in (tmp_path / "prefix").iterdir() if p.is_file()})
    refused = client.post("/v1/adapters", data={"name": "prefix"}, files={"archive": ("a.zip", archive)},
                          headers=ADMIN)
    assert refused.status_code == 422 and "prefix tuning on a bert base" in refused.json()["message"], refused.text


def test_virtual_tokens_count_against_the_positions_and_a_long_input_never_quarantines(
    client: TestClient, bert: tuple[Path, Path]
) -> None:
    """128 positions, 4 virtual tokens: an input of 126 tokens fits the base alone but not with the prompt."""
    base, _ = bert
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = " ".join(["word"] * 200)
    ids = tokenizer(text)["input_ids"]
    text = tokenizer.decode(ids[:126])
    assert len(tokenizer(text)["input_ids"]) == 126
    refused = client.post("/v1/classify", json={"adapter": "sentiment", "inputs": text})
    assert refused.status_code == 422 and refused.json()["error"] == "InvalidRequest", refused.text
    assert "4 virtual tokens" in refused.json()["message"]
    assert client.get("/v1/adapters/sentiment").json()["state"] == "ready"
    assert client.post("/v1/classify", json={"adapter": "sentiment", "inputs": "fine"}).status_code == 200
