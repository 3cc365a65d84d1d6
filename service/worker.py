"""The model-worker side: runs the batches the batcher formed, on the one worker thread, with fault isolation.

A forward pass that fails is retried one adapter's rows at a time; the rows whose adapter fails alone get
``AdapterFailed`` and that adapter is quarantined (unloaded, refused until replaced or deleted), every other row
gets its answer. Nothing here raises out of a batch: each request gets its result or its own error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from service.batching.batcher import PartialReport
from service.domain import AdapterInfo, Classification, GenerationParams, Task
from service.errors import AdapterInvalid, AdapterNotFound, Internal, InvalidRequest, ServiceBusy, ServiceError
from service.metrics import Metrics
from service.model.adapters import CONFIG_FILE, WEIGHTS_FILE, LoadedAdapter
from service.model.buckets import length_buckets
from service.model.events import DoneEvent, FailedEvent, TokenEvent
from service.model.generation import Engines, generate
from service.model.resident import ResidentAdapters
from service.model.runner import GenerationJob, ModelRunner
from service.quarantine import Quarantine, adapter_failed
from service.settings import Settings
from service.store.store import AdapterStore

logger = logging.getLogger(__name__)

SMOKE_TEXT = "Hello, how are you?"


@dataclass(frozen=True)
class GroupKey:
    """Requests batch together when they share this key: the task alone when batching is mixed, else also the
    adapter and its content version."""

    adapter: str | None
    version: str | None
    task: Task


@dataclass(frozen=True)
class ClassifyPayload:
    """Sequence or token classification of one request's inputs (token ids each)."""

    info: AdapterInfo
    inputs: list[list[int]]


@dataclass(frozen=True)
class GeneratePayload:
    info: AdapterInfo | None
    job: GenerationJob


StepEvent = tuple[Hashable, str, object]  # (handle, "partial" | "result" | "error", value)


