"""Runner behaviour beyond equivalence: cancelled rows leave the batch without disturbing the others; prompts."""

from __future__ import annotations

import pytest

from service.domain import ChatMessage, GenerationParams
from service.errors import InvalidRequest
from service.model.generation import generate
from service.model.runner import GenerationJob, ModelRunner


def test_cancelled_row_leaves_and_others_are_unchanged(runner: ModelRunner) -> None:
    tokenizer = runner.base.tokenizer

    def jobs() -> list[GenerationJob]:
        return [GenerationJob(GenerationParams(prompt=p, max_new_tokens=10), tokenizer(p)["input_ids"])
                for p in ("first prompt", "second", "the third prompt here")]

    expected = generate(runner, [None] * 3, jobs())
    batch = jobs()
    batch[1].cancelled.set()
    got = generate(runner, [None] * 3, batch)
    assert got[1].finish_reason == "cancelled" and got[1].generated_tokens <= 1
    assert [got[0].text, got[2].text] == [expected[0].text, expected[2].text]


def test_a_chat_template_that_refuses_the_messages_is_a_request_error(runner: ModelRunner) -> None:
    tokenizer = runner.base.tokenizer
    original = tokenizer.chat_template
    # As many chat templates do: roles must alternate user/assistant.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}")
    try:
        messages = (ChatMessage("user", "a"), ChatMessage("user", "b"))
        with pytest.raises(InvalidRequest, match="roles must alternate") as caught:
            runner.encode_prompt(GenerationParams(prompt="", messages=messages), 64)
        assert caught.value.param == "messages"
        assert runner.encode_prompt(GenerationParams(prompt="", messages=messages[:1]), 64)
    finally:
        tokenizer.chat_template = original
