"""The on-disk adapter store: ``<root>/<name>/`` holds what PEFT's ``save_pretrained`` writes.

Reads metadata without loading tensors (the safetensors header is plain JSON), and publishes new adapters by
renaming a fully written folder into place, so a reader sees the old state or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from service.domain import AdapterInfo, AdapterKind, Task
from service.errors import AdapterExists, AdapterInvalid, AdapterNotFound
from service.store.safetensors_header import TensorSpec, read_header

RESERVED_NAME = "base"  # the base model on the OpenAI routes and in the CLI
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LABELS_FILE = "labels.json"
# A tokenizer saved next to the adapter (tokenizer.save_pretrained into the same folder, as trainers do): kept with
# it, checked against the base's at upload, and part of its content version.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.pkl")
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
_HEAD_SUFFIXES = ("score.weight", "classifier.weight", "classifier.out_proj.weight")  # the labels' rows
_KINDS = {kind.name: kind for kind in AdapterKind}
_TASKS = {"SEQ_CLS": Task.CLASSIFICATION, "CAUSAL_LM": Task.GENERATION, "TOKEN_CLS": Task.TOKEN_CLASSIFICATION}


def valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.fullmatch(name)) and name not in (".", "..")


def check_name(name: str) -> None:
    """Refuse a name an adapter cannot be published under (asked by uploads and by the client before sending)."""
    if not valid_name(name):
        raise AdapterInvalid(f"adapter name {name!r} must match {NAME_PATTERN.pattern}")
    if name.lower() == RESERVED_NAME:
        raise AdapterInvalid(f"adapter name {name!r} is reserved: it names the base model on the OpenAI routes and "
                             "in the CLI; choose another name")


def head_spec(tensors: dict[str, TensorSpec]) -> TensorSpec | None:
    """The classification head's weight, saved through modules_to_save, if the adapter has one."""
    for key, spec in tensors.items():
        if key.endswith(_HEAD_SUFFIXES) and "lora_" not in key:
            return spec
    return None


