"""The resident LoRA pool keeps, per module and slot, the rank its adapter really has: the kernel reads only
those rows of a pool padded to the largest rank, so a stale or missing rank would drop or misplace a delta."""

from __future__ import annotations

import torch

from service.model.gathered import GatheredLora


def _entry(layer: torch.nn.Linear, rank: int) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    return layer, torch.ones(rank, layer.in_features), torch.ones(layer.out_features, rank)


def test_each_slot_holds_its_adapters_rank_through_growth_and_release() -> None:
    first, second = torch.nn.Linear(8, 6), torch.nn.Linear(8, 4)
    pool = GatheredLora()
    pool.add_entries("small", [_entry(first, 2)])
    pool.add_entries("large", [_entry(first, 4), _entry(second, 3)])
    small, large = pool.slots(["small", "large"])
    stack_first, stack_second = pool.stack(first), pool.stack(second)
    assert stack_first is not None and stack_second is not None
    assert (stack_first.ranks[small], stack_first.ranks[large]) == (2, 4)
    assert (stack_second.ranks[small], stack_second.ranks[large]) == (0, 3)  # "small" does not adapt it
    assert stack_first.a.shape[1] == 4 and not stack_first.a[small, 2:].any()  # padded to the largest rank

    for index in range(20):  # past the first capacity: the stacks and their ranks grow together
        pool.add_entries(f"more-{index}", [_entry(second, 1 + index % 5)])
    assert stack_second.ranks.shape[0] == stack_second.a.shape[0] >= 22
    assert (stack_first.ranks[small], stack_first.ranks[large], stack_second.ranks[large]) == (2, 4, 3)
    assert stack_second.ranks[pool.slots(["more-7"])[0]] == 3

    pool.remove("large")
    assert stack_first.ranks[large] == 0 and stack_second.ranks[large] == 0
    pool.add_entries("reuses", [_entry(second, 5)])
    reused = pool.slots(["reuses"])[0]
    assert stack_second.ranks[reused] == 5 and stack_first.ranks[reused] == 0
