import itertools

from service.model.buckets import length_buckets


def _cost(lengths: list[int], buckets: list[list[int]], forward_cost: int) -> int:
    return sum(forward_cost + len(b) * max(lengths[i] for i in b) for b in buckets)


def test_every_row_once_within_the_row_limit() -> None:
    lengths = [5, 60, 17, 33, 33, 2, 64, 16, 40, 8]
    buckets = length_buckets(lengths, max_rows=3)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert all(0 < len(b) <= 3 for b in buckets)


def test_similar_lengths_share_a_pass_and_far_ones_do_not() -> None:
    assert length_buckets([10, 10, 10, 10], max_rows=64, forward_cost=48) == [[0, 1, 2, 3]]
    short_and_long = [4] * 8 + [200] * 8
    buckets = length_buckets(short_and_long, max_rows=64, forward_cost=48)
    assert sorted(map(sorted, buckets)) == [list(range(8)), list(range(8, 16))]


def test_the_split_is_the_cheapest_one() -> None:
    lengths = [3, 9, 27, 28, 50, 51]
    for forward_cost in (0, 10, 48, 1000):
        got = _cost(lengths, length_buckets(lengths, 4, forward_cost), forward_cost)
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = min(
            _cost(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], forward_cost)
            for size in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), size)
            if all(b - a <= 4 for a, b in zip((0, *cuts), (*cuts, len(order))))
        )
        assert got == best


def test_no_rows_no_passes() -> None:
    assert length_buckets([], max_rows=8) == []
