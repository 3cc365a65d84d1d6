"""OpenAI-compatible routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``): the shapes vLLM, TGI
and LoRAX users already call, on the same batcher, limits, metrics and API keys as ``/v1/generate``.

``model`` names an adapter, or ``base`` (or the base model's id) for no adapter. Several prompts and ``n`` choices
each run as their own row of the shared batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.api.disconnect import unless_client_leaves
from service.api.errors import openai_error, status_of
from service.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    OpenAIRequest,
    Usage,
)
from service.api.state import AppState, Inference, State
from service.domain import ChatMessage, Generation, GenerationParams, Task
from service.errors import AdapterNotFound, InvalidRequest, ServiceError
from service.inference import InferenceService
from service.store.store import RESERVED_NAME as BASE_NAME
from service.worker import GeneratePayload

logger = logging.getLogger(__name__)

_OWNER = "adapter-service"
_STARTED = int(time.time())
_ERRORS = {status: {"model": OpenAIError} for status in (400, 401, 404, 413, 429, 500, 503, 504)}
_STREAMED = {200: {"content": {"text/event-stream": {}},
                   "description": "With stream=true: OpenAI's chunks as server-sent events, then [DONE]."}}
router = APIRouter(prefix="/v1", tags=["openai"], responses=_ERRORS)


def _base_names(state: AppState) -> set[str]:
    return {BASE_NAME, state.settings.base_model_id}


def _adapter_of(model: str, state: AppState) -> str | None:
    """The adapter a ``model`` names; None for the base."""
    return None if model in _base_names(state) else model


# -- models ------------------------------------------------------------------------------------------------------


@router.get("/models", response_model=ModelList)
async def list_models(inference: Inference, state: State) -> ModelList:
    """The base (as ``base`` and under its id) and every adapter that can generate now (quarantined ones cannot)."""
    if not inference.runner.base.family.can_generate:
        return ModelList(data=[])
    base_id = state.settings.base_model_id
    infos = await asyncio.to_thread(inference.store.list)
    servable = [info for info in infos
                if info.task is Task.GENERATION and inference.quarantine.failure(info) is None
                and info.name not in _base_names(state)]
    adapters = await asyncio.to_thread(lambda: [_card(info.name, base_id, info.path) for info in servable])
    return ModelList(data=[_card(BASE_NAME, base_id), _card(base_id, base_id), *adapters])


@router.get("/models/{model:path}", response_model=ModelCard)
async def get_model(model: str, inference: Inference, state: State) -> ModelCard:
    base_id = state.settings.base_model_id
    if model in _base_names(state):
        return _card(model, base_id)
    info = await asyncio.to_thread(inference.store.get, model)
    if info.task is not Task.GENERATION:
        raise AdapterNotFound(f"{model!r} is a {info.task.value} adapter, not a model that generates")
    return await asyncio.to_thread(_card, model, base_id, info.path)


def _card(name: str, base_id: str, path: str | None = None) -> ModelCard:
    """The base's card (no path), or an adapter's, dated by its folder (a stat: call it off the event loop)."""
    if path is None:
        return ModelCard(id=name, created=_STARTED, owned_by=_OWNER, root=base_id, parent=None)
    try:
        created = int(os.stat(path).st_mtime)
    except OSError:
        created = _STARTED
    return ModelCard(id=name, created=created, owned_by=_OWNER, root=base_id, parent=base_id)


# -- generation --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Choices:
    """The rows one request runs: choice ``index`` of prompt ``index // n``, all prepared before any answer."""

    payloads: list[GeneratePayload]
    n: int

    def prompt_tokens(self) -> int:
        return sum(len(p.job.prompt_ids) for p in self.payloads[:: self.n])


def _finish_reason(generation: Generation) -> str:
    return "length" if generation.finish_reason == "length" else "stop"  # eos and stop strings are both "stop"


def _usage(choices: _Choices, generations: Sequence[Generation]) -> Usage:
    prompt = choices.prompt_tokens()
    completion = sum(g.generated_tokens for g in generations)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _prepare(
    inference: InferenceService, body: OpenAIRequest, adapter: str | None, prompts: Sequence[GenerationParams]
) -> _Choices:
    """Every row checked and tokenized before anything runs, so a bad request is refused whole, as an HTTP error."""
    body.refuse_unsupported()
    limit = inference.settings.max_new_tokens_limit
    if any(p.max_new_tokens is not None and p.max_new_tokens > limit for p in prompts):
        raise InvalidRequest(f"{body.max_tokens_field()} {prompts[0].max_new_tokens} exceeds the limit of {limit}",
                             body.max_tokens_field())
    if len(prompts) * body.choices_per_prompt() > inference.settings.max_inputs_per_request:
        raise InvalidRequest(f"{len(prompts)} prompts x n={body.choices_per_prompt()} choices is more than the "
                             f"{inference.settings.max_inputs_per_request} rows one request may ask for", "n")
    payloads = []
    for params in prompts:
        for choice in range(body.choices_per_prompt()):
            seed = None if body.seed is None else (body.seed + choice) % 2**64
            payloads.append(await inference.prepare_generation(adapter, replace(params, seed=seed)))
    return _Choices(payloads, body.choices_per_prompt())


