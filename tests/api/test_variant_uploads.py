"""LoRA variants uploaded over HTTP: served like plain PEFT in concurrent mixed batches, or refused at upload with
the feature named and nothing published."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.store.archive import make_zip
from tests.api.conftest import ADMIN
from tests.variants import REFUSED, make_variant

UPLOADED = {
    "save-lm-head": {"modules_to_save": ["lm_head"]},
    "token-indices": {"trainable_token_indices": [5, 17, 100, 1000]},
    "lora-embed": {"target_modules": ["embed_tokens", "q_proj"]},
    "rslora-all-linear": {"use_rslora": True, "target_modules": "all-linear"},
}
PROMPT = "tell me something"


def _zip(folder: Path) -> bytes:
    return make_zip({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def _upload(client: TestClient, name: str, folder: Path):
    return client.post("/v1/adapters", data={"name": name}, files={"archive": ("a.zip", _zip(folder))}, headers=ADMIN)


def _peft_greedy(tiny_base: Path, adapter: Path | None) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    encoded = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.eval().generate(**encoded, max_new_tokens=8, do_sample=False)
    return tokenizer.decode(output[0][encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def test_uploaded_variants_answer_like_peft_in_mixed_batches(client: TestClient, tiny_base: Path,
                                                             tmp_path: Path) -> None:
    for name, options in UPLOADED.items():
        response = _upload(client, name, make_variant(tiny_base, tmp_path / name, options))
        assert response.status_code == 201, response.text
    names = [*UPLOADED, None, "lora-gen", "prefix-gen"] * 2

    def ask(name: str | None) -> dict:
        response = client.post("/v1/generate", json={"adapter": name, "prompt": PROMPT, "max_new_tokens": 8})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(ask, names))
    base = _peft_greedy(tiny_base, None)
    for name, answer in zip(names, answers):
        if name in UPLOADED:
            expected = _peft_greedy(tiny_base, tmp_path / name)
            assert answer["text"] == expected != base, name
        elif name is None:
            assert answer["text"] == base
    entry = client.get("/v1/adapters/save-lm-head").json()
    assert entry["state"] == "ready"


@pytest.mark.parametrize("name", sorted(REFUSED) + ["resized-vocab"])
def test_unservable_variants_are_refused_at_upload(name: str, client: TestClient, tiny_base: Path,
                                                   store_copy: Path, tmp_path: Path) -> None:
    if name == "resized-vocab":
        folder = make_variant(tiny_base, tmp_path / name, {"modules_to_save": ["embed_tokens"]}, resize_to=49160)
        words = "resized vocabulary"
    else:
        folder = make_variant(tiny_base, tmp_path / name, REFUSED[name][0])
        words = REFUSED[name][1]
    response = _upload(client, name, folder)
    assert response.status_code == 422 and words in response.json()["message"], response.text
    assert not (store_copy / name).exists()
    ok = client.post("/v1/generate", json={"adapter": "lora-gen", "prompt": "x", "max_new_tokens": 2})
    assert ok.status_code == 200


def test_an_adapter_saved_with_its_tokenizer_is_accepted_when_the_vocabulary_is_the_base_s(
    client: TestClient, tiny_base: Path, store_copy: Path, tmp_path: Path
) -> None:
    """Trainers save the tokenizer next to the adapter; the base's own tokenizer is fine, added tokens are not."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    same = make_variant(tiny_base, tmp_path / "with-tokenizer", {})
    tokenizer.save_pretrained(same)
    response = _upload(client, "with-tokenizer", same)
    assert response.status_code == 201, response.text
    assert (store_copy / "with-tokenizer" / "tokenizer_config.json").is_file()
    assert client.post("/v1/generate", json={"adapter": "with-tokenizer", "prompt": "x",
                                              "max_new_tokens": 2}).status_code == 200

    added = make_variant(tiny_base, tmp_path / "added-tokens", {})
    tokenizer.add_tokens(["<|tool_call|>"])
    tokenizer.save_pretrained(added)
    response = _upload(client, "added-tokens", added)
    assert response.status_code == 422 and "<|tool_call|>" in response.json()["message"], response.text
    assert not (store_copy / "added-tokens").exists()
