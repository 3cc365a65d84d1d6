"""The real thing: the embedded default model behind a real HTTP server on loopback, with the demo adapters and
an adapter made with plain PEFT and uploaded through the admin API; answers equal plain PEFT's and differ from the
base's (the same head on the bare base, for classifiers)."""

from __future__ import annotations

import io
import shutil
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from service.api.app import create_app
from service.settings import EMBEDDED_MODEL_ID, Settings
from tests.servers import serve

pytestmark = pytest.mark.slow
REPO_STORE = Path(__file__).resolve().parent.parent / "adapters_store"
TOKEN = "e2e-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_folder: Path) -> Iterator[str]:
    store = tmp_path_factory.mktemp("e2e") / "store"
    shutil.copytree(REPO_STORE, store)
    settings = Settings(adapters_dir=store, admin_token=TOKEN, max_wait_ms=20)
    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer(embedded_folder: Path):
    return AutoTokenizer.from_pretrained(embedded_folder)


def _chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def _peft_greedy(model, tokenizer, text: str, max_new_tokens: int) -> str:
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0][encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def _head_on_bare_base(embedded_folder: Path, adapter: Path, num_labels: int, tokenizer, text: str) -> torch.Tensor:
    """Probabilities of the adapter's saved head on the base without its LoRA or prefix."""
    model = AutoModelForSequenceClassification.from_pretrained(embedded_folder, num_labels=num_labels).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    head = {k.rsplit(".", 1)[-1]: v for k, v in load_file(adapter / "adapter_model.safetensors").items()
            if ".score." in k}
    with torch.no_grad():
        model.score.weight.copy_(head["weight"])
        return torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits, -1)[0]


def _base_answer(server: str, prompt: str, max_new_tokens: int, chat: bool = True) -> str:
    body = {"adapter": None, "prompt": prompt, "chat": chat, "max_new_tokens": max_new_tokens}
    return httpx.post(f"{server}/v1/generate", json=body, timeout=120).json()["text"]


def test_base_model_answers_through_chat_template(server: str) -> None:
    body = {"prompt": "What is the capital of France?", "chat": True, "max_new_tokens": 20}
    answer = httpx.post(f"{server}/v1/generate", json=body, timeout=60).json()
    assert answer["text"] == "The capital of France is Paris." and answer["finish_reason"] == "eos"


def test_demo_adapters_are_listed(server: str) -> None:
    entries = {e["name"]: e for e in httpx.get(f"{server}/v1/adapters").json()["adapters"]}
    kinds = {(e["type"], e["task"]) for e in entries.values()}
    assert {("lora", "classification"), ("lora", "generation"), ("prefix_tuning", "generation")} <= kinds
    sentiment = next(e for e in entries.values() if e["task"] == "classification")
    assert sentiment["labels"] == ["negative", "positive"]


def test_demo_adapters_match_plain_peft(server: str, embedded_folder: Path, tokenizer) -> None:
    entries = httpx.get(f"{server}/v1/adapters").json()["adapters"]
    texts = ["I loved this movie, it was wonderful.", "Terrible service, I want my money back."]
    prompt = "What do you like to eat?"
    for entry in entries:
        path = REPO_STORE / entry["name"]
        if entry["task"] == "classification":
            got = httpx.post(f"{server}/v1/classify", json={"adapter": entry["name"], "inputs": texts}, timeout=60)
            model = AutoModelForSequenceClassification.from_pretrained(embedded_folder, num_labels=2)
            model.config.pad_token_id = tokenizer.pad_token_id
            model = PeftModel.from_pretrained(model, path).eval()
            for text, result in zip(texts, got.json()["results"]):
                with torch.no_grad():
                    expected = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits, -1)[0]
                ours = torch.tensor([result["scores"][label] for label in entry["labels"]])
                assert torch.allclose(ours, expected, atol=1e-4)
                bare = _head_on_bare_base(embedded_folder, path, 2, tokenizer, text)
                assert (ours - bare).abs().max() > 1e-2, (entry["name"], text)
            labels = [r["label"] for r in got.json()["results"]]
            assert labels == ["positive", "negative"]
        else:
            body = {"adapter": entry["name"], "prompt": prompt, "chat": True, "max_new_tokens": 24}
            got = httpx.post(f"{server}/v1/generate", json=body, timeout=120).json()
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_folder), path).eval()
            assert got["text"] == _peft_greedy(model, tokenizer, _chat(tokenizer, prompt), 24), entry["name"]
            assert got["text"] != _base_answer(server, prompt, 24), entry["name"]


