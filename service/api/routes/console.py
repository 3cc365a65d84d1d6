"""The web console: one static page at ``/`` and its script and stylesheet, shipped inside the package."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
_ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8",
           "favicon.svg": "image/svg+xml"}

# The page renders adapter names and model text that anyone may have written: only our own files may run or style
# it, nothing may frame it, and it talks to this origin alone.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def console_page() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/console/{asset}")
async def console_asset(asset: str) -> FileResponse:
    media_type = _ASSETS.get(asset)
    if media_type is None:  # a fixed set: the path never reaches the file system
        raise HTTPException(404, f"no console file {asset!r}")
    return FileResponse(CONSOLE_DIR / asset, media_type=media_type, headers=_HEADERS)
