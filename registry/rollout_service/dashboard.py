"""The fleet dashboard: static files under ``ui/``, served at ``/ui`` without a token.

The routes (``/ui``, ``/ui/``, ``/ui/<name>``) are in ``api/operations.py``; this module says what they serve.
The page holds no data of its own: it asks the ``/v1`` REST API with an operator token that the user gives it
(``/ui#token=...`` or a form), so serving it openly opens nothing. Only the files named here are served.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse, Response

from registry.rollout_service.errors import NotFoundError

UI_DIR = Path(__file__).with_name("ui")
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "analysis.js": "text/javascript; charset=utf-8",
    "access.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# The page runs only its own script and style and talks only to this service; the token never leaves it.
_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": _CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def asset(name: str) -> Response:
    """One of the dashboard's files, with headers that keep the page to itself; 404 for any other name."""
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise NotFoundError(f"no dashboard file {name!r}")
    return FileResponse(UI_DIR / name, media_type=media_type, headers=_HEADERS)
