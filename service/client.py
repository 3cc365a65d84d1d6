"""A small synchronous client for a running adapter service (httpx; no torch, no transformers).

    with ServiceClient("http://127.0.0.1:8000", admin_token="...") as client:
        client.upload("my-adapter/", "my-adapter")
        print(client.generate("my-adapter", "Hello", max_new_tokens=16).text)

Every failure is a ``ServiceClientError`` carrying the server's ``{"error", "message"}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx

from service.api.schemas import (
    AdapterEntry,
    AdapterList,
    ClassificationResult,
    ClassifyResponse,
    ClassifyTokensResponse,
    EntityResult,
    GenerateResponse,
)
from service.errors import ServiceError
from service.packing import PackedAdapter
from service.packing import pack as _pack

__all__ = [
    "AdapterEntry", "ClassificationResult", "EntityResult", "GenerateResponse", "Health", "PackedAdapter",
    "Readiness", "ServiceClient", "ServiceClientError", "UploadResult", "pack",
]

DEFAULT_URL = "http://127.0.0.1:8000"
ProgressCallback = Callable[[int, int], None]  # (bytes sent, total bytes)


class ServiceClientError(Exception):
    """The service's error ``{"error": kind, "message": message}`` with its HTTP status.

    ``status`` is None when no HTTP status applies: the service could not be reached, the archive was refused
    locally before sending (``kind`` and ``message`` are then what the service would have answered), or a stream
    ended with an ``error`` event.
    """

    def __init__(self, status: int | None, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        where = f"{self.status} {self.kind}" if self.status is not None else self.kind
        return f"{self.message} ({where})"


@dataclass(frozen=True)
class Health:
    status: str


@dataclass(frozen=True)
class Readiness:
    ready: bool
    status: str
    message: str | None


@dataclass(frozen=True)
class UploadResult:
    adapter: AdapterEntry
    created: bool  # False: an existing version was replaced
    left_out: list[str]  # files of the folder not packed (the service takes no such files)


def pack(path: str | Path, name: str, include_tokenizer: bool = True) -> PackedAdapter:
    """``service.packing.pack`` with its refusals (the service's own words) as ``ServiceClientError``."""
    try:
        return _pack(path, name, include_tokenizer)
    except ServiceError as error:
        raise ServiceClientError(None, type(error).__name__, error.message) from error
    except OSError as error:
        raise ServiceClientError(None, "OSError", f"cannot read {path}: {error}") from error


class ServiceClient:
    """Typed calls to the adapter service's HTTP API. ``api_key`` goes to inference and listing routes (the admin
    token is used there when no key is given: the service accepts it), ``admin_token`` to upload and delete."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        admin_token: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        self.url = url.rstrip("/")
        self._api_key = api_key or admin_token
        self._admin_token = admin_token
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # health

    def health(self) -> Health:
        return Health(**self._request("GET", "/health").json())

    def ready(self) -> Readiness:
        """Whether the service is ready; a 503 (loading, failed, stopping) is an answer here, not an error."""
        response = self._send("GET", "/ready")
        if response.status_code not in (200, 503):
            _raise_for(response)
        body = response.json()
        return Readiness(ready=response.status_code == 200, status=body.get("status", ""), message=body.get("message"))

    # adapters

    def list_adapters(self) -> list[AdapterEntry]:
        return AdapterList.model_validate(self._request("GET", "/v1/adapters").json()).adapters

    def get_adapter(self, name: str) -> AdapterEntry:
        return AdapterEntry.model_validate(self._request("GET", f"/v1/adapters/{_segment(name)}").json())

    def upload(
        self,
        source: str | Path | PackedAdapter,
        name: str,
        replace: bool = False,
        progress: ProgressCallback | None = None,
        include_tokenizer: bool = True,
    ) -> UploadResult:
        """Upload an adapter folder (packed here, checked with the service's own checks first), a ready .zip or
        .tar.gz, or an already ``pack``-ed archive. ``replace``: publish a new version of ``name`` (PUT) instead of
        refusing an existing name (409). ``progress(sent, total)`` is called as the archive's bytes go out."""
        packed = source if isinstance(source, PackedAdapter) else pack(source, name, include_tokenizer)
        try:
            body = _ProgressReader(packed.file, packed.size, progress)
            archive = {"archive": (packed.filename, body, "application/octet-stream")}
            if replace:
                response = self._request("PUT", f"/v1/adapters/{_segment(name)}", admin=True, files=archive)
            else:
                response = self._request("POST", "/v1/adapters", admin=True, data={"name": name}, files=archive)
        finally:
            if packed is not source:
                packed.close()
        return UploadResult(adapter=AdapterEntry.model_validate(response.json()), created=response.status_code == 201,
                            left_out=packed.left_out)

    def delete(self, name: str) -> None:
        self._request("DELETE", f"/v1/adapters/{_segment(name)}", admin=True)

    # inference

    def classify(self, adapter: str, texts: str | Sequence[str]) -> list[ClassificationResult]:
        body = {"adapter": adapter, "inputs": _texts(texts)}
        return ClassifyResponse.model_validate(self._request("POST", "/v1/classify", json=body).json()).results

    def classify_tokens(
        self, adapter: str, texts: str | Sequence[str], aggregation: Literal["simple", "none"] = "simple"
    ) -> list[list[EntityResult]]:
        body = {"adapter": adapter, "inputs": _texts(texts), "aggregation": aggregation}
        response = self._request("POST", "/v1/classify_tokens", json=body)
        return ClassifyTokensResponse.model_validate(response.json()).results

    def generate(
        self,
        adapter: str | None,
        prompt: str,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        chat: bool = False,
    ) -> GenerateResponse:
        """Generate from ``adapter`` (None: the base model); temperature 0 is greedy."""
        body = _generation_body(adapter, prompt, max_new_tokens, temperature, top_p, stop, seed, chat, stream=False)
        return GenerateResponse.model_validate(self._request("POST", "/v1/generate", json=body).json())

    def generate_stream(
        self,
        adapter: str | None,
        prompt: str,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        chat: bool = False,
    ) -> Iterator[str | GenerateResponse]:
        """Pieces of new text as the service sends them, then the final ``GenerateResponse`` (its full text and
        counts). An ``error`` event raises ``ServiceClientError`` (status None: the stream had started)."""
        body = _generation_body(adapter, prompt, max_new_tokens, temperature, top_p, stop, seed, chat, stream=True)
        try:
            with self._http.stream("POST", "/v1/generate", json=body, headers=self._auth(admin=False)) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                for event, data in _server_sent_events(response.iter_lines()):
                    if event == "token":
                        yield data["text"]
                    elif event == "done":
                        yield GenerateResponse.model_validate(data)
                        return
                    elif event == "error":
                        raise ServiceClientError(None, data.get("error", "Internal"), data.get("message", ""))
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        raise ServiceClientError(None, "IncompleteStream", "the stream ended without its 'done' event")

    # plumbing

    def _auth(self, admin: bool) -> dict[str, str]:
        token = self._admin_token if admin else self._api_key
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _send(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, headers=self._auth(admin), **kwargs)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error

    def _request(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> httpx.Response:
        response = self._send(method, path, admin, **kwargs)
        if response.status_code >= 400:
            _raise_for(response)
        return response

    def _unreachable(self, error: httpx.TransportError) -> ServiceClientError:
        if isinstance(error, httpx.TimeoutException):
            return ServiceClientError(None, "Timeout", f"the adapter service at {self.url} did not answer in time "
                                                       f"({type(error).__name__})")
        return ServiceClientError(None, "ConnectionError",
                                  f"cannot reach the adapter service at {self.url}: {error or type(error).__name__}")


class _ProgressReader:
    """The archive as httpx's multipart encoder reads it (in 64 KiB chunks), reporting each chunk sent."""

    def __init__(self, file: Any, total: int, progress: ProgressCallback | None) -> None:
        self._file = file
        self._total = total
        self._progress = progress
        self._sent = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._sent += len(chunk)
        if self._progress is not None and chunk:
            self._progress(self._sent, self._total)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._file.seek(offset, whence)
        self._sent = position
        return position

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()


def _raise_for(response: httpx.Response) -> None:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        raise ServiceClientError(response.status_code, str(body.get("error", "HTTPError")), body["message"])
    text = response.text.strip()[:200] or response.reason_phrase
    raise ServiceClientError(response.status_code, "HTTPError", f"HTTP {response.status_code}: {text}")


def _server_sent_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].removeprefix(" "))
    if data:
        yield event, json.loads("\n".join(data))


def _generation_body(
    adapter: str | None, prompt: str, max_new_tokens: int, temperature: float, top_p: float, stop: Sequence[str],
    seed: int | None, chat: bool, stream: bool,
) -> dict[str, Any]:
    return {"adapter": adapter, "prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "stop": list(stop), "seed": seed, "chat": chat, "stream": stream}


def _texts(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _segment(name: str) -> str:
    """A name as one path segment: 'a/b' must not reach another route."""
    return quote(name, safe="")
