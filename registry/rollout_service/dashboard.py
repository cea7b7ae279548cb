"""The fleet dashboard: static files under ``ui/``, served at ``/ui`` without a token.

The page holds no data of its own: it asks the ``/v1`` REST API with an operator token that the user gives it
(``/ui#token=...`` or a form), so serving it openly opens nothing. Only the files named here are served.
"""

# No "from __future__ import annotations": FastAPI must see the route annotations as objects.

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse, Response

from registry.rollout_service.errors import NotFoundError

UI_DIR = Path(__file__).with_name("ui")
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
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


def install(app: FastAPI) -> None:
    """``GET /ui`` (redirects to ``/ui/``), ``GET /ui/`` (the page) and ``GET /ui/<asset>``; none in OpenAPI."""

    @app.get("/ui", include_in_schema=False)
    def dashboard_root() -> Response:
        # Relative, so that the page's relative asset and API paths also work behind a path-prefix proxy.
        return RedirectResponse("ui/", status_code=307)

    @app.get("/ui/", include_in_schema=False)
    def dashboard_page() -> Response:
        return _asset("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    def dashboard_asset(name: str) -> Response:
        return _asset(name)


def _asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise NotFoundError(f"no dashboard file {name!r}")
    return FileResponse(UI_DIR / name, media_type=media_type, headers=_HEADERS)