def describe_folder(name: str, path: Path, accepts_base: Callable[[str | None], bool] | None = None) -> AdapterInfo:
    """Read and check an adapter folder's metadata; every refusal names the problem and what to change."""
    config_path = path / CONFIG_FILE
    weights_path = path / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterInvalid(f"{name}: {CONFIG_FILE} is missing (save the adapter with save_pretrained)")
    if not weights_path.is_file():
        pickled = [p for p in PICKLE_WEIGHTS if (path / p).exists()]
        hint = (
            f"; found {pickled[0]}, a pickle file, which is never loaded: re-save with "
            "save_pretrained(dir, safe_serialization=True)" if pickled else ""
        )
        raise AdapterInvalid(f"{name}: {WEIGHTS_FILE} is missing{hint}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise AdapterInvalid(f"{name}: {CONFIG_FILE} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{name}: {CONFIG_FILE} must hold a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    kind = _KINDS.get(peft_type)
    if kind is None:
        raise AdapterInvalid(
            f"{name}: peft_type {config.get('peft_type')!r} is not served; served: {', '.join(_KINDS)}")
    tensors = read_header(weights_path, name)
    head = head_spec(tensors)
    task_type = config.get("task_type")
    if task_type is None:
        task = Task.CLASSIFICATION if head is not None else Task.GENERATION
    elif str(task_type).upper() in _TASKS:
        task = _TASKS[str(task_type).upper()]
    else:
        raise AdapterInvalid(f"{name}: task_type {task_type!r} is not served; served: {', '.join(_TASKS)}")
    if task is not Task.GENERATION and head is None:
        raise AdapterInvalid(
            f"{name}: a {task_type} adapter needs its head in the weights (PEFT saves it through modules_to_save: "
            "'score' on decoders, 'classifier' on BERT/RoBERTa)"
        )
    base_name = config.get("base_model_name_or_path")
    if accepts_base is not None and not accepts_base(base_name):
        raise AdapterInvalid(
            f"{name}: made for base model {base_name!r}, which is not the base this service runs; retrain on the "
            "served base, or set SERVICE_BASE_MODEL_ALIASES / SERVICE_CHECK_ADAPTER_BASE=false if it is the same model"
        )
    labels = read_labels(name, path, head)
    files = [p for p in (config_path, weights_path, path / LABELS_FILE, *(path / f for f in TOKENIZER_FILES))
             if p.is_file()]
    target_modules = config.get("target_modules")
    return AdapterInfo(
        name=name,
        kind=kind,
        task=task,
        path=str(path),
        rank=_rank(kind, config),
        num_virtual_tokens=int(config.get("num_virtual_tokens") or 0) if kind.has_virtual_tokens else None,
        labels=labels,
        size_bytes=sum(p.stat().st_size for p in files),
        sha256=_content_hash(files),
        base_model_name_or_path=base_name,
        target_modules=sorted(target_modules) if isinstance(target_modules, list) else None,
    )


def read_labels(name: str, path: Path, head: TensorSpec | None) -> list[str] | None:
    if head is None:
        return None
    num_labels = head.shape[0] if head.shape else 0
    labels_path = path / LABELS_FILE
    if not labels_path.is_file():
        return [f"LABEL_{i}" for i in range(num_labels)]
    try:
        labels = json.loads(labels_path.read_text())
    except (OSError, ValueError) as error:
        raise AdapterInvalid(f"{name}: {LABELS_FILE} is not valid JSON: {error}") from error
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise AdapterInvalid(f"{name}: {LABELS_FILE} must be a JSON list of label names in index order")
    if len(labels) != num_labels:
        raise AdapterInvalid(f"{name}: {LABELS_FILE} names {len(labels)} labels but the head has {num_labels} outputs")
    if len(set(labels)) != len(labels):
        raise AdapterInvalid(f"{name}: {LABELS_FILE} repeats a label name")
    return labels


def _content_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class AdapterStore:
    """Adapters on disk by name. Metadata is cached per file signature, so a replaced file is re-read."""

    def __init__(self, root: Path, accepts_base: Callable[[str | None], bool] | None = None) -> None:
        self.root = root
        self.accepts_base = accepts_base
        self._cache: dict[str, tuple[tuple, AdapterInfo]] = {}
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        root.mkdir(parents=True, exist_ok=True)

    def _folder(self, name: str) -> Path:
        if not valid_name(name):
            raise AdapterNotFound(f"no adapter named {name!r}")
        return self.root / name

    def names(self) -> list[str]:
        return sorted(
            entry.name for entry in self.root.iterdir()
            if entry.is_dir() and not entry.is_symlink() and valid_name(entry.name)
        )

    def has(self, name: str) -> bool:
        """Whether an adapter of that name is in the store now (one stat; no parsing)."""
        return valid_name(name) and (self.root / name).is_dir()

    def peek(self, name: str) -> AdapterInfo | None:
        """``get``'s answer if it is at hand: already described and its files unchanged (a few stats, no reading
        or parsing), else None. Cheap enough for the event loop, where a thread hop per request cost more than
        the stats (a wave of 64 requests for adapters reached the batcher ~0.1 s later than one for the base)."""
        if not valid_name(name) or name not in self._cache:  # never described: no stats
            return None
        try:
            return self._described(name, _signature(self.root / name))
        except OSError:
            return None

    def get(self, name: str) -> AdapterInfo:
        folder = self._folder(name)
        if not folder.is_dir():
            raise AdapterNotFound(f"no adapter named {name!r}")
        signature = _signature(folder)
        cached = self._described(name, signature)
        if cached is not None:
            return cached
        try:
            info = describe_folder(name, folder, self.accepts_base)
        except AdapterInvalid:
            if not folder.is_dir():  # deleted while we read it
                raise AdapterNotFound(f"no adapter named {name!r}") from None
            raise
        with self._lock:
            self._cache[name] = (signature, info)
        return info

    def _described(self, name: str, signature: tuple) -> AdapterInfo | None:
        """The description held for ``name`` if it was made of files with this signature."""
        with self._lock:
            cached = self._cache.get(name)
        return cached[1] if cached is not None and cached[0] == signature else None

    def list(self) -> list[AdapterInfo]:
        """Every servable adapter; folders that fail their checks are left out (``get`` says why)."""
        infos = []
        for name in self.names():
            try:
                infos.append(self.get(name))
            except (AdapterInvalid, AdapterNotFound):
                continue
        return infos

    def staging_folder(self) -> Path:
        """A fresh folder on the store's filesystem, hidden from listings, to unpack an upload into."""
        folder = self.root / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        folder.mkdir()
        return folder

    def publish(self, name: str, staged: Path) -> AdapterInfo:
        """Move a fully written staging folder into place as ``name``; 409 when the name exists."""
        check_name(name)
        info = describe_folder(name, staged, self.accepts_base)
        _fsync_tree(staged)
        target = self.root / name
        try:
            # rename() of a directory onto an existing non-empty one fails, so two racing uploads cannot both win.
            os.rename(staged, target)
        except OSError as error:
            if target.exists():
                raise AdapterExists(f"adapter {name!r} already exists; delete it first") from error
            raise
        _fsync_dir(self.root)
        return AdapterInfo(**{**info.__dict__, "path": str(target)})

    def replace(self, name: str, staged: Path) -> tuple[AdapterInfo, bool]:
        """Publish ``staged`` as the new version of ``name`` (or as a new adapter); True when one was replaced.

        Two renames: the old version to a trash folder named after the adapter, the new one into place. A crash
        between them leaves the old version in the trash, and ``sweep`` puts it back.
        """
        check_name(name)
        info = describe_folder(name, staged, self.accepts_base)
        _fsync_tree(staged)
        target = self.root / name
        with self._name_lock(name):
            replaced = target.is_dir()
            trash = self.root / f"{TRASH_PREFIX}{name}.{uuid.uuid4().hex}"
            if replaced:
                os.rename(target, trash)
            os.rename(staged, target)
            _fsync_dir(self.root)
            with self._lock:
                self._cache.pop(name, None)
        shutil.rmtree(trash, ignore_errors=True)
        return AdapterInfo(**{**info.__dict__, "path": str(target)}), replaced

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    def delete(self, name: str) -> None:
        folder = self._folder(name)
        if not folder.is_dir():
            raise AdapterNotFound(f"no adapter named {name!r}")
        trash = self.root / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
        with self._name_lock(name):
            os.rename(folder, trash)  # atomic: readers see the adapter or nothing
        with self._lock:
            self._cache.pop(name, None)
        shutil.rmtree(trash, ignore_errors=True)

    def sweep(self) -> None:
        """Clean up after a crash: an old version caught between a replace's two renames goes back into place;
        staging and other trash folders are removed."""
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or not entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                continue
            name = entry.name[len(TRASH_PREFIX):].rpartition(".")[0] if entry.name.startswith(TRASH_PREFIX) else ""
            if name and valid_name(name) and not (self.root / name).exists():
                os.rename(entry, self.root / name)
            else:
                shutil.rmtree(entry, ignore_errors=True)


def _rank(kind: AdapterKind, config: dict) -> int | None:
    """LoRA's r; AdaLoRA's target rank (its budget), else its initial one."""
    if kind is AdapterKind.LORA and isinstance(config.get("r"), int):
        return config["r"]
    if kind is AdapterKind.ADALORA:
        rank = config.get("target_r") or config.get("init_r")
        return rank if isinstance(rank, int) else None
    return None


def _signature(folder: Path) -> tuple:
    parts = []
    for file_name in (CONFIG_FILE, WEIGHTS_FILE, LABELS_FILE, *TOKENIZER_FILES):
        try:
            stat = (folder / file_name).stat()
            parts.append((file_name, stat.st_mtime_ns, stat.st_size, stat.st_ino))
        except FileNotFoundError:
            parts.append((file_name, None))
    return tuple(parts)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
