"""Prometheus metrics, in one registry per app so tests and several apps in one process stay apart."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BASE_LABEL = "__base__"
OTHER_LABEL = "__other__"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The service's metrics. Adapter labels are bounded: past ``max_adapter_labels`` names, '__other__'."""

    def __init__(self, max_adapter_labels: int = 100) -> None:
        self.registry = CollectorRegistry()
        self._max_adapter_labels = max_adapter_labels
        self._labelled: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.requests = Counter(
            "service_requests_total", "Requests by route, adapter and HTTP status.",
            ["route", "adapter", "status"], registry=r,
        )
        self.request_seconds = Histogram(
            "service_request_duration_seconds", "Whole request latency.", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "service_queue_wait_seconds", "Time from enqueue to the start of its batch.", ["task"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.inference_seconds = Histogram(
            "service_inference_seconds", "Model time of one batch.", ["task"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "service_batch_size", "Requests per model batch.", ["task"], buckets=_BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("service_queue_depth", "Requests waiting for a batch.", registry=r)
        self.adapters_loaded = Gauge("service_adapters_loaded", "Adapters resident in the model.", registry=r)
        self.adapter_load_seconds = Histogram(
            "service_adapter_load_seconds", "Time to load one adapter into the model.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.adapter_loads = Counter(
            "service_adapter_loads_total", "Adapter loads by outcome.", ["outcome"], registry=r,
        )
        self.resident_events = Counter(
            "service_adapter_cache_total", "Resident-set lookups and evictions.", ["event"], registry=r,
        )
        self.resident_bytes = Gauge("service_adapter_resident_bytes", "Bytes of resident adapters.", registry=r)
        self.generated_tokens = Counter(
            "service_generated_tokens_total", "Tokens generated, by adapter.", ["adapter"], registry=r,
        )
        self.adapter_failures = Counter(
            "service_adapter_failures_total",
            "Adapters that failed at run time (stage: load or forward) and were quarantined; 'forward' failures "
            "were isolated from the other rows of their batch.",
            ["adapter", "stage"], registry=r,
        )
        self.internal_errors = Counter(
            "service_internal_errors_total", "Unexpected errors answered with 500 (where: route or batch).",
            ["where"], registry=r,
        )
        self.base_weight_bytes = Gauge("service_base_weight_bytes", "Bytes of the base model's weights.", registry=r)
        self.kv_cache_budget_bytes = Gauge(
            "service_kv_cache_budget_bytes", "Bytes the owned forward's KV cache may hold (its admission budget).",
            registry=r)
        self.prefix_cache_bytes = Gauge(
            "service_prefix_cache_bytes", "Bytes of prefilled prompts' keys/values the prefix cache holds.",
            registry=r)
        self.prefix_cache_hit_tokens = Gauge(
            "service_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache instead of computed, since "
            "start.", registry=r)
        self.ready = Gauge("service_ready", "1 once the base model is loaded and the batcher runs.", registry=r)

    def adapter_label(self, adapter: str | None) -> str:
        """The label for an adapter name, keeping the label set bounded when thousands of adapters exist."""
        if adapter is None:
            return BASE_LABEL
        with self._lock:
            if adapter in self._labelled:
                return adapter
            if len(self._labelled) < self._max_adapter_labels:
                self._labelled.add(adapter)
                return adapter
        return OTHER_LABEL
