"""Admin authentication: a bearer token compared in constant time; no token configured means no admin routes.

The dependencies here and in ``state.py`` are ``async def`` though they never wait: FastAPI runs a plain ``def``
dependency on its thread pool, a thread hop (and GIL hand-off) per dependency per request, which under a burst of
requests took CPU from the model thread and delayed the burst's admission."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

from service.api.state import app_state


def _bearer(request: Request) -> bytes | None:
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    return presented.strip().encode() if scheme.lower() == "bearer" else None


def _matches(presented: bytes | None, secrets: list) -> bool:
    # Compare against every key, always, so timing tells nothing about which key or how much matched.
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(presented or b"", secret.get_secret_value().encode())
    return found and presented is not None


async def require_api_key(request: Request) -> None:
    """Inference and listing routes: open unless SERVICE_API_KEYS is set; the admin token works too."""
    settings = app_state(request).settings
    if not settings.api_keys:
        return
    accepted = list(settings.api_keys) + ([settings.admin_token] if settings.admin_token else [])
    if not _matches(_bearer(request), accepted):
        raise HTTPException(401, "this route needs 'Authorization: Bearer <API key>'",
                            headers={"WWW-Authenticate": "Bearer"})


async def require_admin(request: Request) -> None:
    token = app_state(request).settings.admin_token
    if token is None:
        raise HTTPException(403, "admin routes are disabled: start the service with SERVICE_ADMIN_TOKEN set")
    if not _matches(_bearer(request), [token]):
        raise HTTPException(401, "admin routes need 'Authorization: Bearer <SERVICE_ADMIN_TOKEN>'",
                            headers={"WWW-Authenticate": "Bearer"})
