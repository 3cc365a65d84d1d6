"""Plain data shared by every layer: adapter descriptions, requests and results. No torch, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class AdapterKind(str, Enum):
    LORA = "lora"
    PREFIX_TUNING = "prefix_tuning"
    PROMPT_TUNING = "prompt_tuning"
    P_TUNING = "p_tuning"
    IA3 = "ia3"
    ADALORA = "adalora"

    @property
    def has_virtual_tokens(self) -> bool:
        return self in (AdapterKind.PREFIX_TUNING, AdapterKind.PROMPT_TUNING, AdapterKind.P_TUNING)


class Task(str, Enum):
    CLASSIFICATION = "classification"
    GENERATION = "generation"
    TOKEN_CLASSIFICATION = "token_classification"

    @property
    def route(self) -> str:
        return {"classification": "/v1/classify", "generation": "/v1/generate",
                "token_classification": "/v1/classify_tokens"}[self.value]


@dataclass(frozen=True)
class AdapterInfo:
    """What the store knows of one adapter without loading it into the model."""

    name: str
    kind: AdapterKind
    task: Task
    path: str
    rank: int | None
    num_virtual_tokens: int | None
    labels: list[str] | None
    size_bytes: int
    sha256: str
    base_model_name_or_path: str | None
    target_modules: list[str] | None = None

    @property
    def version(self) -> str:
        """Content version: the short content hash, so a replaced adapter never matches a stale cache entry."""
        return self.sha256[:16]


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation, rendered with the base's chat template."""

    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class GenerationParams:
    """One generation request, already validated. With ``messages`` the prompt is the conversation rendered by the
    base's chat template (``prompt`` unused); with ``chat`` it is ``prompt`` as one user turn."""

    prompt: str
    max_new_tokens: int | None = 32  # None: as many as the base's positions leave after the prompt, up to the limit
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    chat: bool = False
    messages: tuple[ChatMessage, ...] = ()


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Entity:
    """A labelled span of an input: ``text == input[start:end]``."""

    label: str
    score: float
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Generation:
    text: str
    generated_tokens: int
    prompt_tokens: int
    finish_reason: str  # "length" | "stop" | "eos"
