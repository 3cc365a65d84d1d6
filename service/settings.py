"""Every setting of the service, typed and documented in one place (env prefix ``SERVICE_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    """Service settings, read from ``SERVICE_*`` environment variables (and the CLI)."""

    model_config = SettingsConfigDict(env_prefix="SERVICE_", extra="ignore")

    base_model: str | None = Field(
        default=None,
        description="Local HF model folder or hub id. Unset: the embedded SmolLM2-135M-Instruct.",
    )
    base_model_aliases: list[str] = Field(
        default_factory=list,
        description="Other names (hub ids) adapters may give as base_model_name_or_path for this base.",
    )
    check_adapter_base: bool = Field(
        default=True, description="Refuse adapters whose base_model_name_or_path names another base."
    )
    allow_hub_downloads: bool = Field(
        default=False, description="Let SERVICE_BASE_MODEL be a hub id fetched at start; adapters never are."
    )
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="'auto': bfloat16 on GPU; on CPU whichever a matmul measured at start runs faster in.",
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "adapter-service",
        description="Where the embedded model is converted once to a plain HF folder.",
    )
    adapters_dir: Path = Field(default=Path("adapters_store"), description="The on-disk adapter store.")
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token for admin routes. Unset: admin routes are refused."
    )
    batching: Literal["mixed", "grouped"] = Field(
        default="mixed",
        description="'mixed': rows of any adapters and kinds share one forward pass; 'grouped': one batch per adapter.",
    )
    lora_kernel: Literal["gathered", "peft"] = Field(
        default="gathered",
        description="Mixed LoRA batches: 'gathered' (stacked weights, batched matmuls) or 'peft' (PEFT's loop).",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Keys for inference and listing routes (Bearer). Empty: those routes are open.",
    )
    max_batch_size: int = Field(default=64, ge=1, le=1024, description="Requests (rows) per model batch.")
    forward: Literal["auto", "owned", "transformers"] = Field(
        default="auto",
        description="Generation forward: 'owned' (the service's own Llama-family code and slot KV cache), "
        "'transformers' (the library's forward, every architecture), 'auto' (owned where the architecture has it).",
    )
    kv_cache_bytes: int = Field(
        default=2 * 1024**3, ge=1024**2,
        description="Owned forward: bytes of keys/values for all running rows; a request waits until it fits.",
    )
    prefix_cache_bytes: int = Field(
        default=256 * 1024**2, ge=0,
        description="Owned forward: bytes of keys/values of prefilled prompts kept so that a prompt starting the "
                    "same way (same adapter version, same first tokens, in blocks of 16) skips their prefill; "
                    "least recently used go first; 0 turns it off.",
    )
    max_batch_tokens: int = Field(
        default=2048, ge=1,
        description="Owned forward: tokens in one step (a token per running row, then prompt chunks).",
    )
    cpu_kernels: Literal["auto", "off"] = Field(
        default="auto",
        description="Owned forward on a CPU: 'auto' builds and uses the service's fused C++ kernels (norms, rotary, "
        "activation, decode attention) where a compiler is present, else torch ops; 'off': torch ops only.",
    )
    cpu_matmul: Literal["auto", "onednn"] = Field(
        default="auto",
        description="Owned forward's bf16 matmuls on a CPU: 'auto' runs the service's packed kernel where the CPU "
        "has AMX or AVX-512 BF16 (and cpu_kernels is 'auto') unless oneDNN times clearly faster at start, else "
        "oneDNN's prepacked matmul; 'onednn': oneDNN's always.",
    )
    decode_graphs: Literal["off", "on"] = Field(
        default="off",
        description="Owned forward's decode steps: 'on' runs them in static shapes by batch-size bucket, captured "
        "and replayed as CUDA graphs on a GPU (unverified: no GPU was available to build this on), eagerly on a "
        "CPU (where it only slows them: for tests).",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, le=1024,
        description="Intra-op threads of the model thread (the only thread that runs torch with several); "
        "unset: torch's choice, the machine's physical cores.",
    )
    max_wait_ms: float = Field(
        default=5.0, ge=0.0, le=10_000.0,
        description="How long the batcher waits to fill a batch; an idle one waits on while generation requests "
        "keep arriving, up to 8x this (and at most 0.1 s more).",
    )
    max_queue_size: int = Field(default=1024, ge=1, description="Queued requests before 429 + Retry-After.")
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="Deadline per inference request (504 past it; its queued work is dropped)."
    )
    shutdown_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long running requests may take to finish."
    )
    max_inputs_per_request: int = Field(default=64, ge=1, description="Texts in one classify request.")
    max_input_tokens: int = Field(default=2048, ge=1, description="Tokens in one input or prompt.")
    max_new_tokens_limit: int = Field(default=1024, ge=1, description="Largest max_new_tokens accepted.")
    max_stop_strings: int = Field(default=8, ge=0, description="Stop strings per request (256 chars each).")
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1, description="Cap on an upload's size (413).")
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1, description="Cap on other request bodies (413).")
    max_unpacked_bytes: int = Field(default=2 * 1024**3, ge=1, description="Cap on an upload's unpacked size.")
    metrics_max_adapter_labels: int = Field(
        default=100, ge=0, description="Adapters named in metric labels; the rest count as '__other__'."
    )
    max_loaded_adapters: int = Field(default=64, ge=1, description="Adapters resident at once; LRU evicted.")
    max_resident_bytes: int = Field(
        default=4 * 1024**3, ge=1, description="Bytes of resident adapters; LRU evicted past it."
    )
    max_lora_rank: int = Field(default=256, ge=1, description="Largest LoRA rank (and rank_pattern value) accepted.")
    max_adapter_tensors: int = Field(
        default=10_000, ge=1, description="Tensors an uploaded safetensors header may list."
    )
    max_virtual_tokens: int = Field(
        default=256, ge=1, description="Largest num_virtual_tokens accepted (prefix, prompt and P-tuning).")
    preload_adapters: list[str] = Field(default_factory=list, description="Adapters loaded at start.")

    @field_validator("adapters_dir", "cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def base_model_id(self) -> str:
        return self.base_model or EMBEDDED_MODEL_ID
