"""What the app holds between requests, built by the lifespan and read by routes through dependencies."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReady
from service.inference import InferenceService
from service.metrics import Metrics
from service.model.validation import BaseShapes
from service.settings import Settings
from service.store.store import AdapterStore


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    executor: ThreadPoolExecutor
    phase: str = "loading"  # loading -> ready -> stopping, or failed
    message: str = ""
    inference: InferenceService | None = None
    store: AdapterStore | None = None
    shapes: BaseShapes | None = None

    @property
    def ready(self) -> bool:
        return self.phase == "ready" and self.inference is not None and self.inference.batcher.running


def app_state(request: Request) -> AppState:
    return request.app.state.service


async def ready_service(request: Request) -> InferenceService:
    state = app_state(request)
    if not state.ready:
        raise NotReady(f"the service is {state.phase}; retry when GET /ready answers 200")
    return state.inference


async def _app_state(request: Request) -> AppState:
    return app_state(request)  # async: see auth.py


State = Annotated[AppState, Depends(_app_state)]
Inference = Annotated[InferenceService, Depends(ready_service)]
