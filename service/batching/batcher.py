"""Dynamic batching: requests queue, a worker collects a batch, groups it by key and runs each group off the loop.

Knows nothing of torch or HTTP: a group runner takes ``(key, payloads)`` and returns one result or exception per
payload. One future per request; a failing group fails only its own requests, and the worker lives on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from service.errors import NotReady, QueueFull

logger = logging.getLogger(__name__)

# Steps the executor runs back to back before handing back to the loop when nothing new arrives. Handing back
# after every step left the model thread idle while the loop, busy streaming the last step's tokens to 64 clients,
# got round to submitting the next (7% of the model thread's time at 64 streams).
_RUN_AHEAD_STEPS = 16
# How long an idle batcher waits on for a wave of generation requests still arriving: this many max_waits, and no
# more than _BURST_MAX_SECONDS past max_wait.
_BURST_WAITS = 8
_BURST_MAX_SECONDS = 0.1

# A group runner takes (key, payloads, report) and returns one result or exception per payload; it may call
# report(index, value) from its thread to hand a payload's partial result (streamed text) to its request.
PartialReport = Callable[[int, Any], None]
GroupRunner = Callable[[Hashable, Sequence[Any], PartialReport], Sequence[Any]]
# A continuous runner takes newly admitted (handle, payload) pairs, advances every running request one step and
# returns what happened: (handle, "partial" | "result" | "error", value) triples, and how many are still running.
StepRunner = Callable[[Sequence[tuple[int, Any]]], tuple[list[tuple[int, str, Any]], int]]


@dataclass
class _Item:
    key: Hashable
    payload: Any
    future: asyncio.Future
    on_partial: Callable[[Any], None] | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What one group run looked like, for metrics."""

    key: Hashable
    size: int
    queue_waits: list[float]
    seconds: float


