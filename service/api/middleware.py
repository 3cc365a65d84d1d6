"""The outermost layer around every route, as plain ASGI: body-size refusal before reading, request metrics, and
the last word on errors: nothing escapes to the ASGI server, every failure before the response starts becomes a
JSON 500 (logged once, with its traceback). Plain ASGI rather than ``BaseHTTPMiddleware``, which turns an error
inside a route into ``anyio.EndOfStream`` and a plain-text 500."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.metrics import OTHER_LABEL, Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def send_tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        refusal = self._too_large(scope)
        try:
            if refusal is not None:
                await refusal(scope, receive, send_tracking)
            else:
                await self.app(scope, receive, send_tracking)
        except asyncio.CancelledError:
            if not status["sent"]:
                status["code"] = 499  # the client left before an answer (nginx's code for it), not a server error
            raise
        except Exception:
            logger.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            self._metrics(scope).internal_errors.labels(where="route").inc()
            if not status["sent"]:
                await error_response(
                    500, "Internal", "internal error; it was logged. Retry, or report it if it persists",
                    path=scope.get("path", ""),
                )(scope, receive, send_tracking)
            # Once a response has started nothing more can be said on this connection; streams end themselves
            # with an 'error' event before they get here.
        finally:
            self._record(scope, status["code"], time.perf_counter() - started)

    def _too_large(self, scope: Scope):
        """Refuse a body by its declared length before reading it."""
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if not declared.isdigit():
            return None
        method, path = scope.get("method"), scope.get("path", "").rstrip("/")
        # An upload is a new adapter (POST) or a new version of one (PUT): both carry an archive.
        upload = (method == "POST" and path == "/v1/adapters") or (
            method == "PUT" and path.startswith("/v1/adapters/"))
        settings = self.settings
        # Multipart framing adds a little around the archive itself.
        limit = settings.max_upload_bytes + 64 * 1024 if upload else settings.max_request_bytes
        if int(declared) <= limit:
            return None
        return error_response(413, "UploadTooLarge" if upload else "RequestTooLarge",
                              f"the request body is {declared} bytes; the limit is {limit}", path=scope.get("path", ""))

    @staticmethod
    def _metrics(scope: Scope) -> Metrics:
        return scope["app"].state.service.metrics

    @staticmethod
    def _adapter_label(scope: Scope, metrics: Metrics, name: str | None) -> str:
        """A name takes one of the bounded label slots only if the store has it: anyone can send made-up names."""
        store = scope["app"].state.service.store
        if name is not None and (store is None or not store.has(name)):
            return OTHER_LABEL
        return metrics.adapter_label(name)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        if path == "/metrics":
            return
        metrics = self._metrics(scope)
        state = scope.get("state") or {}
        adapter = self._adapter_label(scope, metrics, state.get("adapter"))
        metrics.requests.labels(route=path, adapter=adapter, status=str(status)).inc()
        metrics.request_seconds.labels(route=path).observe(seconds)
