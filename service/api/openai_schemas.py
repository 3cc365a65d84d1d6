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
    # vLLM's extra sampling parameters, which tools written for vLLM send at their do-nothing values.
    "top_k": (lambda v: v is None or v in (0, -1), "top_k is not supported (only -1 or 0: no cut)"),
    "min_p": (_absent, "min_p is not supported (only 0)"),
    "repetition_penalty": (lambda v: v is None or v == 1, "repetition_penalty is not supported (only 1)"),
    "length_penalty": (lambda v: v is None or v == 1, "length_penalty is not supported (only 1)"),
    "use_beam_search": (_absent, "beam search is not supported"),
    "ignore_eos": (_absent, "ignore_eos is not supported"),
    "min_tokens": (_absent, "min_tokens is not supported (only 0)"),
    "stop_token_ids": (_absent, "stop_token_ids is not supported; use stop strings"),
    "include_stop_str_in_output": (_absent, "include_stop_str_in_output is not supported"),
    "skip_special_tokens": (lambda v: v is None or v is True, "only skip_special_tokens=true is served"),
    "spaces_between_special_tokens": (lambda v: v is None or v is True,
                                      "only spaces_between_special_tokens=true is served"),
    # In a message of the conversation: a previous answer sent back as the client returned it.
    "tool_calls": (_absent, "tool calls are not supported"),
    "refusal": (_absent, "a refusal in a message is not supported"),
    "annotations": (_absent, "message annotations are not supported"),
}

SEED_RANGE = Field(default=None, ge=-(2**63), le=2**64 - 1, description="Makes sampling repeatable.")


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="An adapter's name, or 'base' (or the base model's id) for no adapter.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="Default 1; 0 is greedy.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1,
                          description="Choices per prompt; with a seed, choice i samples with seed + i.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = SEED_RANGE
    user: str | None = Field(default=None, description="An end-user id; accepted, not used.")
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    # Declared only to be refused by name when they ask for something (see _REFUSED).
    logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    store: Any = None
    top_k: Any = None
    min_p: Any = None
    repetition_penalty: Any = None
    length_penalty: Any = None
    use_beam_search: Any = None
    ignore_eos: Any = None
    min_tokens: Any = None
    stop_token_ids: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    spaces_between_special_tokens: Any = None

    def refuse_unsupported(self) -> None:
        _refuse_set(self, "")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options: only allowed when stream is true", "stream_options")

    def choices_per_prompt(self) -> int:
        return 1 if self.n is None else self.n

    def max_tokens_field(self) -> str:
        return "max_tokens"

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)


def _refuse_set(model: BaseModel, where: str) -> None:
    """InvalidRequest naming the first parameter of ``model`` set to a value that asks for what is not served."""
    for name in model.model_fields_set:
        refused = _REFUSED.get(name)
        if refused is not None and not refused[0](getattr(model, name)):
            raise InvalidRequest(f"{where}{name}: {refused[1]}", f"{where}{name}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False


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


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = Field(default=None, description="A text, or text parts.")
    name: str | None = None
    # What a client sends back when it returns a previous answer as it got it (all empty for a plain answer).
    refusal: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None


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

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for index, message in enumerate(self.messages):
            _refuse_set(message, f"messages.{index}.")

    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


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
