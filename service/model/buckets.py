"""Splitting a batch into forward passes of similar lengths.

A padded batch computes every row at the longest row's length; rows of 16 and 64 tokens together waste most of the
short rows' work. Each extra forward pass has a fixed cost too (reading every weight once, per-layer overhead),
so the split that costs least is found exactly, over rows sorted by length, with that fixed cost counted in tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

# What one more forward pass costs, in padded tokens of work. Measured on CPU with the default model: a pass over
# one token took 40 ms, and each token of a larger pass about 1.3 ms, so a pass is worth about 30 tokens.
FORWARD_COST_IN_TOKENS = 32


def length_buckets(
    lengths: Sequence[int], max_rows: int, forward_cost: int = FORWARD_COST_IN_TOKENS
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into passes of at most ``max_rows`` rows, minimising padded work."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    count = len(order)
    # best[end]: least cost of the first ``end`` sorted rows; start[end]: where the last pass of that split begins.
    best = [0] + [0] * count
    start = [0] * (count + 1)
    for end in range(1, count + 1):
        longest = lengths[order[end - 1]]
        best[end], start[end] = min(
            (best[begin] + forward_cost + (end - begin) * longest, begin)
            for begin in range(max(0, end - max_rows), end)
        )
    buckets: list[list[int]] = []
    end = count
    while end:
        buckets.append(order[start[end]:end])
        end = start[end]
    return buckets[::-1]
