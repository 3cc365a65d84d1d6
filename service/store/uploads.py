"""Publishing an uploaded archive as an adapter: unpack to staging, check, then rename into place."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import BinaryIO

from service.domain import AdapterInfo
from service.errors import AdapterExists, AdapterInvalid
from service.store.archive import ArchiveLimits, unpack
from service.store.store import NAME_PATTERN, AdapterStore, describe_folder, valid_name


def install_upload(
    store: AdapterStore,
    name: str,
    archive: BinaryIO,
    size: int,
    limits: ArchiveLimits,
    check: Callable[[AdapterInfo], None],
) -> AdapterInfo:
    """Unpack, validate against the base (``check``) and publish atomically; on any refusal nothing is left."""
    if not valid_name(name):
        raise AdapterInvalid(f"adapter name {name!r} must match {NAME_PATTERN.pattern}")
    if (store.root / name).exists():
        raise AdapterExists(f"adapter {name!r} already exists; delete it first")
    staged = store.staging_folder()
    try:
        unpack(archive, size, staged, limits)
        check(describe_folder(name, staged, store.accepts_base))
        return store.publish(name, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
