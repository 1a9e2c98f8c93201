"""The browser console: one page and a fixed set of static files, served from package data.

The files are read once into memory and served by name from that allow-list, so no request path ever
reaches the file system. The page and its assets carry their own strict Content-Security-Policy, which the
gate keeps for these routes only.
"""

from __future__ import annotations

import functools
from importlib import resources

from litestar import Response, get
from litestar.params import FromPath

from appliance.errors import NotFound

CONSOLE_CSP = (
    "default-src 'self'; img-src 'self' blob:; connect-src 'self'; script-src 'self'; "
    "style-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Litestar adds "; charset=utf-8" to text/* types itself.
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png"}


@functools.cache
def _page() -> bytes:
    return (resources.files("appliance") / "console" / "index.html").read_bytes()


@functools.cache
def _assets() -> dict[str, tuple[bytes, str]]:
    """Every file under console/static with a known type, by name; anything else is not served."""
    folder = resources.files("appliance") / "console" / "static"
    found: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in MEDIA_TYPES:
            found[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    return found


def _respond(body: bytes, media_type: str) -> Response[bytes]:
    return Response(body, media_type=media_type, headers={"content-security-policy": CONSOLE_CSP})


@get("/console")
async def console_page() -> Response[bytes]:
    """The page itself holds no data; the token is entered in it and every API call needs that token."""
    return _respond(_page(), "text/html")


@get("/console/static/{name:str}")
async def console_asset(name: FromPath[str]) -> Response[bytes]:
    """One of the console's own files, by exact name (one path segment, from the allow-list)."""
    asset = _assets().get(name)
    if asset is None:
        raise NotFound("no such console file")
    return _respond(*asset)


HANDLERS = [console_page, console_asset]
