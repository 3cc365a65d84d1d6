"""The one place domain errors become HTTP responses."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors

STATUS: dict[type[errors.ServiceError], int] = {
    errors.AdapterNotFound: 404,
    errors.AdapterExists: 409,
    errors.AdapterInvalid: 422,
    errors.AdapterFailed: 422,
    errors.Internal: 500,
    errors.ServiceBusy: 503,
    errors.UploadInvalid: 422,
    errors.UploadTooLarge: 413,
    errors.WrongTask: 422,
    errors.InvalidRequest: 422,
    errors.QueueFull: 429,
    errors.DeadlineExceeded: 504,
    errors.NotReady: 503,
    errors.ClientGone: 499,  # nginx's code for a client that left; only the metrics see it
}


# Routes that answer in OpenAI's error shape, so OpenAI's clients read the message: {"error": {message, type,
# param, code}}. OpenAI answers 400 where this API says 422.
OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
                 503: "service_unavailable_error", 504: "timeout_error"}
_OPENAI_CODES = {"AdapterNotFound": "model_not_found", "NotAuthenticated": "invalid_api_key"}


def _snake_case(kind: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


def speaks_openai(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def openai_error(status: int, kind: str, message: str, param: str | None = None) -> tuple[int, dict]:
    """The status and body OpenAI's API would give for one of this service's errors."""
    status = 400 if status == 422 else status
    kind = "NotAuthenticated" if status == 401 else kind
    default_type = "invalid_request_error" if status < 500 else "server_error"
    detail = {"message": message, "type": _OPENAI_TYPES.get(status, default_type), "param": param,
              "code": _OPENAI_CODES.get(kind, _snake_case(kind))}
    return status, {"error": detail}


def error_response(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None, *, path: str = "",
    param: str | None = None,
) -> JSONResponse:
    if speaks_openai(path):
        status, body = openai_error(status, kind, message, param)
        return JSONResponse(status_code=status, content=body, headers=headers)
    return JSONResponse(status_code=status, content={"error": kind, "message": message}, headers=headers)


def status_of(error: errors.ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.ServiceError)
    async def _service_error(request: Request, error: errors.ServiceError) -> JSONResponse:
        status = status_of(error)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return error_response(status, type(error).__name__, error.message, headers, path=request.url.path,
                              param=getattr(error, "param", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [(".".join(str(p) for p in e["loc"] if p != "body") or "body",
                     "not a parameter this service takes" if e["type"] == "extra_forbidden" else e["msg"],
                     e["type"] != "json_invalid")  # a JSON syntax error's location is a byte offset, no field
                    for e in error.errors()]
        message = "; ".join(f"{where}: {what}" for where, what, _ in problems)
        param = problems[0][0] if problems and problems[0][2] else None
        return error_response(422, "InvalidRequest", message or "malformed request body", path=request.url.path,
                              param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, "HTTPError", str(error.detail), getattr(error, "headers", None),
                              path=request.url.path)
