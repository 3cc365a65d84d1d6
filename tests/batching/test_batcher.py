"""The batcher on its own: grouping, batch limits, failure isolation, a full queue."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batching.batcher import Batcher, BatchStats, GroupRunner, PartialReport
from service.errors import QueueFull


def _run(coroutine):
    return asyncio.run(coroutine)


def _held_until(release: threading.Event) -> GroupRunner:
    """A group runner that echoes its payloads once ``release`` is set, holding the worker until then."""
    def run_group(key: Hashable, payloads: Sequence[int], report: PartialReport) -> list[int]:
        release.wait(5)
        return list(payloads)

    return run_group


def test_groups_by_key_and_keeps_order() -> None:
    calls: list[tuple[Hashable, list[int]]] = []

    def run_group(key: Hashable, payloads: Sequence[int], report: PartialReport) -> list[str]:
        assert threading.current_thread().name.startswith("model")  # off the event loop
        calls.append((key, list(payloads)))
        return [f"{key}:{p}" for p in payloads]

    async def main() -> list[str]:
        batcher = Batcher(run_group, ThreadPoolExecutor(1, thread_name_prefix="model"), max_batch_size=8,
                          max_wait_ms=50, max_queue_size=100)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit("ab"[i % 2], i) for i in range(6)))
        await batcher.stop()
        return results

    assert _run(main()) == [f"{'ab'[i % 2]}:{i}" for i in range(6)]
    assert sorted(calls) == [("a", [0, 2, 4]), ("b", [1, 3, 5])]


def test_a_group_reports_partial_results_to_each_request_before_its_result() -> None:
    def run_group(key: Hashable, payloads: Sequence[int], report: PartialReport) -> list[str]:
        for step in range(3):
            for index, payload in enumerate(payloads):
                report(index, f"{payload}.{step}")
        return [f"done {p}" for p in payloads]

    async def main() -> dict[int, list[str]]:
        seen: dict[int, list[str]] = {0: [], 1: []}
        batcher = Batcher(run_group, ThreadPoolExecutor(1), max_batch_size=8, max_wait_ms=20, max_queue_size=10)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit("k", i, seen[i].append) for i in (0, 1)))
        await batcher.stop()
        for i, result in enumerate(results):
            seen[i].append(result)
        return seen

    assert _run(main()) == {i: [f"{i}.0", f"{i}.1", f"{i}.2", f"done {i}"] for i in (0, 1)}

def test_respects_max_batch_size() -> None:
    sizes: list[int] = []

    async def main() -> None:
        batcher = Batcher(lambda key, payloads, report: list(payloads), ThreadPoolExecutor(1), max_batch_size=3,
                          max_wait_ms=20, max_queue_size=100, on_batch=lambda s: sizes.append(s.size))
        batcher.start()
        await asyncio.gather(*(batcher.submit("k", i) for i in range(7)))
        await batcher.stop()

    _run(main())
    assert max(sizes) <= 3 and sum(sizes) == 7


def test_a_failing_group_fails_only_its_requests_and_the_worker_survives() -> None:
    def run_group(key: Hashable, payloads: Sequence[int], report: PartialReport) -> list[object]:
        if key == "bad":
            raise RuntimeError("corrupt adapter")
        return [ValueError("odd") if p % 2 else p for p in payloads]

    async def main() -> list[object]:
        batcher = Batcher(run_group, ThreadPoolExecutor(1), max_batch_size=8, max_wait_ms=20, max_queue_size=100)
        batcher.start()
        first = await asyncio.gather(batcher.submit("bad", 0), batcher.submit("good", 2), batcher.submit("good", 3),
                                     return_exceptions=True)
        later = await batcher.submit("good", 4)
        await batcher.stop()
        return [*first, later]

    bad, good, odd, later = _run(main())
    assert isinstance(bad, RuntimeError) and good == 2 and isinstance(odd, ValueError) and later == 4


def test_full_queue_refuses_at_once() -> None:
    release = threading.Event()

    slow = _held_until(release)

    async def main() -> None:
        batcher = Batcher(slow, ThreadPoolExecutor(1), max_batch_size=1, max_wait_ms=0, max_queue_size=2)
        batcher.start()
        running = [asyncio.create_task(batcher.submit("k", 0))]
        await asyncio.sleep(0.05)  # the worker holds the first
        running += [asyncio.create_task(batcher.submit("k", i)) for i in (1, 2)]
        await asyncio.sleep(0.05)  # two queued: the queue is full
        with pytest.raises(QueueFull):
            await batcher.submit("k", 99)
        release.set()
        assert await asyncio.gather(*running) == [0, 1, 2]
        await batcher.stop()

    _run(main())


def test_stats_report_queue_wait() -> None:
    stats: list[BatchStats] = []

    async def main() -> None:
        batcher = Batcher(lambda k, p, report: list(p), ThreadPoolExecutor(1), max_batch_size=4, max_wait_ms=30,
                          max_queue_size=10, on_batch=stats.append)
        batcher.start()
        await asyncio.gather(*(batcher.submit("k", i) for i in range(4)))
        await batcher.stop()

    _run(main())
    assert sum(s.size for s in stats) == 4 and all(w >= 0 for s in stats for w in s.queue_waits)


def test_stop_fails_waiting_requests_with_not_ready() -> None:
    from service.errors import NotReady

    release = threading.Event()

    slow = _held_until(release)

    async def main() -> None:
        batcher = Batcher(slow, ThreadPoolExecutor(1), max_batch_size=1, max_wait_ms=0, max_queue_size=10)
        batcher.start()
        first = asyncio.create_task(batcher.submit("k", 0))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(batcher.submit("k", 1))
        await asyncio.sleep(0.05)
        release.set()
        await batcher.stop()
        with pytest.raises(NotReady):
            await waiting
        first.cancel()

    _run(main())


class _Rows:
    """A continuous step runner: each admitted payload is a row that streams ``payload`` steps, one partial each,
    then its result; it records which step admitted what and which thread stepped."""

    def __init__(self, gate: threading.Event | None = None, seconds: float = 0.0) -> None:
        self.left: dict[int, int] = {}
        self.steps = 0
        self.admitted_at: dict[int, int] = {}
        self.threads: set[str] = set()
        self.gate = gate  # the third step waits for it
        self.seconds = seconds  # each step's compute time

    def __call__(self, admitted: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, str, object]], int]:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        self.steps += 1
        if self.steps == 3 and self.gate is not None:
            assert self.gate.wait(5), "earlier steps' partials never reached their requests"
        for handle, payload in admitted:
            self.left[handle] = payload
            self.admitted_at[payload] = self.steps
        events: list[tuple[int, str, object]] = []
        for handle in list(self.left):
            self.left[handle] -= 1
            events.append((handle, "partial", self.steps))
            if self.left[handle] == 0:
                del self.left[handle]
                events.append((handle, "result", self.steps))
        return events, len(self.left)


def _continuous(rows: _Rows, max_batch_size: int = 8) -> Batcher:
    return Batcher(lambda key, payloads, report: list(payloads), ThreadPoolExecutor(1, thread_name_prefix="model"),
                   max_batch_size=max_batch_size, max_wait_ms=1, max_queue_size=100, step=rows,
                   continuous=lambda key: key == "gen")


def test_steps_run_ahead_on_the_model_thread_and_stream_each_step_as_it_ends() -> None:
    gate = threading.Event()
    rows = _Rows(gate)

    async def main() -> list[object]:
        batcher = _continuous(rows)
        batcher.start()
        seen: list[object] = []

        def on_partial(value: object) -> None:
            seen.append(value)
            if value == 2:  # steps 1 and 2 were delivered while the executor still ran step 3
                gate.set()

        result = await batcher.submit("gen", 5, on_partial)
        await batcher.stop()
        return [*seen, result]

    assert _run(main()) == [1, 2, 3, 4, 5, 5]
    assert rows.threads == {"model_0"}


def test_a_request_arriving_mid_run_joins_at_once() -> None:
    rows = _Rows(seconds=0.002)

    async def main() -> None:
        batcher = _continuous(rows)
        batcher.start()
        long = asyncio.create_task(batcher.submit("gen", 200))
        while rows.steps < 5:
            await asyncio.sleep(0.001)
        joined_after = rows.steps
        assert await batcher.submit("gen", 3) == rows.admitted_at[3] + 2
        assert rows.admitted_at[3] <= joined_after + 2  # not after the running row's 200 steps, nor 16 of them
        assert await long == 200
        await batcher.stop()

    _run(main())


def test_a_row_leaving_admits_the_next_waiting_request() -> None:
    rows = _Rows()

    async def main() -> list[object]:
        batcher = _continuous(rows, max_batch_size=1)
        batcher.start()
        results = await asyncio.gather(batcher.submit("gen", 2), batcher.submit("gen", 3))
        await batcher.stop()
        return results

    assert _run(main()) == [2, 5]  # the second joined in the step after the first left


def test_an_idle_batcher_waits_for_a_wave_of_generation_requests_still_arriving() -> None:
    """Requests 10 ms apart against a 40 ms wait: all in the first step, though the last came 60 ms after the
    first; a wave that goes on past the cap (0.1 s past the wait) starts without its tail."""
    rows = _Rows()

    async def main(count: int) -> dict[int, int]:
        batcher = Batcher(lambda key, payloads, report: list(payloads), ThreadPoolExecutor(1), max_batch_size=64,
                          max_wait_ms=40, max_queue_size=100, step=rows, continuous=lambda key: key == "gen")
        batcher.start()
        rows.admitted_at.clear()
        submitted = []
        for index in range(count):
            submitted.append(asyncio.create_task(batcher.submit("gen", 100 + index)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*submitted)
        await batcher.stop()
        return dict(rows.admitted_at)

    admitted = _run(main(7))
    assert set(admitted.values()) == {min(admitted.values())}
    admitted = _run(main(40))  # 400 ms of arrivals, past the cap (140 ms): the first step has only the front
    first_step = min(admitted.values())
    assert 5 <= sum(step == first_step for step in admitted.values()) < 40


def test_requests_queued_as_the_wait_runs_out_join_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wave read in two parts: the first request, then the rest queued just as the idle wait for more times out.
    All of them start in the first step, not after the first one's run-ahead of steps."""
    rows = _Rows(seconds=0.002)
    real_wait_for = asyncio.wait_for
    late: list[asyncio.Task] = []

    async def main() -> list[object]:
        batcher = _continuous(rows)

        async def wave_then_timeout(awaitable, timeout):  # the first wait for more: the rest arrive as it ends
            monkeypatch.setattr(asyncio, "wait_for", real_wait_for)
            awaitable.close()
            late.extend(asyncio.create_task(batcher.submit("gen", 21 + index)) for index in range(3))
            await asyncio.sleep(0)  # they are queued
            raise TimeoutError

        monkeypatch.setattr(asyncio, "wait_for", wave_then_timeout)
        batcher.start()
        first = await batcher.submit("gen", 20)
        results = [first, *[await task for task in late]]
        await batcher.stop()
        return results

    assert _run(main()) == [20, 21, 22, 23]
    assert rows.admitted_at == {20: 1, 21: 1, 22: 1, 23: 1}
