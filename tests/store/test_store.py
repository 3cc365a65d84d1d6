"""The on-disk store: metadata, refusals that say what to change, atomic publishing, racing uploads."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from service.domain import AdapterKind, Task
from service.errors import AdapterExists, AdapterInvalid, AdapterNotFound
from service.store.store import AdapterStore, describe_folder
from tests.conftest import TINY_ID


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_describes_every_kind(tiny_store: Path) -> None:
    store = AdapterStore(tiny_store)
    lora = store.get("lora-cls3")
    assert (lora.kind, lora.task, lora.rank, lora.labels) == (AdapterKind.LORA, Task.CLASSIFICATION, 8,
                                                               ["LABEL_0", "LABEL_1", "LABEL_2"])
    prefix = store.get("prefix-gen")
    assert (prefix.kind, prefix.task, prefix.num_virtual_tokens) == (AdapterKind.PREFIX_TUNING, Task.GENERATION, 6)
    assert {i.name for i in store.list()} >= {"lora-cls", "prefix-proj-cls"}


def test_refusals_name_the_fix(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    pickled = _copy(tiny_adapters["lora-gen"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterInvalid, match="safe_serialization=True"):
        describe_folder("pickled", pickled)

    loha = _copy(tiny_adapters["lora-gen"], tmp_path / "loha")
    config = json.loads((loha / "adapter_config.json").read_text())
    (loha / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(AdapterInvalid, match="not served"):
        describe_folder("loha", loha)

    labels = _copy(tiny_adapters["lora-cls"], tmp_path / "labels")
    (labels / "labels.json").write_text(json.dumps(["only-one"]))
    with pytest.raises(AdapterInvalid, match="names 1 labels but the head has 2"):
        describe_folder("labels", labels)

    with pytest.raises(AdapterInvalid, match="SERVICE_BASE_MODEL_ALIASES"):
        describe_folder("wrong-base", tiny_adapters["lora-gen"], accepts_base=lambda name: name != TINY_ID)

    truncated = _copy(tiny_adapters["lora-gen"], tmp_path / "truncated")
    (truncated / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(AdapterInvalid, match="safetensors"):
        describe_folder("truncated", truncated)


def test_unknown_and_bad_names_are_404(tiny_store: Path) -> None:
    store = AdapterStore(tiny_store)
    for name in ("missing", "../lora-gen", ".staging-x", "a" * 80):
        with pytest.raises(AdapterNotFound):
            store.get(name)


def test_racing_uploads_of_one_name_publish_exactly_once(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def upload() -> None:
        staged = store.staging_folder()
        for path in tiny_adapters["lora-gen"].iterdir():
            shutil.copy(path, staged / path.name)
        barrier.wait()
        try:
            store.publish("contested", staged)
            outcomes.append("created")
        except AdapterExists:
            outcomes.append("exists")
            shutil.rmtree(staged)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created"] + ["exists"] * 5
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["contested"]


def test_sweep_removes_what_a_crash_left(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    half = store.staging_folder()
    (half / "adapter_config.json").write_text("{")
    assert store.names() == []  # a half-written upload never shows up as an adapter
    store.sweep()
    assert list((tmp_path / "store").iterdir()) == []


def test_delete_is_atomic_and_final(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    _copy(tiny_adapters["prefix-gen"], tmp_path / "store" / "gone")
    assert store.get("gone").name == "gone"
    store.delete("gone")
    with pytest.raises(AdapterNotFound):
        store.get("gone")
    assert list((tmp_path / "store").iterdir()) == []


def test_peek_answers_only_from_an_unchanged_description(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    folder = _copy(tiny_adapters["lora-cls"], tmp_path / "store" / "lora-cls")
    assert store.peek("lora-cls") is None  # never described: the caller reads it (off the event loop)
    assert store.peek("../etc") is None and store.peek("missing") is None
    info = store.get("lora-cls")
    assert store.peek("lora-cls") == info
    config = folder / "adapter_config.json"
    config.write_text(config.read_text() + "\n")  # changed on disk: described again by get, not peeked
    assert store.peek("lora-cls") is None
    assert store.get("lora-cls").name == "lora-cls" and store.peek("lora-cls") is not None
    shutil.rmtree(folder)
    assert store.peek("lora-cls") is None
    with pytest.raises(AdapterNotFound):
        store.get("lora-cls")
