"""Work a client stops waiting for is dropped: a non-streamed generation may run for minutes over many rows, and
nothing else notices that its client has gone (a stream notices when its next write fails)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from service.errors import ClientGone

T = TypeVar("T")


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """The result of ``work``; if the client disconnects first, ``work`` is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        raise ClientGone("the client disconnected before the answer; its work was dropped")
    return task.result()


async def _disconnect(request: Request) -> None:
    # The body has been read: the next message the server delivers is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
