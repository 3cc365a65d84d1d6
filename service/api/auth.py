"""Admin authentication: a bearer token compared in constant time; no token configured means no admin routes."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

from service.api.state import app_state


def require_admin(request: Request) -> None:
    token = app_state(request).settings.admin_token
    if token is None:
        raise HTTPException(403, "admin routes are disabled: start the service with SERVICE_ADMIN_TOKEN set")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        presented.strip().encode(), token.get_secret_value().encode()
    ):
        raise HTTPException(401, "admin routes need 'Authorization: Bearer <SERVICE_ADMIN_TOKEN>'",
                            headers={"WWW-Authenticate": "Bearer"})
