"""IA3: learned scaling vectors on some linear layers, applied per row and never merged into the shared weights.

PEFT scales the output of a target layer (keys, values) by ``ia3_l`` [out, 1], or the input of a feed-forward one
(``feedforward_modules``) by ``ia3_l`` [1, in]. Here every resident IA3 adapter owns a slot in per-layer stacks of
those vectors (slot 0 all ones: base rows and rows of other kinds), and hooks on the base layers gather each row's
vector and multiply, so a batch can mix IA3 rows with anything else.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from service.errors import AdapterInvalid
from service.model.loading import BaseModel
from service.model.slots import Slots

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.ia3_l(?:\.[^.]+)?$")


def is_feedforward(module: str, feedforward_modules: object) -> bool:
    """PEFT's rule: a regex must match the whole module name, a list names module suffixes."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module) is not None
    return any(module == m or module.endswith(f".{m}") for m in feedforward_modules or [])


Vectors = dict[str, tuple[torch.Tensor, bool]]  # module path -> (scaling vector, scales the input)


def read_vectors(config: dict, weights: dict[str, torch.Tensor], base: BaseModel, name: str) -> Vectors:
    """The adapter's scaling vectors by base module path, checked against the base's layers."""
    vectors: Vectors = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterInvalid(f"{name}: unexpected tensor {key} in an IA3 adapter")
        module_path = match["module"]
        layer = base.linear_layer(module_path, name, "IA3")
        feedforward = is_feedforward(module_path, config.get("feedforward_modules"))
        expected = (1, layer.in_features) if feedforward else (layer.out_features, 1)
        if tuple(tensor.shape) != expected:
            raise AdapterInvalid(
                f"{name}: tensor {key} has shape {tuple(tensor.shape)}; {module_path} needs {expected}")
        vectors[module_path] = (tensor.flatten().to(device=base.device, dtype=base.dtype), feedforward)
    if not vectors:
        raise AdapterInvalid(f"{name}: the weights hold no IA3 vectors (ia3_l)")
    return vectors


class _ScaleStack:
    """One layer's vectors [slots, features]; scales its input (feed-forward) or its output."""

    def __init__(self, features: int, capacity: int, like: torch.Tensor, scales_input: bool) -> None:
        self.scales = like.new_ones((capacity, features))
        self.scales_input = scales_input
        self.rows: torch.Tensor | None = None

    def grow(self, capacity: int) -> None:
        if capacity > self.scales.shape[0]:
            grown = self.scales.new_ones((capacity, self.scales.shape[1]))
            grown[: self.scales.shape[0]] = self.scales
            self.scales = grown

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        assert self.rows is not None
        rows = self.scales.index_select(0, self.rows)
        return x * rows.view(rows.shape[0], *([1] * (x.dim() - 2)), rows.shape[1]).to(x.dtype)

    def pre_hook(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if self.rows is None:
            return None
        return (self._scale(args[0]), *args[1:])

    def hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.rows is None:
            return None
        return self._scale(output)


class IA3Pool:
    """The resident IA3 adapters' vectors and the routing of a batch's rows through them."""

    def __init__(self, base: BaseModel) -> None:
        self._base = base
        self._slots = Slots()
        self._stacks: dict[tuple[str, bool], _ScaleStack] = {}
        self._hooks: list = []
        self._paths_of: dict[str, set[str]] = {}  # adapter -> module paths it scales
        self._layout = 0  # see layout

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def add(self, name: str, vectors: Vectors) -> None:
        self._slots.claim(name, self._grow, lambda slot: self._write(slot, vectors), self._clear)
        self._paths_of[name] = set(vectors)

    def _grow(self, capacity: int) -> None:
        self._layout += 1
        for stack in self._stacks.values():
            stack.grow(capacity)

    def _write(self, slot: int, vectors: Vectors) -> None:
        for module_path, (vector, scales_input) in vectors.items():
            stack = self._stacks.get((module_path, scales_input))
            if stack is None:
                module = self._base.model.get_submodule(module_path)
                layer = getattr(module, "base_layer", module)  # stable when a LoRA host wraps the module later
                stack = _ScaleStack(vector.shape[0], self._slots.capacity, vector, scales_input)
                self._stacks[(module_path, scales_input)] = stack
                self._layout += 1
                self._hooks.append(layer.register_forward_pre_hook(stack.pre_hook) if scales_input
                                   else layer.register_forward_hook(stack.hook))
            stack.scales[slot] = vector

    def _clear(self, slot: int) -> None:
        for stack in self._stacks.values():
            if slot < stack.scales.shape[0]:
                stack.scales[slot] = 1.0

    def remove(self, name: str) -> None:
        self._paths_of.pop(name, None)
        self._slots.release(name, self._clear)

    @property
    def layout(self) -> int:
        """Bumped whenever a stack is added or grows, as ``GatheredLora.layout``."""
        return self._layout

    def paths_of(self, name: str) -> set[str]:
        return self._paths_of.get(name, set())

    def scales(self, module_path: str, scales_input: bool) -> torch.Tensor | None:
        """The [slots, features] vectors scaling a module's input (or its output), if any adapter has them."""
        stack = self._stacks.get((module_path, scales_input))
        return None if stack is None else stack.scales

    def slots(self, names: Sequence[str | None]) -> list[int]:
        return self._slots.rows(names)

    @contextmanager
    def route(self, row_names: Sequence[str | None]) -> Iterator[None]:
        """Within this context each row is scaled by its own adapter's vectors (None: unscaled)."""
        if not self._stacks or all(name is None for name in row_names):
            yield
            return
        device = next(iter(self._stacks.values())).scales.device
        rows = torch.tensor(self._slots.rows(row_names), device=device)
        for stack in self._stacks.values():
            stack.rows = rows
        try:
            yield
        finally:
            for stack in self._stacks.values():
                stack.rows = None
