"""Classification and generation routes: translate HTTP to the inference service and back."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.api.disconnect import unless_client_leaves
from service.api.schemas import (
    ClassificationResult,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyTokensRequest,
    ClassifyTokensResponse,
    EntityResult,
    GenerateRequest,
    GenerateResponse,
    error_responses,
)
from service.api.state import Inference
from service.domain import Generation, GenerationParams
from service.errors import InvalidRequest, ServiceError

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["inference"], responses=error_responses(401, 404, 413, 422, 429, 500, 503, 504))


@router.post("/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request, inference: Inference) -> ClassifyResponse:
    request.state.adapter = body.adapter
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    if not texts:
        raise InvalidRequest("inputs is empty; give a text or a list of texts")
    results = await inference.classify(body.adapter, texts)
    return ClassifyResponse(
        adapter=body.adapter,
        results=[ClassificationResult(label=r.label, score=r.score, scores=r.scores) for r in results],
    )


@router.post("/classify_tokens", response_model=ClassifyTokensResponse)
async def classify_tokens(
    body: ClassifyTokensRequest, request: Request, inference: Inference
) -> ClassifyTokensResponse:
    """Entities (labelled character spans) per input, from a token classification adapter; tokens labelled O are
    left out."""
    request.state.adapter = body.adapter
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    if not texts:
        raise InvalidRequest("inputs is empty; give a text or a list of texts")
    results = await inference.classify_tokens(body.adapter, texts, body.aggregation)
    return ClassifyTokensResponse(adapter=body.adapter, results=[
        [EntityResult(label=e.label, score=e.score, start=e.start, end=e.end, text=e.text) for e in entities]
        for entities in results
    ])


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "With stream=true: server-sent events 'token' ({text}) then 'done' (the body)."}},
)
async def generate(
    body: GenerateRequest, request: Request, inference: Inference
) -> GenerateResponse | StreamingResponse:
    request.state.adapter = body.adapter
    params = GenerationParams(
        prompt=body.prompt, max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
        stop=tuple(s for s in body.stop if s), seed=body.seed, chat=body.chat,
    )
    payload = await inference.prepare_generation(body.adapter, params)
    if body.stream:
        return StreamingResponse(_events(inference.stream([payload]), body.adapter), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    (generation,) = await unless_client_leaves(request, inference.generate([payload]))
    return GenerateResponse(
        adapter=body.adapter, text=generation.text, generated_tokens=generation.generated_tokens,
        prompt_tokens=generation.prompt_tokens, finish_reason=generation.finish_reason,
    )


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _events(rows: AsyncIterator[tuple[int, str | Generation]], adapter: str | None) -> AsyncIterator[str]:
    """Server-sent events: one 'token' per piece of new text, then 'done' with the counts (or 'error')."""
    try:
        async for _, item in rows:
            if isinstance(item, Generation):
                yield _sse("done", GenerateResponse(
                    adapter=adapter, text=item.text, generated_tokens=item.generated_tokens,
                    prompt_tokens=item.prompt_tokens, finish_reason=item.finish_reason,
                ).model_dump())
            else:
                yield _sse("token", {"text": item})
    except ServiceError as error:
        yield _sse("error", {"error": type(error).__name__, "message": error.message})
    except Exception:  # the stream has started: the error can only be told as its last event
        logger.exception("unexpected error in a generation stream")
        yield _sse("error", {"error": "Internal", "message": "internal error; it was logged. Retry, or report it"})
