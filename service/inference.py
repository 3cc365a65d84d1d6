"""The service object routes talk to: checks a request against the store, queues it, and runs batches.

``submit``-side work (adapter lookup, tokenization, limits) happens on the event loop so a bad request fails at
once with its own error; ``run_group`` runs on the model worker thread with the batch the batcher formed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from service.batching.batcher import Batcher, BatchStats, PartialReport
from service.domain import AdapterInfo, Classification, Generation, GenerationParams, Task
from service.errors import AdapterNotFound, DeadlineExceeded, InvalidRequest, WrongTask
from service.metrics import Metrics
from service.model.adapters import CONFIG_FILE, WEIGHTS_FILE, LoadedAdapter
from service.model.buckets import length_buckets
from service.model.engine import DoneEvent, GenerationEngine, generate
from service.model.resident import ResidentAdapters
from service.model.runner import GenerationJob, ModelRunner
from service.settings import Settings
from service.store.store import AdapterStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupKey:
    """Requests batch together when they share this key: the task alone when batching is mixed, else also the
    adapter and its content version."""

    adapter: str | None
    version: str | None
    task: Task


@dataclass(frozen=True)
class _ClassifyPayload:
    info: AdapterInfo
    inputs: list[list[int]]


@dataclass(frozen=True)
class _GeneratePayload:
    info: AdapterInfo | None
    job: GenerationJob


class InferenceService:
    """Classification and generation over the batcher, with adapters resolved through the store."""

    def __init__(
        self, settings: Settings, store: AdapterStore, runner: ModelRunner, executor: Executor, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.executor = executor
        self.metrics = metrics
        self.resident = ResidentAdapters(
            runner,
            max_loaded=settings.max_loaded_adapters,
            max_bytes=settings.max_resident_bytes,
            pinned=set(settings.preload_adapters),
            refresh=store.get,
            observe=self._record_resident,
        )
        self.batcher = Batcher(
            self.run_group,
            executor,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_size=settings.max_queue_size,
            on_batch=self._record_batch,
            on_depth=metrics.queue_depth.set,
            step=self._step,
            continuous=self._is_continuous,
        )
        self.engine = GenerationEngine(runner)

    def _record_resident(self, event: str, value: float) -> None:
        metrics = self.metrics
        if event in ("hit", "miss", "evict"):
            metrics.resident_events.labels(event=event).inc(value)
        elif event in ("load_seconds", "load_error_seconds"):
            metrics.adapter_load_seconds.observe(value)
            metrics.adapter_loads.labels(outcome="loaded" if event == "load_seconds" else "error").inc()
        elif event == "resident":
            metrics.adapters_loaded.set(value)
        elif event == "resident_bytes":
            metrics.resident_bytes.set(value)

    def _record_batch(self, stats: BatchStats) -> None:
        task = stats.key.task.value
        self.metrics.batch_size.labels(task=task).observe(stats.size)
        self.metrics.inference_seconds.labels(task=task).observe(stats.seconds)
        for wait in stats.queue_waits:
            self.metrics.queue_wait_seconds.labels(task=task).observe(wait)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.batcher.start()
        for name in self.settings.preload_adapters:
            info = await asyncio.to_thread(self.store.get, name)
            await self._on_worker(self.resident.acquire, info)

    async def stop(self) -> None:
        await self.batcher.stop()

    async def _on_worker(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def forget(self, name: str) -> None:
        """Unload a deleted adapter, serialized with the batches on the worker thread."""
        await self._on_worker(self.resident.drop, name)

    # -- requests -------------------------------------------------------------------------------------------------

    async def adapter_for(self, name: str | None, task: Task) -> AdapterInfo | None:
        if name is None:
            if task is Task.CLASSIFICATION:
                raise WrongTask("classification needs an adapter with a classification head; name one in 'adapter'")
            return None
        info = await asyncio.to_thread(self.store.get, name)
        if info.task is not task:
            raise WrongTask(f"adapter {name!r} is a {info.task.value} adapter; it cannot serve {task.value}")
        return info

    async def classify(self, adapter: str | None, texts: Sequence[str]) -> list[Classification]:
        info = await self.adapter_for(adapter, Task.CLASSIFICATION)
        if len(texts) > self.settings.max_inputs_per_request:
            raise InvalidRequest(
                f"{len(texts)} inputs in one request; the limit is {self.settings.max_inputs_per_request}"
            )
        limit = self.settings.max_input_tokens
        inputs = [
            self.runner.encode_text(text, limit, f"input {index}" if len(texts) > 1 else "input")
            for index, text in enumerate(texts)
        ]
        key = self._key(info, Task.CLASSIFICATION)
        return await self._submit(key, _ClassifyPayload(info, inputs))

    async def prepare_generation(self, adapter: str | None, params: GenerationParams) -> _GeneratePayload:
        """Everything that can refuse a generation request, done before any response starts."""
        info = await self.adapter_for(adapter, Task.GENERATION)
        prompt_ids = self.runner.encode_prompt(params, self.settings.max_input_tokens)
        return _GeneratePayload(info, GenerationJob(params, prompt_ids))

    async def generate(self, payload: _GeneratePayload, on_text: Callable[[str], None] | None = None) -> Generation:
        """Run a prepared request; ``on_text`` receives the text as it is generated (for streaming)."""
        try:
            generation = await self._submit(self._key(payload.info, Task.GENERATION), payload, on_text)
        except (DeadlineExceeded, asyncio.CancelledError):
            payload.job.cancelled.set()  # frees its row at the next decode step
            raise
        name = None if payload.info is None else payload.info.name
        self.metrics.generated_tokens.labels(adapter=self.metrics.adapter_label(name)).inc(
            generation.generated_tokens
        )
        return generation

    async def stream(self, payload: _GeneratePayload) -> AsyncIterator[str | Generation]:
        """Text pieces as they are generated, then the final Generation; leaving early frees the row."""
        pieces: asyncio.Queue[str] = asyncio.Queue()
        task = asyncio.create_task(self.generate(payload, pieces.put_nowait))
        try:
            while not task.done() or not pieces.empty():
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            yield task.result()
        finally:
            if not task.done():
                payload.job.cancelled.set()
                task.cancel()

    def _is_continuous(self, key: Hashable) -> bool:
        """Mixed batching runs generation at iteration level; grouped keeps one static batch per adapter."""
        return self.settings.batching == "mixed" and isinstance(key, GroupKey) and key.task is Task.GENERATION

    def _key(self, info: AdapterInfo | None, task: Task) -> GroupKey:
        if self.settings.batching == "mixed" or info is None:
            return GroupKey(None, None, task)
        return GroupKey(info.name, info.sha256, task)

    async def _submit(self, key: GroupKey, payload: object, on_partial: Callable[[str], None] | None = None):
        """Queue with a deadline; a request cancelled before its batch starts is skipped by the batcher."""
        try:
            return await asyncio.wait_for(
                self.batcher.submit(key, payload, on_partial), self.settings.request_timeout_s
            )
        except TimeoutError as error:
            raise DeadlineExceeded(
                f"the request took longer than {self.settings.request_timeout_s:g} s; retry, or ask for less"
            ) from error

    # -- worker thread --------------------------------------------------------------------------------------------

    def run_group(
        self, key: Hashable, payloads: Sequence[_ClassifyPayload | _GeneratePayload], report: PartialReport
    ) -> list:
        assert isinstance(key, GroupKey)
        try:
            if key.task is Task.CLASSIFICATION:
                return self._classify_group(payloads)
            return self._generate_group(payloads, report)
        finally:
            self._collect_unused()

    def _step(self, admitted: Sequence[tuple[int, _GeneratePayload]]) -> tuple[list[tuple[int, str, object]], int]:
        """One continuous-batching step: admit new requests (loading their adapters), advance every row."""
        held = {adapter.info.name for adapter in self.engine.adapters_in_use()}
        adapters, failures = self._acquire_each([payload.info for _, payload in admitted], held)
        events: list[tuple[int, str, object]] = [
            (admitted[index][0], "error", error) for index, error in failures.items()
        ]
        ready = [
            (handle, adapter, payload.job)
            for index, ((handle, payload), adapter) in enumerate(zip(admitted, adapters)) if index not in failures
        ]
        try:
            for event in self.engine.step(ready):
                if isinstance(event, DoneEvent):
                    events.append((event.handle, "result", event.generation))
                else:
                    events.append((event.handle, "partial", event.text))
        except Exception as error:  # a failed step fails the rows it held; the engine starts clean
            logger.exception("generation step failed")
            events += [(handle, "error", error) for handle in self.engine.abort() + [h for h, _, _ in ready]]
        self._collect_unused()
        return events, self.engine.active

    def _load_failure(self, info: AdapterInfo, error: Exception) -> Exception:
        """An adapter deleted between the request's check and its load is gone (404), not broken: its folder, or a
        file the check saw there, is missing now (a folder removed file by file is seen half-deleted)."""
        folder = self.store.root / info.name
        if not all((folder / file).is_file() for file in (CONFIG_FILE, WEIGHTS_FILE)):
            return AdapterNotFound(f"adapter {info.name!r} was deleted")
        return error

    def _collect_unused(self) -> None:
        self.resident.collect({id(adapter) for adapter in self.engine.adapters_in_use()})

    def _acquire_each(
        self, infos: Sequence[AdapterInfo | None], held: set[str] = frozenset()
    ) -> tuple[list[LoadedAdapter | None], dict[int, Exception]]:
        """Load each distinct adapter of a batch once, evicting none of the batch's (or ``held``) ones; an adapter
        that fails to load fails its own requests, not the batch."""
        protect = set(held) | {info.name for info in infos if info is not None}
        outcomes: dict[str, LoadedAdapter | Exception] = {}
        adapters: list[LoadedAdapter | None] = []
        failures: dict[int, Exception] = {}
        for index, info in enumerate(infos):
            if info is not None and info.name not in outcomes:
                try:
                    outcomes[info.name] = self.resident.acquire(info, protect)
                except Exception as error:  # corrupt or vanished files: that request's error alone
                    outcomes[info.name] = self._load_failure(info, error)
            outcome = None if info is None else outcomes[info.name]
            if isinstance(outcome, Exception):
                failures[index] = outcome
                outcome = None
            adapters.append(outcome)
        return adapters, failures

    def _classify_group(self, payloads: Sequence[_ClassifyPayload]) -> list:
        adapters, failures = self._acquire_each([payload.info for payload in payloads])
        rows = [
            (adapter, ids)
            for index, (adapter, payload) in enumerate(zip(adapters, payloads)) if index not in failures
            for ids in payload.inputs
        ]
        probabilities: list[list[float]] = [[] for _ in rows]
        for bucket in length_buckets([len(ids) for _, ids in rows], self.settings.max_batch_size):
            got = self.runner.classify([rows[i][0] for i in bucket], [rows[i][1] for i in bucket])
            for index, values in zip(bucket, got):
                probabilities[index] = values
        results: list = []
        cursor = 0
        for index, payload in enumerate(payloads):
            if index in failures:
                results.append(failures[index])
                continue
            mine = probabilities[cursor:cursor + len(payload.inputs)]
            cursor += len(payload.inputs)
            results.append([_classification(payload.info.labels or [], probs) for probs in mine])
        return results

    def _generate_group(self, payloads: Sequence[_GeneratePayload], report: PartialReport) -> list:
        adapters, failures = self._acquire_each([payload.info for payload in payloads])
        healthy = [index for index in range(len(payloads)) if index not in failures]
        generations = iter(
            generate(self.runner, [adapters[i] for i in healthy], [payloads[i].job for i in healthy],
                     on_text=lambda row, text: report(healthy[row], text)) if healthy else []
        )
        return [failures[index] if index in failures else next(generations) for index in range(len(payloads))]


def _classification(labels: list[str], probabilities: list[float]) -> Classification:
    scores = {label: probability for label, probability in zip(labels, probabilities)}
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return Classification(label=labels[best], score=probabilities[best], scores=scores)
