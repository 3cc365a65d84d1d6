"""Publishing an uploaded archive as an adapter: unpack to staging, check, then rename into place."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import BinaryIO

from service.domain import AdapterInfo
from service.errors import AdapterExists
from service.store.archive import ArchiveLimits, unpack
from service.store.store import AdapterStore, check_name, describe_folder


def install_upload(
    store: AdapterStore,
    name: str,
    archive: BinaryIO,
    size: int,
    limits: ArchiveLimits,
    check: Callable[[AdapterInfo], None],
    replace: bool = False,
) -> tuple[AdapterInfo, bool]:
    """Unpack, validate against the base (``check``) and publish atomically; on any refusal nothing is left.

    Returns the adapter and whether an existing version was replaced (only with ``replace``; else 409).
    """
    check_name(name)
    if not replace and (store.root / name).exists():
        raise AdapterExists(f"adapter {name!r} already exists; PUT /v1/adapters/{name} replaces it")
    staged = store.staging_folder()
    try:
        unpack(archive, size, staged, limits)
        check(describe_folder(name, staged, store.accepts_base))
        if replace:
            return store.replace(name, staged)
        return store.publish(name, staged), False
    finally:
        shutil.rmtree(staged, ignore_errors=True)