class Batcher:
    """Collects up to ``max_batch_size`` requests or waits ``max_wait_ms``, then runs them grouped by key.

    Keys for which ``continuous(key)`` holds go to ``step`` instead: they join the running set at the next step
    (up to ``max_batch_size`` running at once) and resolve when their own result arrives, so short requests never
    wait for long ones. Grouped batches run between steps.
    """

    def __init__(
        self,
        run_group: GroupRunner,
        executor: Executor,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_size: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        step: StepRunner | None = None,
        continuous: Callable[[Hashable], bool] = lambda key: False,
    ) -> None:
        self._run_group = run_group
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000.0
        self._max_queue_size = max_queue_size
        self._on_batch = on_batch or (lambda stats: None)
        self._on_depth = on_depth or (lambda depth: None)
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None
        self._step = step
        self._continuous = continuous
        self._waiting: list[_Item] = []  # continuous requests not yet admitted
        self._live: dict[int, _Item] = {}  # continuous requests running, by handle
        self._running = 0
        self._step_key: Hashable = None  # the key continuous requests carry, for stats
        self._in_group = False
        self._arrived = threading.Event()  # set when a request is queued: steps running ahead hand back

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def busy(self) -> bool:
        """Whether any request is queued, waiting to join, running or in a group being computed."""
        return bool(self.depth or self._waiting or self._live or self._running or self._in_group)

    @property
    def depth(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._work(), name="batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        left = list(self._waiting) + list(self._live.values())
        while self._queue is not None and not self._queue.empty():
            left.append(self._queue.get_nowait())
        for item in left:
            if not item.future.done():
                item.future.set_exception(NotReady("the service is shutting down; retry on another replica"))

    def check_room(self, requests: int) -> None:
        """Refuse now (QueueFull) what could not all be queued, before a caller starts answering."""
        assert self._queue is not None, "batcher not started"
        if self._queue.qsize() + requests > self._max_queue_size:
            raise QueueFull(f"the queue holds {self._max_queue_size} requests; retry shortly")

    async def submit(self, key: Hashable, payload: Any, on_partial: Callable[[Any], None] | None = None) -> Any:
        """Queue one request and wait for its result (or its exception); partial results go to ``on_partial``."""
        self.check_room(1)
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(key=key, payload=payload, future=future, on_partial=on_partial))
        self._arrived.set()
        self._on_depth(self._queue.qsize())
        return await future

    async def _collect(self) -> list[_Item]:
        assert self._queue is not None
        if self._running or self._waiting:  # steps are due: take what is queued now, never wait
            return self._take_queued([])
        batch = [await self._queue.get()]
        # Nothing runs: wait up to max_wait for more. While generation requests keep arriving (a wave of clients,
        # read by this loop at a millisecond or so each), wait on until max_wait passes with none, up to
        # _BURST_WAITS max_waits (at most _BURST_MAX_SECONDS past one): a wave cut short starts with the part read
        # so far, and the rest, read during that part's long prompt step, join behind it a few prompts a step.
        first = time.perf_counter()
        deadline = first + self._max_wait
        last_call = first + min(_BURST_WAITS * self._max_wait, self._max_wait + _BURST_MAX_SECONDS)
        while len(batch) < self._max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                item = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                break
            batch.append(item)
            if self._continuous(item.key) and not item.future.done():
                deadline = max(deadline, min(last_call, time.perf_counter() + self._max_wait))
        # Requests queued as the wait ran out join too (a timed-out wait can leave some in the queue).
        return self._take_queued(batch)

    def _take_queued(self, batch: list[_Item]) -> list[_Item]:
        """``batch`` and what is queued now, up to the batch size. The arrival signal is cleared here, where the
        queue is read, so it means "queued since the last read": a request queued after it (while a grouped batch
        runs, say) makes the steps ahead hand back after one. Cleared later, as it was, a request queued in between
        waited out a whole run-ahead (16 steps, 0.19 s at 16 streams) while the rows taken before it streamed
        alone: the benchmark's TTFT p99 outliers."""
        assert self._queue is not None
        self._arrived.clear()
        while len(batch) < self._max_batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        self._on_depth(self._queue.qsize())
        return batch

    async def _work(self) -> None:
        while True:
            batch = [item for item in await self._collect() if not item.future.done()]
            groups: dict[Hashable, list[_Item]] = {}
            for item in batch:
                if self._continuous(item.key):
                    self._waiting.append(item)
                else:
                    groups.setdefault(item.key, []).append(item)
            for key, items in groups.items():
                await self._run_group_of(key, items)
            await self._advance_continuous()

    async def _run_group_of(self, key: Hashable, items: list[_Item]) -> None:
        started = time.perf_counter()
        self._in_group = True
        loop = asyncio.get_running_loop()

        def report(index: int, value: Any) -> None:  # called on the executor's thread
            loop.call_soon_threadsafe(_deliver_partial, items[index], value)

        try:
            results = await loop.run_in_executor(
                self._executor, self._run_group, key, [item.payload for item in items], report
            )
        except Exception as error:  # the group's failure is its requests' failure, not the worker's
            logger.exception("batch for %s failed", key)
            results = [error] * len(items)
        finally:
            self._in_group = False
        seconds = time.perf_counter() - started
        for item, result in zip(items, results):
            _resolve(item, result)
        self._on_batch(
            BatchStats(key=key, size=len(items), queue_waits=[started - i.enqueued_at for i in items], seconds=seconds)
        )

    async def _advance_continuous(self) -> None:
        self._waiting = [item for item in self._waiting if not item.future.done()]
        if self._step is None or not (self._running or self._waiting):
            return
        stepped = self._running
        room = max(0, self._max_batch_size - self._running)
        admitted, self._waiting = self._waiting[:room], self._waiting[room:]
        for item in admitted:
            self._live[id(item)] = item
        if admitted:
            self._step_key = admitted[0].key
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            last = await loop.run_in_executor(self._executor, self._run_ahead, loop, admitted, stepped)
        except Exception as error:  # the step runner is expected to recover; if not, fail what was running
            logger.exception("generation step failed")
            self._running = 0
            errors = [(handle, "error", error) for handle in self._live]
            last = (errors, stepped, admitted, started, time.perf_counter() - started)
        self._apply_step(*last)

    def _run_ahead(self, loop: asyncio.AbstractEventLoop, admitted: list[_Item],
                   stepped: int) -> tuple[list[tuple[int, str, Any]], int, list[_Item], float, float]:
        """On the executor's thread: steps until none run, a request arrives (it may need admitting, or be a
        group to run between steps), a row leaves while others wait to join, or the run-ahead limit. Each step's
        events go to the loop as soon as it ends; the last step's are returned."""
        assert self._step is not None
        steps = 0
        while True:
            started = time.perf_counter()
            events, running = self._step([(id(item), item.payload) for item in admitted])
            seconds = time.perf_counter() - started
            steps += 1
            self._running = running
            left = any(kind != "partial" for _, kind, _ in events)
            if (not running or self._arrived.is_set() or steps >= _RUN_AHEAD_STEPS
                    or (left and self._waiting)):
                return events, stepped, admitted, started, seconds
            loop.call_soon_threadsafe(self._apply_step, events, stepped, admitted, started, seconds)
            stepped, admitted = running, []

    def _apply_step(self, events: list[tuple[int, str, Any]], stepped: int, admitted: list[_Item], started: float,
                    seconds: float) -> None:
        """On the loop: one step's partial results, results and failures to their requests, and its stats."""
        for handle, kind, value in events:
            item = self._live.get(handle)
            if item is None:
                continue
            if kind == "partial":
                _deliver_partial(item, value)
                continue
            del self._live[handle]
            _resolve(item, value)
        self._on_batch(BatchStats(key=self._step_key, size=stepped + len(admitted),
                                  queue_waits=[started - i.enqueued_at for i in admitted], seconds=seconds))


def _deliver_partial(item: _Item, value: Any) -> None:
    if item.on_partial is not None and not item.future.done():
        item.on_partial(value)


def _resolve(item: _Item, result: Any) -> None:
    if item.future.done():
        return
    if isinstance(result, BaseException):
        item.future.set_exception(result)
    else:
        item.future.set_result(result)
