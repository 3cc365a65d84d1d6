"""The typed client against the real app on loopback (tiny base, tiny store)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from service.client import GenerateResponse, ServiceClient, ServiceClientError, pack
from tests.conftest import make_adapter
from tests.live_service import ADMIN_TOKEN, copy_adapter, service_url, with_tokenizer, zip_as_is
from tests.servers import free_port

__all__ = ["service_url"]  # the fixture, imported for pytest


@pytest.fixture
def client(service_url: str) -> ServiceClient:
    with ServiceClient(service_url, admin_token=ADMIN_TOKEN, timeout=60) as service_client:
        yield service_client


def test_import_stays_light() -> None:
    heavy = ("torch", "transformers", "peft", "fastapi", "uvicorn", "service.api.app", "service.model")
    code = f"import sys, service.client, service.cli; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "[]"


def test_list_show_delete(client: ServiceClient, tiny_adapters: dict[str, Path]) -> None:
    names = {entry.name for entry in client.list_adapters()}
    assert {"lora-cls", "lora-gen", "lora-tok", "prefix-gen"} <= names
    entry = client.get_adapter("lora-cls")
    assert (entry.name, entry.type, entry.task, entry.labels) == ("lora-cls", "lora", "classification",
                                                                  ["negative", "positive"])
    client.upload(tiny_adapters["ia3-gen"], "doomed")
    client.delete("doomed")
    with pytest.raises(ServiceClientError) as missing:
        client.get_adapter("doomed")
    assert (missing.value.status, missing.value.kind, missing.value.message) == (
        404, "AdapterNotFound", "no adapter named 'doomed'")


def test_upload_generate_and_replace(client: ServiceClient, tiny_base: Path, tmp_path: Path) -> None:
    folder = make_adapter(tiny_base, tmp_path / "fresh", "lora", "gen", seed=21)
    (folder / "training_args.bin").write_bytes(b"\x80\x04pickled trainer state")
    (folder / "checkpoint-10").mkdir()
    uploaded = client.upload(folder, "fresh-lora")
    assert uploaded.created and uploaded.adapter.name == "fresh-lora" and uploaded.adapter.type == "lora"
    assert uploaded.left_out == ["checkpoint-10/", "training_args.bin"]

    adapted = client.generate("fresh-lora", "Hello there", max_new_tokens=8)
    base = client.generate(None, "Hello there", max_new_tokens=8)
    assert adapted.generated_tokens >= 1 and adapted.text != base.text

    with pytest.raises(ServiceClientError) as exists:
        client.upload(folder, "fresh-lora")
    assert (exists.value.status, exists.value.kind) == (409, "AdapterExists")

    second = make_adapter(tiny_base, tmp_path / "second", "lora", "gen", seed=22)
    replaced = client.upload(second, "fresh-lora", replace=True)
    assert not replaced.created and replaced.adapter.sha256 != uploaded.adapter.sha256
    assert client.get_adapter("fresh-lora").sha256 == replaced.adapter.sha256
    assert client.generate("fresh-lora", "Hello there", max_new_tokens=8).text != adapted.text


def test_replace_takes_archives_as_large_as_a_new_upload(client: ServiceClient, tiny_base: Path,
                                                         tmp_path: Path) -> None:
    folder = make_adapter(tiny_base, tmp_path / "big", "lora", "gen", modules_to_save=["embed_tokens"], seed=23)
    assert (folder / "adapter_model.safetensors").stat().st_size > 8 * 1024 * 1024
    assert client.upload(folder, "big-by-put", replace=True).created


def _pickled(folder: Path) -> None:
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


def _no_config(folder: Path) -> None:
    (folder / "adapter_config.json").unlink()


def _unknown_type(folder: Path) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))


@pytest.mark.parametrize("breakage", [_pickled, _no_config, _unknown_type])
def test_local_refusal_is_the_servers_answer(
    breakage: Callable[[Path], None], client: ServiceClient, service_url: str, tiny_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    folder = copy_adapter(tiny_adapters["lora-gen"], tmp_path / "broken")
    breakage(folder)
    with pytest.raises(ServiceClientError) as local:
        client.upload(folder, "broken")
    assert local.value.status is None  # nothing was sent

    raw = httpx.post(f"{service_url}/v1/adapters", data={"name": "broken"},
                     files={"archive": ("broken.zip", zip_as_is(folder))},
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert raw.status_code == 422
    assert (local.value.kind, local.value.message) == (raw.json()["error"], raw.json()["message"])


def test_bad_name_is_refused_in_the_servers_words(client: ServiceClient, service_url: str,
                                                  tiny_adapters: dict[str, Path]) -> None:
    with pytest.raises(ServiceClientError) as local:
        client.upload(tiny_adapters["lora-gen"], "no spaces")
    raw = httpx.post(f"{service_url}/v1/adapters", data={"name": "no spaces"},
                     files={"archive": ("a.zip", zip_as_is(tiny_adapters["lora-gen"]))},
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert local.value.message == raw.json()["message"]


def test_ready_archives_are_checked_and_sent_as_is(client: ServiceClient, tiny_adapters: dict[str, Path],
                                                   tmp_path: Path) -> None:
    archive = tmp_path / "prefix.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(tiny_adapters["prefix-gen"], arcname="prefix-gen")  # files inside one folder
    with pack(archive, "from-tar") as packed:
        assert packed.size == archive.stat().st_size and packed.file.read() == archive.read_bytes()
        assert (packed.info.kind.value, packed.info.num_virtual_tokens) == ("prefix_tuning", 6)
    assert client.upload(archive, "from-tar").adapter.type == "prefix_tuning"

    pickled = tmp_path / "pickled.zip"
    folder = copy_adapter(tiny_adapters["lora-gen"], tmp_path / "pickled")
    _pickled(folder)
    pickled.write_bytes(zip_as_is(folder))
    with pytest.raises(ServiceClientError, match="pickle file") as refused:
        client.upload(pickled, "pickled")
    assert refused.value.status is None


def test_upload_reports_progress_and_keeps_the_tokenizer(client: ServiceClient, tiny_adapters: dict[str, Path],
                                                         tiny_base: Path, tmp_path: Path) -> None:
    folder = with_tokenizer(copy_adapter(tiny_adapters["lora-gen"], tmp_path / "tok"), tiny_base)
    calls: list[tuple[int, int]] = []
    with pack(folder, "with-tokenizer") as packed:
        total = packed.size
        client.upload(packed, "with-tokenizer", progress=lambda sent, size: calls.append((sent, size)))
    assert total > 256 * 1024 and len(calls) >= 4  # streamed in 64 KiB chunks
    assert calls[-1] == (total, total) and [sent for sent, _ in calls] == sorted(sent for sent, _ in calls)
    with pack(folder, "without", include_tokenizer=False) as bare:
        assert "tokenizer.json" in bare.left_out and bare.size < total


def test_classify_and_classify_tokens(client: ServiceClient) -> None:
    results = client.classify("lora-cls", ["a fine day", "a dreadful day"])
    assert len(results) == 2
    for result in results:
        assert set(result.scores) == {"negative", "positive"} and result.label in result.scores
        assert abs(sum(result.scores.values()) - 1.0) < 1e-5

    texts = ["John Smith lives in York", "nothing here"]
    for aggregation in ("simple", "none"):
        entities = client.classify_tokens("lora-tok", texts, aggregation=aggregation)
        assert len(entities) == 2 and entities[0]  # a random head labels some of these tokens
        for text, found in zip(texts, entities):
            for entity in found:
                assert entity.text == text[entity.start:entity.end]
                assert entity.label in (("PER",) if aggregation == "simple" else ("B-PER", "I-PER"))


def test_stream_gives_the_greedy_text(client: ServiceClient) -> None:
    whole = client.generate("lora-gen", "Once upon a time", max_new_tokens=12)
    items = list(client.generate_stream("lora-gen", "Once upon a time", max_new_tokens=12))
    *pieces, final = items
    assert isinstance(final, GenerateResponse) and all(isinstance(piece, str) for piece in pieces)
    assert "".join(pieces) == final.text == whole.text
    assert final.generated_tokens == whole.generated_tokens and len(pieces) >= 2


def test_errors_carry_the_servers_message(client: ServiceClient, service_url: str) -> None:
    with pytest.raises(ServiceClientError) as unknown:
        client.generate("nope", "x")
    assert (unknown.value.status, unknown.value.kind, unknown.value.message) == (
        404, "AdapterNotFound", "no adapter named 'nope'")
    with pytest.raises(ServiceClientError) as streamed:
        next(iter(client.generate_stream("lora-cls", "x")))
    assert streamed.value.status == 422 and "generation" in streamed.value.message

    with ServiceClient(service_url, admin_token="wrong") as intruder, pytest.raises(ServiceClientError) as denied:
        intruder.delete("lora-gen")
    assert denied.value.status == 401 and "SERVICE_ADMIN_TOKEN" in denied.value.message
    assert client.get_adapter("lora-gen").name == "lora-gen"

    nowhere = f"http://127.0.0.1:{free_port()}"
    with ServiceClient(nowhere, timeout=5) as lost, pytest.raises(ServiceClientError) as unreachable:
        lost.list_adapters()
    assert unreachable.value.status is None and unreachable.value.kind == "ConnectionError"
    assert nowhere in unreachable.value.message


def test_health_and_ready(client: ServiceClient) -> None:
    assert client.health().status == "alive"
    readiness = client.ready()
    assert readiness.ready and readiness.status == "ready"