class BatchWorker:
    """Owns the resident adapters and the running generation batch; every method runs on the model thread."""

    def __init__(self, settings: Settings, store: AdapterStore, runner: ModelRunner, metrics: Metrics,
                 quarantine: Quarantine) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.metrics = metrics
        self.quarantine = quarantine
        self.resident = ResidentAdapters(
            runner,
            max_loaded=settings.max_loaded_adapters,
            max_bytes=settings.max_resident_bytes,
            pinned=set(settings.preload_adapters),
            refresh=store.get,
            observe=self._record_resident,
        )
        self.engine = Engines(runner)

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

    # -- entry points (the batcher's) -----------------------------------------------------------------------------

    def run_group(
        self, key: Hashable, payloads: Sequence[ClassifyPayload | GeneratePayload], report: PartialReport
    ) -> list:
        assert isinstance(key, GroupKey)
        try:
            if key.task is Task.CLASSIFICATION:
                return self._classify_group(payloads, self.runner.classify, _classifications)
            if key.task is Task.TOKEN_CLASSIFICATION:
                return self._classify_group(payloads, self.runner.classify_tokens, lambda payload, scores: scores)
            return self._generate_group(payloads, report)
        except Exception as error:  # a bug outside any forward: its requests get a JSON 500, the worker lives on
            return [self._internal(error, "batch")] * len(payloads)
        finally:
            self._collect_unused()

    def step(self, admitted: Sequence[tuple[int, GeneratePayload]]) -> tuple[list[StepEvent], int]:
        """One continuous-batching step: admit new requests (loading their adapters), advance every row."""
        held = {adapter.info.name for adapter in self.engine.adapters_in_use()}
        adapters, failures = self._acquire_each([payload.info for _, payload in admitted], held)
        events: list[StepEvent] = [(admitted[index][0], "error", error) for index, error in failures.items()]
        ready = [
            (handle, adapter, payload.job)
            for index, ((handle, payload), adapter) in enumerate(zip(admitted, adapters)) if index not in failures
        ]
        try:
            step_events = self.engine.step(ready)
        except Exception as error:  # the engine isolates forward failures; this is anything else
            error = self._internal(error, "batch")
            events += [(handle, "error", error) for handle in self.engine.abort() + [h for h, _, _ in ready]]
            step_events = []
        failed: dict[int, Exception] = {}
        for event in step_events:
            if isinstance(event, DoneEvent):
                events.append((event.handle, "result", event.generation))
            elif isinstance(event, TokenEvent):
                events.append((event.handle, "partial", event.text))
            elif isinstance(event.error, InvalidRequest):  # the request's own size (never fits the cache)
                events.append((event.handle, "error", event.error))
            else:
                key = id(event.adapter)
                if key not in failed:
                    failed[key] = self._forward_failed(event.adapter, event.error)
                events.append((event.handle, "error", failed[key]))
        self._collect_unused()
        return events, self.engine.active

    def forget(self, name: str) -> None:
        """Unload a deleted adapter and clear its quarantine."""
        self.resident.drop(name)
        self.quarantine.forget(name)
        self._collect_unused()

    def smoke(self, info: AdapterInfo) -> None:
        """Run an adapter that is not yet published once on a short input; ``AdapterInvalid`` if it cannot run or
        answers with non-finite numbers. It is unloaded afterwards: nothing of it stays in the shared model."""
        adapter = self.runner.load(info)
        try:
            ids = self.runner.encode_text(SMOKE_TEXT, 64)
            with torch.inference_mode():
                if info.task is Task.CLASSIFICATION:
                    scores = torch.tensor(self.runner.classify([adapter], [ids]))
                elif info.task is Task.TOKEN_CLASSIFICATION:
                    scores = torch.tensor(self.runner.classify_tokens([adapter], [ids]))
                else:
                    batch_ids, mask, positions, cache = self.runner.start([adapter], [ids])
                    with self.runner.lora_routing([adapter]):
                        scores = self.runner.logits(batch_ids, mask, positions, cache)
                    job = GenerationJob(GenerationParams(prompt=SMOKE_TEXT, max_new_tokens=2), ids)
                    generate(self.runner, [adapter], [job])
            if not torch.isfinite(scores).all():
                raise AdapterInvalid(f"{info.name}: the adapter gives non-finite outputs (NaN or inf) on a test input; "
                                     "check its weights (a diverged training run saves such values)")
        except ServiceError:
            raise
        except Exception as error:
            raise AdapterInvalid(
                f"{info.name}: the adapter fails when run on a test input ({type(error).__name__}: {error}); "
                "it was not published"
            ) from error
        finally:
            self.runner.unload(adapter)

    # -- failures -------------------------------------------------------------------------------------------------

    def _forward_failed(self, adapter: LoadedAdapter | None, error: Exception) -> Exception:
        """The error for rows whose group failed alone: quarantine their adapter, or a 500 for base rows."""
        if isinstance(error, InvalidRequest):  # the request's own size, not a fault of the adapter
            return error
        if adapter is None:
            return self._internal(error, "batch")
        if isinstance(error, (torch.OutOfMemoryError, MemoryError)):  # the machine's state, not the adapter's fault
            logger.error("out of memory serving adapter %s; not quarantined", adapter.info.name, exc_info=error)
            return ServiceBusy("out of memory for this batch; retry, or send shorter inputs")
        reason = _reason(error)
        logger.error("adapter %s failed in a forward pass and is quarantined: %s", adapter.info.name, reason,
                     exc_info=error)
        self.quarantine.mark(adapter.info, reason)
        self.resident.drop(adapter.info.name, only=adapter)  # a newer version already resident stays
        self.metrics.adapter_failures.labels(adapter=self.metrics.adapter_label(adapter.info.name),
                                             stage="forward").inc()
        return adapter_failed(adapter.info.name, reason)

    def _load_failed(self, info: AdapterInfo, error: Exception) -> Exception:
        """An adapter deleted between the request's check and its load is gone (404), not broken: its folder, or a
        file the check saw there, is missing now (a folder removed file by file is seen half-deleted). Any other
        load failure quarantines that version."""
        folder = self.store.root / info.name
        if not all((folder / file).is_file() for file in (CONFIG_FILE, WEIGHTS_FILE)):
            return AdapterNotFound(f"adapter {info.name!r} was deleted")
        reason = error.message if isinstance(error, ServiceError) else _reason(error)
        logger.warning("adapter %s failed to load and is quarantined: %s", info.name, reason)
        self.quarantine.mark(info, reason)
        self.metrics.adapter_failures.labels(adapter=self.metrics.adapter_label(info.name), stage="load").inc()
        return error if isinstance(error, ServiceError) else adapter_failed(info.name, reason)

    def _internal(self, error: Exception, where: str) -> Exception:
        if isinstance(error, ServiceError):
            return error
        logger.error("unexpected error in a %s", where, exc_info=error)
        self.metrics.internal_errors.labels(where=where).inc()
        return Internal(f"internal error ({type(error).__name__}); it was logged. Retry, or report it if it persists")

    # -- adapters -------------------------------------------------------------------------------------------------

    def _collect_unused(self) -> None:
        self.resident.collect({id(adapter) for adapter in self.engine.adapters_in_use()})

    def _acquire_each(
        self, infos: Sequence[AdapterInfo | None], held: set[str] = frozenset()
    ) -> tuple[list[LoadedAdapter | None], dict[int, Exception]]:
        """Load each distinct adapter of a batch once, evicting none of the batch's (or ``held``) ones; an adapter
        that fails to load, or is quarantined, fails its own requests, not the batch."""
        protect = set(held) | {info.name for info in infos if info is not None}
        outcomes: dict[str, LoadedAdapter | Exception] = {}
        adapters: list[LoadedAdapter | None] = []
        failures: dict[int, Exception] = {}
        for index, info in enumerate(infos):
            if info is not None and info.name not in outcomes:
                failure = self.quarantine.failure(info)
                if failure is not None:
                    outcomes[info.name] = adapter_failed(info.name, failure.reason)
                else:
                    try:
                        outcomes[info.name] = self.resident.acquire(info, protect)
                    except Exception as error:  # corrupt or vanished files: that request's error alone
                        outcomes[info.name] = self._load_failed(info, error)
            outcome = None if info is None else outcomes[info.name]
            if isinstance(outcome, Exception):
                failures[index] = outcome
                outcome = None
            adapters.append(outcome)
        return adapters, failures

    # -- static groups --------------------------------------------------------------------------------------------

    def _classify_group(
        self,
        payloads: Sequence[ClassifyPayload],
        run: Callable[[Sequence[LoadedAdapter], Sequence[Sequence[int]]], list],
        convert: Callable[[ClassifyPayload, list], object],
    ) -> list:
        """Every input of every request in passes of similar lengths; ``run`` scores a pass, ``convert`` turns a
        request's scores into its result."""
        held = {adapter.info.name for adapter in self.engine.adapters_in_use()}  # running generation rows' adapters
        adapters, failures = self._acquire_each([payload.info for payload in payloads], held)
        rows = [
            (index, adapter, ids)
            for index, (adapter, payload) in enumerate(zip(adapters, payloads)) if index not in failures
            for ids in payload.inputs
        ]
        scores: list = [None] * len(rows)
        for bucket in length_buckets([len(ids) for _, _, ids in rows], self.settings.max_batch_size):
            for positions, outcome in self._run_isolating(run, [rows[i] for i in bucket]):
                for order, position in enumerate(positions):
                    row = bucket[position]
                    if isinstance(outcome, Exception):
                        failures.setdefault(rows[row][0], outcome)
                    else:
                        scores[row] = outcome[order]
        rows_of: dict[int, list[int]] = {}
        for row, (index, _, _) in enumerate(rows):
            rows_of.setdefault(index, []).append(row)
        return [
            failures[index] if index in failures else convert(payload, [scores[row] for row in rows_of[index]])
            for index, payload in enumerate(payloads)
        ]

    def _run_isolating(
        self, run: Callable[[Sequence[LoadedAdapter], Sequence[Sequence[int]]], list],
        rows: Sequence[tuple[int, LoadedAdapter, list[int]]],
    ) -> list[tuple[list[int], list | Exception]]:
        """(row positions, their scores or the error) for one pass, split by adapter if the pass fails."""
        try:
            return [(list(range(len(rows))), run([a for _, a, _ in rows], [i for _, _, i in rows]))]
        except Exception as error:
            groups: dict[int, list[int]] = {}
            for position, (_, adapter, _) in enumerate(rows):
                groups.setdefault(id(adapter), []).append(position)
            if len(groups) == 1:
                return [(list(range(len(rows))), self._forward_failed(rows[0][1], error))]
            logger.warning("classification pass of %d rows failed (%r); retrying %d adapter groups apart",
                           len(rows), error, len(groups))
        outcomes: list[tuple[list[int], list | Exception]] = []
        for positions in groups.values():
            adapter = rows[positions[0]][1]
            try:
                outcomes.append((positions, run([adapter] * len(positions), [rows[p][2] for p in positions])))
            except Exception as group_error:
                outcomes.append((positions, self._forward_failed(adapter, group_error)))
        return outcomes

    def _generate_group(self, payloads: Sequence[GeneratePayload], report: PartialReport) -> list:
        adapters, failures = self._acquire_each([payload.info for payload in payloads])
        healthy = [index for index in range(len(payloads)) if index not in failures]

        errors: dict[int, Exception] = {}

        def failed(row: int, event: FailedEvent) -> None:
            key = id(event.adapter)
            if key not in errors:  # quarantined and counted once per adapter
                errors[key] = self._forward_failed(event.adapter, event.error)
            failures[healthy[row]] = errors[key]

        generations = generate(self.runner, [adapters[i] for i in healthy], [payloads[i].job for i in healthy],
                               on_text=lambda row, text: report(healthy[row], text),
                               on_failure=failed) if healthy else []
        by_index = dict(zip(healthy, generations))
        return [failures[index] if index in failures else by_index[index] for index in range(len(payloads))]


def _reason(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 300 else text[:297] + "..."


def _classifications(payload: ClassifyPayload, scores: list[list[float]]) -> list[Classification]:
    return [_classification(payload.info.labels or [], probabilities) for probabilities in scores]


def _classification(labels: list[str], probabilities: list[float]) -> Classification:
    scores = {label: probability for label, probability in zip(labels, probabilities)}
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return Classification(label=labels[best], score=probabilities[best], scores=scores)
