"""Bodies of the OpenAI-compatible routes, in the shapes of OpenAI's API (what the official client sends and parses).

Parameters this server cannot honour are declared so that a request setting one is refused by name (400), never
silently ignored; a value that asks for nothing (``logprobs: null``, ``echo: false``, ``presence_penalty: 0``) is
accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.errors import InvalidRequest

FinishReason = Literal["stop", "length"]


def _absent(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {} or value == ""


# name -> (whether the value asks for nothing, what to say when it does)
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logprobs": (lambda v: v is None or v is False, "log probabilities are not returned by this server"),
    "top_logprobs": (_absent, "log probabilities are not returned by this server"),
    "echo": (_absent, "echo is not supported; the prompt is not repeated in the answer"),
    "suffix": (_absent, "suffix (insertion) is not supported"),
    "best_of": (lambda v: v is None or v == 1, "best_of is not supported; use n for several choices"),
    "logit_bias": (_absent, "logit_bias is not supported"),
    "presence_penalty": (_absent, "presence_penalty is not supported (only 0)"),
    "frequency_penalty": (_absent, "frequency_penalty is not supported (only 0)"),
    "tools": (_absent, "tools (function calling) are not supported"),
    "functions": (_absent, "functions (function calling) are not supported"),
    "tool_choice": (lambda v: v is None or v == "none", "tool_choice is not supported: this server has no tools"),
    "function_call": (lambda v: v is None or v == "none", "function_call is not supported"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "response_format other than text is not "
                                                                        "supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality is served"),
    "audio": (_absent, "audio output is not supported"),
    "prediction": (_absent, "predicted outputs are not supported"),
    "reasoning_effort": (_absent, "reasoning_effort is not supported"),
    "web_search_options": (_absent, "web search is not supported"),
    "store": (_absent, "store is not supported: completions are not stored"),
}


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="An adapter's name, or 'base' (or the base model's id) for no adapter.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="Default 1; 0 is greedy.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, description="Choices per prompt; with a seed, choice i samples with seed + i.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = Field(default=None, description="An end-user id; accepted, not used.")
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    # Declared only to be refused by name when they ask for something (see _REFUSED).
    logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    store: Any = None

    def refuse_unsupported(self) -> None:
        for name in self.model_fields_set:
            refused = _REFUSED.get(name)
            if refused is not None and not refused[0](getattr(self, name)):
                raise InvalidRequest(f"{name}: {refused[1]}", name)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text or a list of texts (one completion each; token ids are not accepted).")
    max_tokens: int | None = Field(default=16, ge=1, description="Tokens to generate per choice (OpenAI's default 16).")
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidRequest("prompt must be a text or a non-empty list of texts (token ids are not accepted)",
                                 "prompt")
        if any(not p for p in prompts):
            raise InvalidRequest("prompt must not be empty", "prompt")
        return prompts


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Default: as many as the base's positions leave.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="The newer name of max_tokens.")
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: bool | None = Field(default=None, description="Accepted; there are no tools to call.")
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(description="The base model's id.")
    parent: str | None = Field(description="The base model's id for an adapter; null for the base.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


OpenAIRequest.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
