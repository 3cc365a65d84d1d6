"""Unpacking uploads: every malicious archive shape is refused and leaves nothing behind."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from service.errors import UploadInvalid, UploadTooLarge
from service.store.archive import ArchiveLimits, make_zip, unpack

GOOD = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * 64}


def _tar(members: list[tarfile.TarInfo], payloads: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for info in members:
            data = (payloads or {}).get(info.name)
            bundle.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _unpack(data: bytes, tmp_path: Path, limits: ArchiveLimits = ArchiveLimits(), folder: str = "staging") -> Path:
    target = tmp_path / folder
    target.mkdir(exist_ok=True)
    unpack(io.BytesIO(data), len(data), target, limits)
    return target


def test_zip_at_top_or_in_one_folder(tmp_path: Path) -> None:
    assert sorted(p.name for p in _unpack(make_zip(GOOD), tmp_path).iterdir()) == sorted(GOOD)
    nested = make_zip({f"checkpoint-100/{k}": v for k, v in GOOD.items()})
    assert sorted(p.name for p in _unpack(nested, tmp_path, folder="nested").iterdir()) == sorted(GOOD)


def test_tar_gz(tmp_path: Path) -> None:
    members = [_file(f"out/{name}", data) for name, data in GOOD.items()]
    target = _unpack(_tar([m for m, _ in members], {m.name: d for m, d in members}), tmp_path)
    assert sorted(p.name for p in target.iterdir()) == sorted(GOOD)


@pytest.mark.parametrize("name", ["../adapter_config.json", "a/../../adapter_config.json", "/etc/adapter_config.json",
                                  "C:/adapter_config.json"])
def test_traversal_and_absolute_paths(name: str, tmp_path: Path) -> None:
    with pytest.raises(UploadInvalid):
        _unpack(make_zip({name: b"{}"}), tmp_path)
    info, data = _file(name, b"{}")
    with pytest.raises(UploadInvalid):
        _unpack(_tar([info], {name: data}), tmp_path, folder="tar")


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_links_and_devices_in_tar(kind: bytes, tmp_path: Path) -> None:
    info = tarfile.TarInfo("adapter_model.safetensors")
    info.type = kind
    info.linkname = "/etc/passwd"
    with pytest.raises(UploadInvalid, match="link or special file"):
        _unpack(_tar([info]), tmp_path)
    assert list((tmp_path / "staging").iterdir()) == []


def test_symlink_in_zip(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        link = zipfile.ZipInfo("adapter_model.safetensors")
        link.external_attr = (0o120777 << 16)
        bundle.writestr(link, "/etc/passwd")
    with pytest.raises(UploadInvalid, match="link or special file"):
        _unpack(buffer.getvalue(), tmp_path)


def test_pickle_and_unexpected_files(tmp_path: Path) -> None:
    for extra in ("adapter_model.bin", "optimizer.pt", "training_args.pkl"):
        with pytest.raises(UploadInvalid, match="pickle"):
            _unpack(make_zip({**GOOD, extra: b"x"}), tmp_path)
    with pytest.raises(UploadInvalid, match="not accepted"):
        _unpack(make_zip({**GOOD, "setup.py": b"x"}), tmp_path)
    with pytest.raises(UploadInvalid, match="several folders"):
        _unpack(make_zip({"a/adapter_config.json": b"{}", "b/adapter_model.safetensors": b"x"}), tmp_path)


def test_caps_on_members_size_and_ratio(tmp_path: Path) -> None:
    many = make_zip({f"d{i}/README.md": b"x" for i in range(40)})
    with pytest.raises(UploadInvalid, match="members"):
        _unpack(many, tmp_path)
    bomb = make_zip({**GOOD, "adapter_model.safetensors": b"\0" * (50 * 1024 * 1024)})
    with pytest.raises(UploadInvalid, match="compression ratio"):
        _unpack(bomb, tmp_path)
    big = make_zip({**GOOD, "adapter_model.safetensors": bytes(range(256)) * 8192})
    with pytest.raises(UploadTooLarge):
        _unpack(big, tmp_path, ArchiveLimits(max_unpacked_bytes=1024 * 1024))
    assert list((tmp_path / "staging").iterdir()) == []


def test_member_larger_than_its_header_says(tmp_path: Path) -> None:
    info = tarfile.TarInfo("adapter_model.safetensors")
    info.size = 10
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        bundle.addfile(info, io.BytesIO(b"0123456789"))
    assert _unpack(buffer.getvalue(), tmp_path).joinpath("adapter_model.safetensors").read_bytes() == b"0123456789"


def test_not_an_archive(tmp_path: Path) -> None:
    for data in (b"", b"hello", b"PK\x03\x04broken", b"\x1f\x8bbroken"):
        with pytest.raises(UploadInvalid):
            _unpack(data, tmp_path)
