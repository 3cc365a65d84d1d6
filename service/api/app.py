"""The app factory: a lifespan that loads the base in the background, and the routes, errors and metrics."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from service.api.auth import require_api_key
from service.api.errors import install_error_handlers
from service.api.middleware import ServiceMiddleware
from service.api.routes import adapters, console, health, inference, openai
from service.api.state import AppState
from service.environment import warn_if_untested
from service.inference import InferenceService
from service.metrics import Metrics
from service.model.loading import load_base_model
from service.model.owned.slot_cache import CacheLimits
from service.model.runner import ModelRunner
from service.model.threads import start_model_thread
from service.model.validation import BaseShapes
from service.settings import Settings
from service.store.store import AdapterStore

logger = logging.getLogger(__name__)


def cache_limits(settings: Settings) -> CacheLimits:
    return CacheLimits(
        slots=settings.max_batch_size, cache_bytes=settings.kv_cache_bytes,
        row_tokens=settings.max_input_tokens + settings.max_virtual_tokens + settings.max_new_tokens_limit,
        max_batch_tokens=settings.max_batch_tokens, cpu_kernels=settings.cpu_kernels == "auto",
        kernel_matmul=settings.cpu_matmul == "auto", decode_graphs=settings.decode_graphs,
        prefix_cache_bytes=settings.prefix_cache_bytes,
    )


async def _boot(state: AppState) -> None:
    """Load the base off the event loop so /health answers and /ready says 503 while it loads."""
    settings = state.settings
    loop = asyncio.get_running_loop()
    try:
        base = await loop.run_in_executor(state.executor, load_base_model, settings)
        store = AdapterStore(settings.adapters_dir, base.names_base if settings.check_adapter_base else None)
        store.sweep()
        runner = ModelRunner(base, settings.lora_kernel, settings.forward, cache_limits(settings))
        state.shapes = BaseShapes(base)
        record_memory(state.metrics, runner)
        service = InferenceService(settings, store, runner, state.executor, state.metrics)
        _freeze_heap()  # before start() preloads adapters: a deleted adapter's objects must stay collectable
        await service.start()
        state.store, state.inference = store, service
        state.phase, state.message = "ready", f"base model {base.path} on {base.device} ({base.dtype})"
        state.metrics.ready.set(1)
        logger.info("ready: %s", state.message)
    except Exception as error:
        logger.exception("start-up failed")
        state.phase, state.message = "failed", str(error)


def _freeze_heap() -> None:
    """Move everything alive once the base is loaded (the base, its tokenizer, torch's and transformers' modules:
    ~400,000 objects) out of the cyclic collector's reach. Otherwise each full collection walks them all, about
    250 ms with the GIL held, and one lands every several seconds under load: a stall of every stream and a TTFT
    outlier."""
    gc.collect()
    gc.freeze()


def record_memory(metrics: Metrics, runner: ModelRunner) -> None:
    """The base's weight bytes (each stored tensor counted once) and the owned KV cache's budget."""
    storages: dict[int, int] = {}
    for tensor in list(runner.base.model.parameters()) + list(runner.base.model.buffers()):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    owned = runner.owned
    if owned is not None:
        for layer in owned.forward.layers:
            for matmul in (layer.qkv, layer.o, layer.gate_up, layer.down):
                if matmul.packed:  # oneDNN's opaque layout: no storage to share, counted by its elements
                    storages[id(matmul.weight)] = matmul.weight.numel() * matmul.weight.element_size()
        metrics.kv_cache_budget_bytes.set(owned.cache.nbytes_budget())
        prefixes = owned.prefixes  # read at each scrape (a length and a count: no lock needed)
        metrics.prefix_cache_bytes.set_function(lambda: prefixes.nbytes)
        metrics.prefix_cache_hit_tokens.set_function(lambda: prefixes.hit_tokens)
    metrics.base_weight_bytes.set(sum(storages.values()))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warn_if_untested()
        state = AppState(
            settings=settings,
            metrics=Metrics(settings.metrics_max_adapter_labels),
            executor=start_model_thread(settings.torch_threads),
        )
        app.state.service = state
        boot = asyncio.create_task(_boot(state))
        try:
            yield
        finally:
            state.phase = "stopping"
            state.metrics.ready.set(0)
            boot.cancel()
            if state.inference is not None:
                await state.inference.stop()
            state.executor.shutdown(wait=True, cancel_futures=True)
            gc.unfreeze()  # what this app held can be collected again (an app built again in the same process)

    app = FastAPI(
        title="Adapter service",
        version="0.1.0",
        description="One frozen base model serving many PEFT adapters (LoRA, prefix tuning) per request.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(console.router)
    app.include_router(inference.router, dependencies=[Depends(require_api_key)])
    app.include_router(adapters.router, dependencies=[Depends(require_api_key)])
    app.include_router(openai.router, dependencies=[Depends(require_api_key)])

    app.add_middleware(ServiceMiddleware, settings=settings)
    return app