def _zip_adapter(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for path in folder.iterdir():
            bundle.write(path, f"checkpoint/{path.name}")
    return buffer.getvalue()


def test_user_adapters_uploaded_and_served_like_peft(server: str, embedded_folder: Path, tokenizer,
                                                     tmp_path: Path) -> None:
    """Adapters a user made with plain PEFT on the hub id, uploaded as archives, answer as PEFT does."""
    torch.manual_seed(11)
    classifier = AutoModelForSequenceClassification.from_pretrained(embedded_folder, num_labels=3)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    classifier = get_peft_model(classifier, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, init_lora_weights=False,
                                                       target_modules=["q_proj", "v_proj"]))
    classifier.peft_config["default"].base_model_name_or_path = EMBEDDED_MODEL_ID
    classifier.save_pretrained(tmp_path / "cls")
    generator = get_peft_model(AutoModelForCausalLM.from_pretrained(embedded_folder),
                               PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8))
    generator.peft_config["default"].base_model_name_or_path = EMBEDDED_MODEL_ID
    generator.save_pretrained(tmp_path / "gen")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for name in ("cls", "gen"):
        response = httpx.post(f"{server}/v1/adapters", data={"name": f"user-{name}"}, headers=headers, timeout=60,
                              files={"archive": ("a.zip", _zip_adapter(tmp_path / name), "application/zip")})
        assert response.status_code == 201, response.text

    text = "The package arrived on time."
    got = httpx.post(f"{server}/v1/classify", json={"adapter": "user-cls", "inputs": text}, timeout=60).json()
    reference = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(embedded_folder, num_labels=3), tmp_path / "cls"
    ).eval()
    reference.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        expected = torch.softmax(reference(**tokenizer(text, return_tensors="pt")).logits, -1)[0]
    scores = got["results"][0]["scores"]
    ours = torch.tensor([scores[f"LABEL_{i}"] for i in range(3)])
    assert torch.allclose(ours, expected, atol=1e-4)
    assert (ours - _head_on_bare_base(embedded_folder, tmp_path / "cls", 3, tokenizer, text)).abs().max() > 1e-3

    prompts = ["Tell me a story", "List three colors:", "2 + 2 ="]
    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: they share a batch
        answers = list(pool.map(lambda p: httpx.post(
            f"{server}/v1/generate", json={"adapter": "user-gen", "prompt": p, "max_new_tokens": 12},
            timeout=120).json(), prompts))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_folder), tmp_path / "gen")
    for prompt, answer in zip(prompts, answers):
        assert answer["text"] == _peft_greedy(reference.eval(), tokenizer, prompt, 12), prompt
    changed = [p for p, a in zip(prompts, answers) if a["text"] != _base_answer(server, p, 12, chat=False)]
    assert len(changed) >= 2, answers
    assert httpx.delete(f"{server}/v1/adapters/user-gen", headers=headers).status_code == 204
    gone = httpx.post(f"{server}/v1/generate", json={"adapter": "user-gen", "prompt": "x"}, timeout=30)
    assert gone.status_code == 404


def test_metrics_show_the_traffic(server: str) -> None:
    httpx.post(f"{server}/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}, timeout=60)
    text = httpx.get(f"{server}/metrics").text
    for name in ("service_requests_total", "service_batch_size_bucket", "service_queue_wait_seconds_bucket",
                 "service_inference_seconds_bucket", "service_adapter_load_seconds_bucket",
                 "service_generated_tokens_total", "service_adapters_loaded"):
        assert name in text, name
    assert 'route="/v1/generate"' in text and 'adapter="__base__"' in text
