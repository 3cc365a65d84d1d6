"""Unpacking an uploaded adapter archive (.zip or .tar.gz) safely into a staging folder.

Only the files PEFT writes are accepted, at the archive's top or inside one folder; links, devices, absolute paths,
``..``, oversized members, too many members and zip bombs are refused before anything is written.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.errors import UploadInvalid, UploadTooLarge
from service.store.store import TOKENIZER_FILES

ALLOWED_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "labels.json", "README.md",
                           *TOKENIZER_FILES})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    max_unpacked_bytes: int = 2 * 1024**3
    max_members: int = 32
    max_ratio: float = 200.0


@dataclass(frozen=True)
class _Member:
    file_name: str
    size: int
    handle: object  # ZipInfo or TarInfo


def _check_path(raw: str) -> PurePosixPath:
    path = PurePosixPath(raw.replace("\\", "/"))
    if raw.startswith(("/", "\\")) or path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise UploadInvalid(f"archive member {raw!r} has an absolute path")
    if ".." in path.parts:
        raise UploadInvalid(f"archive member {raw!r} climbs out of the archive with '..'")
    return path


def check_member_name(raw: str) -> tuple[str, ...]:
    """The parts of an archive member's path (folder, file), or the refusal an upload of it gets. The client
    (service.packing) asks this too, so a refusal before sending reads as the server's."""
    path = _check_path(raw)
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if len(parts) > 2 or not parts:
        raise UploadInvalid(f"archive member {raw!r}: put the adapter files at the top or inside one folder")
    file_name = parts[-1]
    if file_name.endswith(PICKLE_SUFFIXES):
        raise UploadInvalid(
            f"archive member {raw!r} is a pickle file, which can run code and is never loaded; re-save the adapter "
            "with save_pretrained(dir, safe_serialization=True) to get adapter_model.safetensors"
        )
    if file_name not in ALLOWED_FILES:
        allowed = ", ".join(sorted(ALLOWED_FILES))
        raise UploadInvalid(f"archive member {raw!r} is not accepted; allowed files: {allowed}")
    return parts


def _accept(raw: str, size: int, handle: object, folders: set[tuple[str, ...]]) -> _Member:
    parts = check_member_name(raw)
    folders.add(parts[:-1])
    return _Member(file_name=parts[-1], size=size, handle=handle)


def _check_members(members: list[_Member], folders: set[tuple[str, ...]], packed: int, limits: ArchiveLimits) -> None:
    if len(folders) > 1:
        raise UploadInvalid("the archive's adapter files are spread over several folders; put them in one")
    names = [m.file_name for m in members]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise UploadInvalid(f"the archive holds {sorted(duplicates)[0]} more than once")
    total = sum(m.size for m in members)
    if total > limits.max_unpacked_bytes:
        raise UploadTooLarge(f"the archive unpacks to {total} bytes; the limit is {limits.max_unpacked_bytes}")
    if packed > 0 and total / packed > limits.max_ratio and total > _CHUNK:
        raise UploadInvalid(f"the archive's compression ratio {total / packed:.0f} exceeds {limits.max_ratio:.0f}")


def _copy(source: BinaryIO, target: Path, declared: int) -> None:
    written = 0
    with target.open("wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > declared:  # never trust the header's size: stop at what it claimed
                raise UploadInvalid(f"archive member {target.name} is larger than its header says")
            out.write(chunk)


def unpack(archive: BinaryIO, size: int, destination: Path, limits: ArchiveLimits) -> None:
    """Unpack ``archive`` (``size`` bytes) into the empty ``destination`` folder, or raise and leave it empty."""
    magic = archive.read(4)
    archive.seek(0)
    try:
        if magic.startswith(b"PK\x03\x04"):
            _unpack_zip(archive, size, destination, limits)
        elif magic.startswith(b"\x1f\x8b"):
            _unpack_tar(archive, size, destination, limits)
        else:
            raise UploadInvalid("the archive must be a .zip or a .tar.gz")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as error:
        _empty(destination)
        raise UploadInvalid(f"the archive cannot be read: {error}") from error
    except Exception:
        _empty(destination)
        raise


def _unpack_zip(archive: BinaryIO, size: int, destination: Path, limits: ArchiveLimits) -> None:
    with zipfile.ZipFile(archive) as bundle:
        infos = bundle.infolist()
        if len(infos) > limits.max_members:
            raise UploadInvalid(f"the archive holds {len(infos)} members; the limit is {limits.max_members}")
        folders: set[tuple[str, ...]] = set()
        members = []
        for info in infos:
            mode = (info.external_attr >> 16) & 0o170000
            if info.is_dir():
                _check_path(info.filename)
                continue
            if mode and mode != 0o100000:
                raise UploadInvalid(f"archive member {info.filename!r} is a link or special file, not a regular file")
            if info.flag_bits & 0x1:
                raise UploadInvalid(f"archive member {info.filename!r} is encrypted")
            members.append(_accept(info.filename, info.file_size, info, folders))
        _check_members(members, folders, size, limits)
        for member in members:
            with bundle.open(member.handle) as source:
                _copy(source, destination / member.file_name, member.size)


def _unpack_tar(archive: BinaryIO, size: int, destination: Path, limits: ArchiveLimits) -> None:
    with tarfile.open(fileobj=archive, mode="r:gz") as bundle:
        folders: set[tuple[str, ...]] = set()
        members = []
        for count, info in enumerate(bundle, start=1):
            if count > limits.max_members:
                raise UploadInvalid(f"the archive holds more than {limits.max_members} members")
            if info.isdir():
                _check_path(info.name)
                continue
            if not info.isreg():
                raise UploadInvalid(f"archive member {info.name!r} is a link or special file, not a regular file")
            members.append(_accept(info.name, info.size, info, folders))
        _check_members(members, folders, size, limits)
        for member in members:
            source = bundle.extractfile(member.handle)
            if source is None:
                raise UploadInvalid(f"archive member {member.file_name} cannot be read")
            _copy(source, destination / member.file_name, member.size)


def _empty(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def make_zip(files: dict[str, bytes]) -> bytes:
    """A zip of ``{member name: content}``; used by tests and the demo client."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, content in files.items():
            bundle.writestr(name, content)
    return buffer.getvalue()
