"""Classification and generation routes: translate HTTP to the inference service and back."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.schemas import (
    ClassificationResult, ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse,
)
from service.api.state import Inference, State
from service.domain import GenerationParams
from service.errors import InvalidRequest

router = APIRouter(prefix="/v1", tags=["inference"])


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


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, inference: Inference, state: State) -> GenerateResponse:
    request.state.adapter = body.adapter
    settings = state.settings
    if body.max_new_tokens > settings.max_new_tokens_limit:
        raise InvalidRequest(f"max_new_tokens {body.max_new_tokens} exceeds the limit of {settings.max_new_tokens_limit}")
    if len(body.stop) > settings.max_stop_strings or any(len(s) > 256 for s in body.stop):
        raise InvalidRequest(f"stop takes at most {settings.max_stop_strings} strings of at most 256 characters")
    params = GenerationParams(
        prompt=body.prompt, max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
        stop=tuple(s for s in body.stop if s), seed=body.seed, chat=body.chat,
    )
    generation = await inference.generate(body.adapter, params)
    return GenerateResponse(
        adapter=body.adapter, text=generation.text, generated_tokens=generation.generated_tokens,
        prompt_tokens=generation.prompt_tokens, finish_reason=generation.finish_reason,
    )
