"""Packing an adapter for upload, refusing before anything is sent what the service would refuse, in its words.

The checks are the store's own (``service.store``: member names, the folder's metadata), so a refusal here reads
exactly as the server's answer would. Checks that need the base model (shapes, tokenizer, a smoke run) stay on the
server. No torch here: the client imports this.
"""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from service.domain import AdapterInfo
from service.errors import UploadInvalid
from service.store.archive import ALLOWED_FILES, ArchiveLimits, check_member_name, unpack
from service.store.store import PICKLE_WEIGHTS, TOKENIZER_FILES, WEIGHTS_FILE, check_name, describe_folder

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")


@dataclass
class PackedAdapter:
    """An archive ready to send: an open file positioned at its start, and what the local checks found."""

    file: BinaryIO
    size: int
    filename: str
    info: AdapterInfo
    left_out: list[str] = field(default_factory=list)  # files of the folder not packed (the service takes no such)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> PackedAdapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def pack(path: str | Path, name: str, include_tokenizer: bool = True) -> PackedAdapter:
    """Zip the folder ``save_pretrained`` wrote (only the files the service accepts), or take a ready .zip/.tar.gz
    as is; raise the service's own error (``UploadInvalid``, ``AdapterInvalid``) for what it would refuse."""
    check_name(name)
    source = Path(path)
    if source.is_dir():
        return _pack_folder(source, name, include_tokenizer)
    if source.is_file() and source.name.endswith(ARCHIVE_SUFFIXES):
        return _check_archive(source, name)
    raise UploadInvalid(f"{source} is neither an adapter folder nor a .zip/.tar.gz archive")


def select_files(folder: Path, include_tokenizer: bool = True) -> tuple[list[Path], list[str]]:
    """The files to pack and the names left out. Pickle weights with no safetensors beside them are refused: they
    are the adapter itself, so leaving them out would only move the refusal to 'weights missing'."""
    has_safetensors = (folder / WEIGHTS_FILE).is_file()
    packed: list[Path] = []
    left_out: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name in PICKLE_WEIGHTS and not has_safetensors:
            check_member_name(entry.name)  # raises the service's pickle refusal
        wanted = entry.name in ALLOWED_FILES and (include_tokenizer or entry.name not in TOKENIZER_FILES)
        if wanted and entry.is_file():
            check_member_name(entry.name)
            packed.append(entry)
        else:
            left_out.append(f"{entry.name}/" if entry.is_dir() else entry.name)
    return packed, left_out


def _pack_folder(folder: Path, name: str, include_tokenizer: bool) -> PackedAdapter:
    files, left_out = select_files(folder, include_tokenizer)
    # The folder holds what the staged upload would: describe_folder reads only the accepted files.
    info = describe_folder(name, folder)
    archive = tempfile.TemporaryFile()
    try:
        with zipfile.ZipFile(archive, "w") as bundle:
            for file in files:
                # Weights barely compress; deflating hundreds of MB would only cost time.
                method = zipfile.ZIP_STORED if file.name == WEIGHTS_FILE else zipfile.ZIP_DEFLATED
                bundle.write(file, arcname=file.name, compress_type=method)
        size = archive.tell()
        archive.seek(0)
    except BaseException:
        archive.close()
        raise
    return PackedAdapter(file=archive, size=size, filename=f"{name}.zip", info=info, left_out=left_out)


def _check_archive(path: Path, name: str) -> PackedAdapter:
    archive = path.open("rb")
    try:
        size = path.stat().st_size
        with tempfile.TemporaryDirectory() as staging:
            # The server's own unpacking and description, at its default limits.
            unpack(archive, size, Path(staging), ArchiveLimits())
            info = describe_folder(name, Path(staging))
        archive.seek(0)
        info = replace(info, path=str(path))  # not the staging folder, gone by now
    except BaseException:
        archive.close()
        raise
    return PackedAdapter(file=archive, size=size, filename=path.name, info=info)
