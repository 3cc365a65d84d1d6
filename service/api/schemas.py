"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.domain import AdapterInfo


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str | None = Field(default=None, description="A classification adapter's name.")
    inputs: str | list[str] = Field(description="One text, or a list of texts classified in order.")


class ClassificationResult(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    adapter: str | None
    results: list[ClassificationResult]


class ClassifyTokensRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(description="A token classification adapter's name.")
    inputs: str | list[str] = Field(description="One text, or a list of texts, each labelled token by token.")
    aggregation: Literal["simple", "none"] = Field(
        default="simple",
        description="'simple': neighbouring tokens of one entity merged (B-/I- dropped, mean score), as the "
                    "transformers pipeline's aggregation_strategy='simple'; 'none': one item per token.")


class EntityResult(BaseModel):
    label: str
    score: float
    start: int = Field(description="Character offset of the span in its input.")
    end: int
    text: str = Field(description="input[start:end]")


class ClassifyTokensResponse(BaseModel):
    adapter: str
    results: list[list[EntityResult]]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str | None = Field(default=None, description="A generation adapter's name; null for the base model.")
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0, description="0 is greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, description="Generation ends before the first of these strings.")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="Makes sampling repeatable.")
    chat: bool = Field(default=False, description="Wrap the prompt in the base model's chat template as a user turn.")
    stream: bool = Field(default=False, description="Answer with server-sent events, one per piece of new text.")


class GenerateResponse(BaseModel):
    adapter: str | None
    text: str
    generated_tokens: int
    prompt_tokens: int
    finish_reason: Literal["length", "stop", "eos"]


class AdapterEntry(BaseModel):
    name: str
    type: Literal["lora", "prefix_tuning", "prompt_tuning", "p_tuning", "ia3", "adalora"]
    task: Literal["classification", "generation", "token_classification"]
    rank: int | None
    num_virtual_tokens: int | None
    labels: list[str] | None
    size_bytes: int
    sha256: str
    version: str
    base_model_name_or_path: str | None
    target_modules: list[str] | None
    loaded: bool
    state: Literal["ready", "failed"] = Field(
        description="'failed': it failed at run time and is refused until replaced (PUT) or deleted")
    error: str | None = Field(default=None, description="Why it failed, when state is 'failed'.")
    requests: int = Field(description="Requests it answered successfully since the service started or since it "
                                      "was last deleted (a new version keeps the count).")

    @classmethod
    def of(cls, info: AdapterInfo, loaded: bool, failure: str | None = None, requests: int = 0) -> AdapterEntry:
        return cls(
            name=info.name, type=info.kind.value, task=info.task.value, rank=info.rank,
            num_virtual_tokens=info.num_virtual_tokens, labels=info.labels, size_bytes=info.size_bytes,
            sha256=info.sha256, version=info.version, base_model_name_or_path=info.base_model_name_or_path,
            target_modules=info.target_modules, loaded=loaded and failure is None,
            state="failed" if failure is not None else "ready", error=failure, requests=requests,
        )


class AdapterList(BaseModel):
    adapters: list[AdapterEntry]


class ErrorBody(BaseModel):
    error: str
    message: str


_ERROR_MEANINGS = {
    401: "Missing or wrong bearer token.",
    403: "Admin routes are disabled (no admin token configured).",
    404: "No adapter of that name.",
    409: "An adapter of that name exists.",
    413: "Body or archive too large.",
    422: "Malformed or unservable request, or an adapter quarantined after failing at run time (AdapterFailed); "
         "the message says what to change.",
    429: "Queue full; retry after the Retry-After seconds.",
    503: "Not ready, or shutting down.",
    500: "Unexpected internal error (logged with its traceback); the body is JSON like every error.",
    504: "The request outlived its deadline.",
}


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI entries for the errors a route can answer with, all shaped as ErrorBody."""
    return {code: {"model": ErrorBody, "description": _ERROR_MEANINGS[code]} for code in codes}
