"""Domain errors, raised where they happen and mapped to HTTP statuses in one place (service.api.errors)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdapterNotFound(ServiceError):
    """No adapter of that name in the store."""


class AdapterExists(ServiceError):
    """An upload names an adapter that already exists."""


class AdapterInvalid(ServiceError):
    """An adapter's files are malformed, unsupported, or do not fit the base model."""


class AdapterFailed(ServiceError):
    """An adapter whose forward pass failed at run time; it is quarantined until replaced or deleted."""


class ServiceBusy(ServiceError):
    """The service ran out of a resource (memory) for this batch; retrying later may succeed."""


class Internal(ServiceError):
    """An unexpected failure not attributable to the request or to an adapter; logged with its traceback."""


class UploadInvalid(ServiceError):
    """An uploaded archive is malformed, unsafe, or holds files the store does not accept."""


class UploadTooLarge(ServiceError):
    """An upload exceeds a configured size cap."""


class WrongTask(ServiceError):
    """An adapter used for a task it does not serve (a generation adapter asked to classify, say)."""


class InvalidRequest(ServiceError):
    """A request that is well-formed JSON but cannot be served as asked (too long an input, say); ``param`` names
    the request field at fault when there is one (OpenAI-shaped errors carry it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFull(ServiceError):
    """The request queue is at capacity; the client should retry later."""


class DeadlineExceeded(ServiceError):
    """A request outlived its deadline; its queued work is dropped."""


class NotReady(ServiceError):
    """The service is starting or shutting down."""


class ClientGone(ServiceError):
    """The client disconnected before its answer; the work was dropped and nobody reads the response."""
