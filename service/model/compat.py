"""Calls into transformers and PEFT that differ across the versions the service supports, decided in one place.

Each choice is made by what the installed library offers (its signatures), never by version numbers, so the current
API is used wherever it exists and the old one only where it does not.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def cache_keyword(module: torch.nn.Module) -> str:
    """The forward's keyword for the KV cache: ``cache`` from transformers 5.24 (``past_key_values`` is deprecated
    there and removed in 5.40), ``past_key_values`` before."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@contextmanager
def peft_internal_deprecations_silenced() -> Iterator[None]:
    """PEFT 0.21's ``PeftModel`` reads ``model.is_gradient_checkpointing``, deprecated in transformers 5.x. That
    access is PEFT's own, not the service's, and nothing here can change it: keep it out of the service's log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