def _sampling(body: OpenAIRequest, max_new_tokens: int | None) -> dict:
    return dict(max_new_tokens=max_new_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, stop=body.stop_strings())


@router.post("/completions", response_model=Completion, responses=_STREAMED)
async def completions(
    body: CompletionRequest, request: Request, inference: Inference, state: State
) -> Completion | StreamingResponse:
    request.state.adapter = adapter = _adapter_of(body.model, state)
    prompts = [GenerationParams(prompt=text, **_sampling(body, body.max_tokens)) for text in body.prompts()]
    choices = await _prepare(inference, body, adapter, prompts)
    identity = _Identity(f"cmpl-{uuid.uuid4().hex}", body.model)
    if body.stream:
        return _stream(inference, choices, identity, _include_usage(body), chat=False)
    generations = await unless_client_leaves(request, inference.generate(choices.payloads))
    return Completion(
        id=identity.id, created=identity.created, model=body.model, usage=_usage(choices, generations),
        choices=[CompletionChoice(index=i, text=g.text, finish_reason=_finish_reason(g))
                 for i, g in enumerate(generations)],
    )


@router.post("/chat/completions", response_model=ChatCompletion, responses=_STREAMED)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, inference: Inference, state: State
) -> ChatCompletion | StreamingResponse:
    request.state.adapter = adapter = _adapter_of(body.model, state)
    messages = tuple(ChatMessage(role="system" if m.role == "developer" else m.role, content=_text_of(m.content, i))
                     for i, m in enumerate(body.messages))
    max_tokens = body.max_completion_tokens or body.max_tokens
    prompts = [GenerationParams(prompt="", messages=messages, **_sampling(body, max_tokens))]
    choices = await _prepare(inference, body, adapter, prompts)
    identity = _Identity(f"chatcmpl-{uuid.uuid4().hex}", body.model)
    if body.stream:
        return _stream(inference, choices, identity, _include_usage(body), chat=True)
    generations = await unless_client_leaves(request, inference.generate(choices.payloads))
    return ChatCompletion(
        id=identity.id, created=identity.created, model=body.model, usage=_usage(choices, generations),
        choices=[ChatChoice(index=i, message=AssistantMessage(content=g.text), finish_reason=_finish_reason(g))
                 for i, g in enumerate(generations)],
    )


def _text_of(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"messages[{index}].content: only text parts are served, not {part.get('type')!r}",
                                 f"messages.{index}.content")
        texts.append(part["text"])
    return "".join(texts)


def _include_usage(body: OpenAIRequest) -> bool:
    return body.stream_options is not None and bool(body.stream_options.include_usage)


# -- streams -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chunks(
    rows: AsyncIterator[tuple[int, str | Generation]], choices: _Choices, include_usage: bool,
    chunk: Callable[[dict | None], dict], start: dict | None,
) -> AsyncIterator[dict]:
    """OpenAI's stream for any route: ``chunk(choice)`` wraps one choice's delta; ``start`` opens each choice."""
    generations: list[Generation] = []
    try:
        if start is not None:
            for index in range(len(choices.payloads)):
                yield chunk({"index": index, **start, "logprobs": None, "finish_reason": None})
        async for index, item in rows:
            if isinstance(item, Generation):
                generations.append(item)
                yield chunk({"index": index, **_empty_delta(start), "logprobs": None,
                             "finish_reason": _finish_reason(item)})
            elif item:
                yield chunk({"index": index, **_delta(start, item), "logprobs": None, "finish_reason": None})
        if include_usage:
            yield {**chunk(None), "choices": [], "usage": _usage(choices, generations).model_dump()}
    except ServiceError as error:
        yield _error_chunk(error)
    except Exception:  # the stream has started: the error can only be told as its last chunk
        logger.exception("unexpected error in an OpenAI stream")
        yield openai_error(500, "Internal", "internal error; it was logged. Retry, or report it")[1]


def _delta(start: dict | None, text: str) -> dict:
    return {"text": text} if start is None else {"delta": {"content": text}}


def _empty_delta(start: dict | None) -> dict:
    return {"text": ""} if start is None else {"delta": {}}


def _stream(inference: InferenceService, choices: _Choices, identity: _Identity, include_usage: bool,
            chat: bool) -> StreamingResponse:
    def chunk(choice: dict | None) -> dict:
        body = {"id": identity.id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": identity.created, "model": identity.model, "choices": [] if choice is None else [choice],
                "system_fingerprint": None}
        return body | ({"usage": None} if include_usage else {})

    start = {"delta": {"role": "assistant", "content": ""}} if chat else None
    return _sse(_chunks(inference.stream(choices.payloads), choices, include_usage, chunk, start))


def _error_chunk(error: ServiceError) -> dict:
    return openai_error(status_of(error), type(error).__name__, error.message, getattr(error, "param", None))[1]
