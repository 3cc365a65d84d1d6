"""The one place domain errors become HTTP responses."""

from __future__ import annotations

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
}


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": kind, "message": message}, headers=headers)


def _status_of(error: errors.ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.ServiceError)
    async def _service_error(request: Request, error: errors.ServiceError) -> JSONResponse:
        status = _status_of(error)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return error_response(status, type(error).__name__, error.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in error.errors()
        )
        return error_response(422, "InvalidRequest", problems or "malformed request body")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, "HTTPError", str(error.detail), getattr(error, "headers", None))
