"""The OpenAI-compatible routes, driven by the official ``openai`` package against the real server on loopback."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from transformers import AutoTokenizer

from service.api.app import create_app
from service.store.archive import make_zip
from tests.api.conftest import tiny_settings
from tests.servers import serve

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def served(
    tiny_base: Path, tiny_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, FastAPI]]:
    store = tmp_path_factory.mktemp("openai") / "store"
    shutil.copytree(tiny_store, store)
    app = create_app(tiny_settings(store, base_model=str(tiny_base), api_keys=["user-key"], max_queue_size=6))
    with serve(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def server(served: tuple[str, FastAPI]) -> str:
    return served[0]


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="user-key", max_retries=0, timeout=60)


def generate(server: str, adapter: str | None, prompt: str, **options) -> dict:
    body = {"adapter": adapter, "prompt": prompt, "max_new_tokens": 12, "temperature": 0.0, **options}
    response = httpx.post(f"{server}/v1/generate", json=body, headers={"Authorization": "Bearer user-key"},
                          timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_lists_the_base_and_every_generation_adapter(client: openai.OpenAI, tiny_base: Path) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids[:2] == ["base", str(tiny_base)]
    assert {"lora-gen", "prefix-gen", "prompt-gen", "ia3-gen"} <= set(ids)
    assert "lora-cls" not in ids  # a classifier cannot generate
    card = client.models.retrieve("lora-gen")
    assert card.id == "lora-gen" and card.object == "model"


@pytest.mark.parametrize("model", ["base", "lora-gen", "prefix-gen", "prompt-gen"])
def test_completion_equals_generate(client: openai.OpenAI, server: str, model: str) -> None:
    adapter = None if model == "base" else model
    expected = generate(server, adapter, "Once upon a time")
    completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert completion.object == "text_completion" and completion.model == model
    (choice,) = completion.choices
    assert choice.text == expected["text"]
    assert choice.finish_reason == ("length" if expected["finish_reason"] == "length" else "stop")
    assert completion.usage.prompt_tokens == expected["prompt_tokens"]
    assert completion.usage.completion_tokens == expected["generated_tokens"]
    assert completion.usage.total_tokens == expected["prompt_tokens"] + expected["generated_tokens"]


def test_adapters_act_through_the_openai_routes(client: openai.OpenAI) -> None:
    texts = {model: client.completions.create(model=model, prompt="Once upon a time", max_tokens=12,
                                              temperature=0).choices[0].text
             for model in ("base", "lora-gen", "prefix-gen")}
    assert len(set(texts.values())) == 3, texts


def test_several_adapters_at_once(client: openai.OpenAI, server: str) -> None:
    models = ["base", "lora-gen", "prefix-gen", "ia3-gen", "prompt-gen", "lora-gen-mlp"]
    expected = {m: generate(server, None if m == "base" else m, QUESTION, chat=True)["text"] for m in models}

    def chat(model: str) -> str:
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0)
        return answer.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        answers = dict(zip(models, pool.map(chat, models)))
    assert answers == expected


def test_chat_equals_generate_with_chat(client: openai.OpenAI, server: str) -> None:
    expected = generate(server, "lora-gen", QUESTION, chat=True)
    answer = client.chat.completions.create(
        model="lora-gen", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected["text"]
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]


def test_chat_renders_the_whole_conversation_with_the_template(client: openai.OpenAI, tiny_base: Path) -> None:
    messages = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": QUESTION},
    ]
    as_parts = [*messages[:3], {"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    answer = client.chat.completions.create(model="base", max_tokens=8, temperature=0, messages=as_parts)
    rendered = AutoTokenizer.from_pretrained(tiny_base).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    assert answer.usage.prompt_tokens == len(AutoTokenizer.from_pretrained(tiny_base)(rendered)["input_ids"])


def test_streamed_completion_joins_to_the_same_text(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="prefix-gen", prompt="Once upon a time", max_tokens=12, temperature=0)
    pieces, finish, usage = [], None, None
    for chunk in client.completions.create(model="prefix-gen", prompt="Once upon a time", max_tokens=12,
                                           temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # streamed, not sent at once
    assert "".join(pieces) == whole.choices[0].text
    assert finish == whole.choices[0].finish_reason
    assert usage == whole.usage


def test_streamed_chat_joins_to_the_same_text(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="lora-gen", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="lora-gen", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" and chunk.usage is None for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stream_ends_with_done(server: str) -> None:
    body = {"model": "base", "prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": "Bearer user-key"},
                      timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_n_choices_for_several_prompts(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="lora-gen", prompt=["Once upon a time", "The weather"], n=2,
                                           max_tokens=6, temperature=0)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    texts = [c.text for c in completion.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]  # greedy: choices agree


def test_seeded_sampling_repeats_and_choices_differ(client: openai.OpenAI) -> None:
    def sample() -> list[str]:
        completion = client.completions.create(model="lora-gen", prompt="Once upon a time", n=3, max_tokens=10,
                                               temperature=1.5, seed=42)
        return [c.text for c in completion.choices]

    first = sample()
    assert sample() == first
    assert len(set(first)) > 1


def test_streamed_n_choices_arrive_by_index(client: openai.OpenAI) -> None:
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(model="ia3-gen", messages=[{"role": "user", "content": QUESTION}],
                                                n=2, max_tokens=6, temperature=0, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert set(texts) == {0, 1} and texts[0] == texts[1] != ""


def test_stop_strings(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="base", prompt="Once upon a time", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    stop = text[len(text) // 2:][:3]
    assert stop.strip()
    cut = client.completions.create(model="base", prompt="Once upon a time", max_tokens=12, temperature=0, stop=stop)
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("options, param", [
    ({"logprobs": 2}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
])
def test_unsupported_completion_parameters_are_refused_by_name(client: openai.OpenAI, options: dict,
                                                               param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="hi", max_tokens=2, **options)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
    assert param in caught.value.body["message"]


@pytest.mark.parametrize("options, param", [
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_unsupported_chat_parameters_are_refused_by_name(client: openai.OpenAI, options: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       **options)
    assert caught.value.body["param"] == param


def test_neutral_values_of_unsupported_parameters_are_accepted(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="base", prompt="hi", max_tokens=2, echo=False, best_of=1,
                                           presence_penalty=0, frequency_penalty=0, user="someone")
    assert completion.choices[0].text is not None


def test_unknown_model_is_404_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
    assert "no-such-adapter" in caught.value.body["message"]


def test_a_classifier_named_as_model_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="lora-cls", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "/v1/classify" in caught.value.body["message"]


def test_image_parts_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert "image_url" in caught.value.body["message"]


def test_limits_apply(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="hi", max_tokens=100_000)
    assert "limit" in caught.value.body["message"] and caught.value.body["param"] == "max_tokens"


def test_api_keys_are_bearer_tokens(server: str) -> None:
    stranger = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.models.list()
    assert caught.value.body["code"] == "invalid_api_key"


def test_openai_routes_are_counted_in_the_metrics(client: openai.OpenAI, server: str) -> None:
    client.chat.completions.create(model="lora-gen", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    metrics = httpx.get(f"{server}/metrics").text
    assert 'service_requests_total{adapter="lora-gen",route="/v1/chat/completions",status="200"}' in metrics


def test_unknown_model_names_take_no_metric_label(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="junk-name-1234", prompt="hi", max_tokens=2)
    metrics = httpx.get(f"{server}/metrics").text
    assert "junk-name-1234" not in metrics
    assert 'adapter="__other__",route="/v1/completions",status="404"' in metrics


def test_base_is_a_reserved_adapter_name(server: str, tiny_store: Path) -> None:
    files = {path.name: path.read_bytes() for path in (tiny_store / "lora-gen").iterdir()}
    response = httpx.post(f"{server}/v1/adapters", headers={"Authorization": "Bearer test-admin-token"},
                          data={"name": "base"}, files={"archive": ("a.zip", make_zip(files))}, timeout=60)
    assert response.status_code == 422 and "reserved" in response.json()["message"]


def post(server: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{route}", json=body, headers={"Authorization": "Bearer user-key"}, timeout=60)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_out_of_range_is_refused_and_harms_no_neighbour(server: str, seed: int) -> None:
    neighbour: dict = {}

    def run_neighbour() -> None:
        neighbour["response"] = post(server, "/v1/completions",
                                     {"model": "lora-gen", "prompt": "Once upon a time", "max_tokens": 40})

    thread = threading.Thread(target=run_neighbour)
    thread.start()
    response = post(server, "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 3, "seed": seed})
    thread.join()
    assert response.status_code == 400 and response.json()["error"]["param"] == "seed"
    assert neighbour["response"].status_code == 200
    assert post(server, "/v1/generate", {"prompt": "Hi", "seed": seed}).status_code == 422


def test_the_largest_seed_with_several_choices_wraps(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="base", prompt="Hi", max_tokens=3, n=2, seed=2**64 - 1,
                                           temperature=1.0)
    assert len(completion.choices) == 2


def test_a_previous_answer_sent_back_as_the_client_dumped_it(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    first = client.chat.completions.create(model="base", messages=messages, max_tokens=4, temperature=0)
    messages.append(first.choices[0].message.model_dump())
    messages.append({"role": "user", "content": QUESTION})
    second = client.chat.completions.create(model="base", messages=messages, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", max_tokens=4, messages=[
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                   "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "user", "content": "hi"}])
    assert caught.value.body["param"] == "messages.0.tool_calls"


def test_refused_requests_with_made_up_models_take_no_metric_label(server: str) -> None:
    assert post(server, "/v1/completions", {"model": "made-up-1", "prompt": "Hi", "logprobs": 1}).status_code == 400
    assert post(server, "/v1/generate", {"adapter": "made-up-2", "prompt": "Hi",
                                         "max_new_tokens": 99999}).status_code == 422
    metrics = httpx.get(f"{server}/metrics").text
    assert "made-up-1" not in metrics and "made-up-2" not in metrics


def test_one_request_with_several_rows_counts_once(client: openai.OpenAI, server: str) -> None:
    def served() -> int:
        response = httpx.get(f"{server}/v1/adapters/prompt-gen", headers={"Authorization": "Bearer user-key"})
        return response.json()["requests"]

    before = served()
    client.completions.create(model="prompt-gen", prompt=["a", "b"], n=2, max_tokens=2)
    for _ in client.completions.create(model="prompt-gen", prompt=["a", "b"], n=2, max_tokens=2, stream=True):
        pass
    assert served() == before + 2


def test_a_client_that_leaves_a_long_completion_frees_its_rows(served: tuple[str, FastAPI]) -> None:
    url, app = served
    # The client leaves well before the rows could finish (the tiny base runs 200 tokens in well under a second
    # on a fast machine, so leaving after a second raced them).
    body = {"model": "lora-gen", "prompt": "Once upon a time", "n": 3, "max_tokens": 240}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer user-key"}, timeout=0.1)
    batcher = app.state.service.inference.batcher
    deadline = time.monotonic() + 10
    while batcher.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not batcher.busy
    assert 'route="/v1/completions",status="499"' in httpx.get(f"{url}/metrics").text


def test_a_stream_the_queue_cannot_hold_is_429_before_it_starts(server: str) -> None:
    response = post(server, "/v1/completions", {"model": "base", "prompt": "Hi", "n": 7, "stream": True})
    assert response.status_code == 429 and response.headers["retry-after"]
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_nulls_where_openai_takes_them(server: str) -> None:
    response = post(server, "/v1/chat/completions", {
        "model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi",
                                                                    "cache_control": {"type": "ephemeral"}}]}],
        "n": None, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": None}})
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")


def test_vllm_extras_at_their_do_nothing_values(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="base", prompt="Hi", max_tokens=2, extra_body={
        "top_k": -1, "repetition_penalty": 1.0, "min_p": 0.0, "ignore_eos": False, "skip_special_tokens": True})
    assert len(completion.choices) == 1
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="Hi", max_tokens=2, extra_body={"repetition_penalty": 1.2})
    assert caught.value.body["param"] == "repetition_penalty"


def test_error_shapes(server: str) -> None:
    malformed = httpx.post(f"{server}/v1/completions", content=b'{"model": ', timeout=10,
                           headers={"Authorization": "Bearer user-key", "content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] is None
    wrong_method = httpx.put(f"{server}/v1/completions", headers={"Authorization": "Bearer user-key"})
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"
    wrong_task = post(server, "/v1/completions", {"model": "lora-cls", "prompt": "Hi"})
    assert wrong_task.json()["error"]["code"] == "wrong_task"
    alone = post(server, "/v1/completions",
                 {"model": "base", "prompt": "Hi", "stream_options": {"include_usage": True}})
    assert alone.status_code == 400 and alone.json()["error"]["param"] == "stream_options"
    too_many = post(server, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}],
                                                     "max_completion_tokens": 10**6})
    assert too_many.json()["error"]["param"] == "max_completion_tokens"
