"""The request side: checks a request against the store, tokenizes it, refuses quarantined adapters, and queues
it for the batcher; ``service.worker`` runs the batches on the model thread.

Work here happens on the event loop so a bad request fails at once with its own error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

from service.batching.batcher import Batcher, BatchStats
from service.domain import AdapterInfo, Classification, Entity, Generation, GenerationParams, Task
from service.entities import token_entities
from service.errors import DeadlineExceeded, InvalidRequest, WrongTask
from service.metrics import Metrics
from service.model.resident import ResidentAdapters
from service.model.runner import GenerationJob, ModelRunner
from service.quarantine import Quarantine
from service.settings import Settings
from service.store.store import AdapterStore
from service.worker import BatchWorker, ClassifyPayload, GeneratePayload, GroupKey

logger = logging.getLogger(__name__)
T = TypeVar("T")


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
        self.quarantine = Quarantine()
        # Adapters are read and prepared on one thread of their own: several at once (asyncio's pool, six threads
        # on two cores) took the GIL and the cores from the model thread while a burst of cold requests waited.
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-prefetch")
        self._served: Counter[str] = Counter()  # requests answered successfully, per adapter name
        self.worker = BatchWorker(settings, store, runner, metrics, self.quarantine)
        self.batcher = Batcher(
            self.worker.run_group,
            executor,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_size=settings.max_queue_size,
            on_batch=self._record_batch,
            on_depth=metrics.queue_depth.set,
            step=self.worker.step,
            continuous=self._is_continuous,
        )

    @property
    def resident(self) -> ResidentAdapters:
        return self.worker.resident

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
        self._prefetcher.shutdown(wait=False, cancel_futures=True)

    async def _on_worker(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def forget(self, name: str) -> None:
        """Unload a deleted adapter, clear its quarantine (serialized with the batches on the worker thread) and
        its count of requests served."""
        self._served.pop(name, None)
        await self._on_worker(self.worker.forget, name)

    def requests_served(self, name: str) -> int:
        """Requests this adapter answered successfully since the start or since it was last deleted."""
        return self._served[name]

    def _count_served(self, info: AdapterInfo | None) -> None:
        if info is not None and self.store.has(info.name):  # not an answer that outran its adapter's delete
            self._served[info.name] += 1

    def smoke(self, info: AdapterInfo) -> None:
        """Run a staged adapter once on the model thread, between batches (called from an upload's thread)."""
        self.executor.submit(self.worker.smoke, info).result()

    # -- requests -------------------------------------------------------------------------------------------------

    async def adapter_for(self, name: str | None, task: Task) -> AdapterInfo | None:
        if task is Task.GENERATION and not self.runner.base.family.can_generate:
            raise WrongTask(f"the base model is an encoder ({self.runner.base.family.name}) and cannot generate; "
                            "use /v1/classify or /v1/classify_tokens")
        if name is None:
            if task is not Task.GENERATION:
                raise WrongTask(f"{task.value} needs an adapter with a classification head; name one in 'adapter'")
            return None
        info = self.store.peek(name) or await asyncio.to_thread(self.store.get, name)
        self.quarantine.check(info)
        if info.task is not task:
            raise WrongTask(f"adapter {name!r} is a {info.task.value} adapter; it cannot serve {task.value}: "
                            f"use {info.task.route}")
        if info.name not in self.resident:
            # Read and prepare it now, off the model thread, so its load there is only the write into the pools.
            await asyncio.get_running_loop().run_in_executor(self._prefetcher, self.runner.prefetch, info)
        return info

    async def classify(self, adapter: str | None, texts: Sequence[str]) -> list[Classification]:
        info = await self.adapter_for(adapter, Task.CLASSIFICATION)
        inputs = self._encode_each(texts, self.runner.encode_text, info)
        key = self._key(info, Task.CLASSIFICATION)
        results = await self._submit(key, ClassifyPayload(info, inputs))
        self._count_served(info)
        return results

    async def classify_tokens(self, adapter: str, texts: Sequence[str], aggregation: str) -> list[list[Entity]]:
        """Entities per input, as the transformers token-classification pipeline gives them."""
        info = await self.adapter_for(adapter, Task.TOKEN_CLASSIFICATION)
        encoded = self._encode_each(texts, self.runner.encode_with_offsets, info)
        key = self._key(info, Task.TOKEN_CLASSIFICATION)
        scores = await self._submit(key, ClassifyPayload(info, [e.ids for e in encoded]))
        labels = info.labels or []
        entities = [token_entities(text, e.offsets, e.special, s, labels, aggregation)
                    for text, e, s in zip(texts, encoded, scores)]
        self._count_served(info)
        return entities

    def _encode_each(self, texts: Sequence[str], encode: Callable[[str, int, str, int], T],
                     info: AdapterInfo) -> list[T]:
        """Each input encoded within the limits; an error names the input (by its index when there are several)."""
        if len(texts) > self.settings.max_inputs_per_request:
            raise InvalidRequest(
                f"{len(texts)} inputs in one request; the limit is {self.settings.max_inputs_per_request}"
            )
        limit = self.settings.max_input_tokens
        virtual = info.num_virtual_tokens or 0
        return [encode(text, limit, f"input {index}" if len(texts) > 1 else "input", virtual)
                for index, text in enumerate(texts)]

    async def prepare_generation(self, adapter: str | None, params: GenerationParams) -> GeneratePayload:
        """Everything that can refuse a generation request, done before any response starts."""
        self._check_limits(params)
        info = await self.adapter_for(adapter, Task.GENERATION)
        virtual = 0 if info is None else info.num_virtual_tokens or 0
        prompt_ids = self.runner.encode_prompt(params, self.settings.max_input_tokens, virtual)
        if params.max_new_tokens is None:
            room = self.runner.max_positions - virtual - len(prompt_ids)
            params = replace(params, max_new_tokens=min(room, self.settings.max_new_tokens_limit))
        return GeneratePayload(info, GenerationJob(params, prompt_ids))

    def _check_limits(self, params: GenerationParams) -> None:
        limit = self.settings.max_new_tokens_limit
        if params.max_new_tokens is not None and params.max_new_tokens > limit:
            raise InvalidRequest(f"max_new_tokens {params.max_new_tokens} exceeds the limit of {limit}",
                                 "max_new_tokens")
        if params.seed is not None and not -(2**63) <= params.seed < 2**64:
            raise InvalidRequest(f"seed {params.seed} is outside the 64-bit range a sampler takes", "seed")
        if len(params.stop) > self.settings.max_stop_strings or any(len(s) > 256 for s in params.stop):
            raise InvalidRequest(f"stop takes at most {self.settings.max_stop_strings} strings of at most 256 "
                                 "characters", "stop")

    async def generate(self, payloads: Sequence[GeneratePayload]) -> list[Generation]:
        """Run the prepared rows of one request together; the first failure cancels the others and is raised."""
        self.batcher.check_room(len(payloads))
        tasks = [asyncio.ensure_future(self._run_row(payload)) for payload in payloads]
        try:
            generations = list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
        self._count_served(payloads[0].info)
        return generations

    def stream(self, payloads: Sequence[GeneratePayload]) -> AsyncIterator[tuple[int, str | Generation]]:
        """(row index, piece of new text) as the rows of one request generate, then (row index, its Generation)
        for each; leaving early frees the rows. A full queue is refused here, before any response starts."""
        self.batcher.check_room(len(payloads))
        return self._stream(payloads)

    async def _stream(self, payloads: Sequence[GeneratePayload]) -> AsyncIterator[tuple[int, str | Generation]]:
        # One queue carries every row's pieces and results: a stream costs one wake-up per piece.
        pieces: asyncio.Queue[tuple[int, str | Generation | Exception]] = asyncio.Queue()

        async def run(index: int, payload: GeneratePayload) -> None:
            try:
                generation = await self._run_row(payload, lambda text: pieces.put_nowait((index, text)))
            except Exception as error:  # raised to the reader, in order with the pieces before it
                pieces.put_nowait((index, error))
            else:
                pieces.put_nowait((index, generation))

        tasks = [asyncio.create_task(run(index, payload)) for index, payload in enumerate(payloads)]
        try:
            finished = 0
            while finished < len(tasks):
                index, item = await pieces.get()
                if isinstance(item, Exception):
                    raise item
                finished += isinstance(item, Generation)
                yield index, item
            self._count_served(payloads[0].info)
        finally:
            for task in tasks:
                task.cancel()  # a row still running is freed at the next decode step

    async def _run_row(self, payload: GeneratePayload, on_text: Callable[[str], None] | None = None) -> Generation:
        """One prepared row through the batcher; ``on_text`` receives its text as it is generated."""
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
