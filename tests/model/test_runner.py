"""Runner behaviour beyond equivalence: cancelled rows leave the batch without disturbing the others."""

from __future__ import annotations

from service.domain import GenerationParams
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
