"""The chat page (`GET /`): static files shipped inside the package (pensieve/server/static/: HTML, CSS, JS modules,
and vendored marked + DOMPurify), served without the API key — the page asks for the key when the API needs one and
keeps it in the tab's sessionStorage. No build step, no CDN: it works with no internet.

The files are read once, when the app is made, into a table by name: a request names one of them or gets a 404, so
nothing a caller sends becomes a file path. Every response of the page carries a Content-Security-Policy that allows
scripts, styles and requests from this origin only: no inline script, no remote one, no plugin, no framing."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from pensieve.server.common import APIError

STATIC = Path(__file__).with_name("static")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def _files() -> dict[str, tuple[bytes, str]]:
    """Every servable file: its path under static/ -> (its bytes, its media type)."""
    return {
        path.relative_to(STATIC).as_posix(): (path.read_bytes(), TYPES[path.suffix])
        for path in sorted(STATIC.rglob("*"))
        if path.is_file() and path.suffix in TYPES
    }


def router() -> APIRouter:
    files = _files()
    page = APIRouter()

    def serve(name: str) -> Response:
        found = files.get(name)
        if found is None:
            raise APIError(404, f"no page file {name!r}", "not_found_error")
        body, media_type = found
        return Response(body, media_type=media_type, headers=HEADERS)

    @page.get("/", include_in_schema=False)
    async def index():
        return serve("index.html")

    @page.get("/static/{name:path}", include_in_schema=False)
    async def static(name: str):
        return serve(name)

    return page


def public(method: str, path: str) -> bool:
    """Whether a request is for the page (served without the API key)."""
    return method in ("GET", "HEAD") and (path == "/" or path.startswith("/static/"))
